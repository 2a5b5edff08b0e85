"""Other trainers' data layouts (verl, TRL, OpenRLHF), key mapping, file lists and globs, raw-text prompts,
chat-template kwargs and over-long prompts."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlloop.config import TaskConfig
from rlloop.data import DataError, build_datasets, load_samples, render_prompt
from rlloop.data.loader import fit_prompt_lengths, prompt_text
from rlloop.errors import ConfigError
from rlloop.models.tokenizer import build_tokenizer
from rlloop.types import Sample


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def verl_rows(n=3):
    """Rows as verl's examples/data_preprocess/gsm8k.py writes them."""
    return [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"What is {i} + {i}? Put the answer in \\boxed{{}}."}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
            "extra_info": {"split": "train", "index": i, "answer": f"{i}+{i}={2 * i}"},
        }
        for i in range(n)
    ]


def write_verl_parquet(path, n=3):
    pq.write_table(pa.Table.from_pylist(verl_rows(n)), path)
    return str(path)


def test_verl_parquet_layout(tmp_path):
    s = load_samples(write_verl_parquet(tmp_path / "gsm8k.parquet"), data_source="math", split="train")
    assert [x.ground_truth for x in s] == ["0", "2", "4"]
    assert s[1].data_source == "openai/gsm8k"
    assert s[1].prompt == [{"role": "user", "content": "What is 1 + 1? Put the answer in \\boxed{}."}]
    assert s[1].extra["extra_info"] == {"split": "train", "index": 1, "answer": "1+1=2"}  # as-is
    assert s[1].extra["ability"] == "math" and s[1].extra["reward_model"]["style"] == "rule"


def test_trl_conversational_and_standard_jsonl(tmp_path):
    conv = _jsonl(
        tmp_path / "conv.jsonl",
        [
            {
                "prompt": [
                    {"role": "system", "content": "Think, then answer."},
                    {"role": "user", "content": "2+3?"},
                ],
                "solution": "5",
            },
            {"prompt": [{"role": "user", "content": "4+4?"}], "solution": "8"},
        ],
    )
    s = load_samples(conv, data_source="math", split="train")
    assert [x.ground_truth for x in s] == ["5", "8"] and s[0].prompt[1]["content"] == "2+3?"
    assert s[0].extra == {"solution": "5"}  # TRL's accuracy_reward reads the `solution` column
    std = _jsonl(tmp_path / "std.jsonl", [{"prompt": "1+1=", "ground_truth": "2"}])
    assert load_samples(std, data_source="math", split="train")[0].ground_truth == "2"


def test_openrlhf_input_and_label_keys(tmp_path):
    f = _jsonl(tmp_path / "o.jsonl", [{"context": "What is 6*7?", "target": 42, "id": 1}])
    cfg = TaskConfig(name="file", train_path=f, input_key="context", label_key="target", data_source="math")
    train, _ = build_datasets(cfg)
    assert train[0].prompt == "What is 6*7?" and train[0].ground_truth == "42"
    assert train[0].extra == {"target": 42, "id": 1}
    # OpenRLHF's default input_key ("input") is detected without config
    g = _jsonl(tmp_path / "d.jsonl", [{"input": "1+2?", "label": "3"}])
    assert load_samples(g, data_source="m", split="train")[0].prompt == "1+2?"
    # the two spellings of one key must agree
    with pytest.raises(ConfigError, match="task.prompt_key='a' and task.input_key='context'"):
        build_datasets(TaskConfig(name="file", train_path=f, prompt_key="a", input_key="context"))


def test_keys_by_config_and_dotted_keys(tmp_path):
    f = _jsonl(tmp_path / "k.jsonl", [{"q": "hi?", "meta": {"gold": "7"}}])
    cfg = TaskConfig(name="file", train_path=f, prompt_key="q", answer_key="meta.gold")
    assert build_datasets(cfg)[0][0].ground_truth == "7"
    bad = TaskConfig(name="file", train_path=f, prompt_key="q", answer_key="meta.nope")
    with pytest.raises(DataError, match=r"k\.jsonl: line 1: column 'meta.nope' is missing"):
        build_datasets(bad)


