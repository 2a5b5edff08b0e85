import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlloop.config import TaskConfig
from rlloop.data import DataError, build_datasets, chat_messages, load_samples, render_prompt
from rlloop.errors import ConfigError
from rlloop.models.tokenizer import build_tokenizer
from rlloop.types import Sample


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_happy_path(tmp_path):
    f = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "1+1?", "answer": 2},
            {
                "prompt": [{"role": "user", "content": "2+2?"}],
                "answer": "4",
                "data_source": "other",
                "uid": "q7",
            },
        ],
    )
    s = load_samples(f, data_source="math", split="train")
    assert [x.uid for x in s] == ["train-0", "q7"]
    assert s[0].ground_truth == "2" and s[0].data_source == "math" and s[0].prompt == "1+1?"
    assert s[1].data_source == "other" and s[1].prompt[0]["content"] == "2+2?"


def test_parquet_happy_path(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a?", "b?"], "answer": ["1", "2"], "level": [3, 4]}), f)
    s = load_samples(str(f), data_source="math", split="test")
    assert [x.ground_truth for x in s] == ["1", "2"] and s[1].uid == "test-1"
    assert s[1].extra == {"answer": "2", "level": 4}  # every column but the prompt: TRL's reward kwargs


def test_missing_file_named(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.jsonl"):
        load_samples(str(tmp_path / "nope.jsonl"), data_source="math", split="train")


def test_empty_file_named(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError, match="empty: .*empty.jsonl"):
        load_samples(str(f), data_source="math", split="train")


def test_empty_parquet_named(tmp_path):
    f = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), f)
    with pytest.raises(DataError, match="empty: .*empty.parquet"):
        load_samples(str(f), data_source="math", split="train")


def test_row_without_answer_names_file_row_and_column(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": 1}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl: line 2: column 'answer'"):
        load_samples(f, data_source="math", split="train")


def test_parquet_row_without_prompt_named(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None], "answer": ["1", "2"]}), f)
    with pytest.raises(DataError, match=r"p\.parquet: row 1: column 'prompt'"):
        load_samples(str(f), data_source="math", split="train")


def test_bad_json_line_named(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": 1}, "{not json"])
    with pytest.raises(DataError, match=r"d\.jsonl: line 2 is not valid JSON"):
        load_samples(f, data_source="math", split="train")


def test_unsupported_suffix_and_duplicate_uid(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("prompt,answer\n")
    with pytest.raises(DataError, match="unsupported"):
        load_samples(str(f), data_source="math", split="train")
    g = _write_jsonl(
        tmp_path / "u.jsonl",
        [{"prompt": "a", "answer": 1, "uid": "x"}, {"prompt": "b", "answer": 2, "uid": "x"}],
    )
    with pytest.raises(DataError, match="duplicate value 'x'"):
        load_samples(g, data_source="math", split="train")


def test_build_datasets_dispatch(tmp_path):
    tr, te = build_datasets(TaskConfig(num_train=20, num_test=5))
    assert len(tr) == 20 and len(te) == 5 and tr[0].uid.startswith("arith-train")
    f = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(4)])
    cfg = TaskConfig(name="file", data_source="math", train_path=f, test_path=f, num_test=2)
    tr, te = build_datasets(cfg)
    assert len(tr) == 4 and len(te) == 2 and tr[0].data_source == "math"
    with pytest.raises(ConfigError, match="train_path"):
        build_datasets(TaskConfig(name="file"))
    with pytest.raises(ConfigError, match="task.name"):
        build_datasets(TaskConfig(name="gsm9k"))


def test_render_prompt_uses_chat_template_and_system_prompt():
    tok = build_tokenizer(["Sam has 3 marbles. How many?"] * 5, vocab_size=300)
    s = Sample(uid="u", prompt="Sam has 3 marbles.", data_source="arith", ground_truth="3")
    cfg = TaskConfig(system_prompt="Be brief.")
    assert [m["role"] for m in chat_messages(s, cfg)] == ["system", "user"]
    ids = render_prompt(s, tok, cfg)
    text = tok.decode(ids)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nSam has 3 marbles.<|end|>\n<|assistant|>\n"
    assert (
        render_prompt(s, tok, TaskConfig())
        == tok(tok.decode(render_prompt(s, tok)), add_special_tokens=False).input_ids
    )