def test_missing_answer_names_the_layouts_it_looked_for(tmp_path):
    f = _jsonl(tmp_path / "n.jsonl", [{"prompt": "x", "gold": "1"}])
    with pytest.raises(DataError, match=r"n\.jsonl: line 1: column 'answer' is missing .*task.answer_key"):
        load_samples(f, data_source="m", split="train")


def test_file_lists_and_globs(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "answer": 1}])
    write_verl_parquet(tmp_path / "b.parquet", n=2)
    both = load_samples([a, str(tmp_path / "b.parquet")], data_source="m", split="train")
    assert [x.uid for x in both] == ["train-0", "train-1", "train-2"]
    assert [x.ground_truth for x in both] == ["1", "0", "2"]  # each file keeps its own layout
    globbed = load_samples(str(tmp_path / "*.parquet"), data_source="m", split="train")
    assert len(globbed) == 2
    with pytest.raises(DataError, match="glob matches no file"):
        load_samples(str(tmp_path / "*.nope"), data_source="m", split="train")
    with pytest.raises(DataError, match=r"directory.*\*\.parquet"):
        load_samples(str(tmp_path), data_source="m", split="train")
    # a uid repeated across files names both places
    c = _jsonl(tmp_path / "c.jsonl", [{"prompt": "c", "answer": 1, "uid": "train-0"}])
    with pytest.raises(
        DataError, match=r"c\.jsonl: line 1: .*duplicate value 'train-0' \(first at .*a\.jsonl"
    ):
        load_samples([a, c], data_source="m", split="train")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["What is 1 + 1? Put the answer in boxed."] * 5, vocab_size=300)


def test_raw_text_prompts_and_chat_template_kwargs(tok):
    s = Sample(uid="u", prompt=[{"role": "user", "content": "1+1?"}], data_source="m", ground_truth="2")
    raw = TaskConfig(apply_chat_template=False, system_prompt="Be brief.")
    assert prompt_text(s, tok, raw) == "Be brief.\n\n1+1?"
    assert tok.decode(render_prompt(s, tok, raw)) == "Be brief.\n\n1+1?"
    tok2 = build_tokenizer(["x"] * 3, vocab_size=300)
    tok2.chat_template = "{% if enable_thinking %}<think>{% endif %}{{ messages[-1]['content'] }}"
    assert prompt_text(s, tok2, TaskConfig()) == "1+1?"
    assert prompt_text(s, tok2, TaskConfig(chat_template_kwargs={"enable_thinking": True})) == "<think>1+1?"


def test_overlong_prompts_filter_truncate_error(tok, caplog):
    short = Sample(uid="s", prompt="1+1?", data_source="m", ground_truth="2")
    long_text = Sample(uid="l", prompt="What is 1 + 1? " * 40, data_source="m", ground_truth="2")
    long_chat = Sample(
        uid="c", prompt=[{"role": "user", "content": "1 + 1 " * 60}], data_source="m", ground_truth="2"
    )
    samples = [short, long_text, long_chat]
    kw = dict(max_new_tokens=16, context=64, split="train")
    with caplog.at_level(logging.WARNING, logger="rlloop.data.loader"):
        kept = fit_prompt_lengths(samples, tok, TaskConfig(), **kw)
    assert [s.uid for s in kept] == ["s"]
    assert "2 of 3 train prompts are over 48 tokens" in caplog.text and "dropped" in caplog.text
    cut = fit_prompt_lengths(samples, tok, TaskConfig(overlong_prompts="truncate"), **kw)
    assert [s.uid for s in cut] == ["s", "l", "c"]
    assert all(len(render_prompt(s, tok, TaskConfig())) <= 48 for s in cut)
    assert cut[1].prompt.startswith("What is 1 + 1?") and long_text.prompt.endswith("? ")  # a copy is cut
    assert cut[2].prompt[0]["role"] == "user"
    with pytest.raises(DataError, match="prompt uid 'l' is .* tokens"):
        fit_prompt_lengths(samples, tok, TaskConfig(overlong_prompts="error"), **kw)
    with pytest.raises(ConfigError, match="task.overlong_prompts='drop'"):
        fit_prompt_lengths(samples, tok, TaskConfig(overlong_prompts="drop"), **kw)
