"""docs/recipes/gsm8k.md runs as written: its code makes a verl-layout parquet from a few GSM8K rows,
`rlloop check-data` accepts it, and its CPU and GPU commands compose into valid configs.

No hub here: the rows are GSM8K's own (question, answer ending in `#### N`) written below, and the
recipe's `to_verl_rows` turns them into verl's layout exactly as its `__main__` does with the download.
"""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pyarrow.parquet as pq

from rlloop.check_data import check
from rlloop.rollout import vllm_engine
from rlloop.train import compose_config
from rlloop.validate import validate_config
from tests.conftest import ROOT

RECIPE = ROOT / "docs" / "recipes" / "gsm8k.md"
GSM8K = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
        "May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
        "$<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total "
        "does it take?",
        "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 "
        "bolts of fabric\n#### 3",
    },
    {"question": "What is 1,000 + 234?", "answer": "1,000 + 234 = 1,234\n#### 1,234"},
]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", RECIPE.read_text(), flags=re.S)


def _recipe_data(tmp_path: Path) -> tuple[Path, Path]:
    (code,) = [b for b in _blocks("python") if "def to_verl_rows" in b]
    recipe: dict = {"__name__": "recipe"}  # not __main__: no download
    exec(compile(code, str(RECIPE), "exec"), recipe)
    train, test = tmp_path / "gsm8k" / "train.parquet", tmp_path / "gsm8k" / "test.parquet"
    recipe["write"](recipe["to_verl_rows"](GSM8K[:3], "train"), train)
    recipe["write"](recipe["to_verl_rows"](GSM8K[3:], "test"), test)
    return train, test


def _command(first_words: str, train: Path, test: Path) -> list[str]:
    """The recipe's command starting with `first_words`, as overrides, pointed at the test's files."""
    (block,) = [b for b in _blocks("bash") if b.startswith(first_words)]
    line = block.replace("\\\n", " ").replace("$HOME/data/gsm8k/train.parquet", str(train))
    args = shlex.split(line.replace("$HOME/data/gsm8k/test.parquet", str(test)))
    assert "$HOME" not in " ".join(args)
    return args[2:]  # past `rlloop <command>`


def test_the_recipe_makes_verls_layout(tmp_path):
    train, _ = _recipe_data(tmp_path)
    rows = pq.read_table(train).to_pylist()
    assert rows[0]["data_source"] == "openai/gsm8k" and rows[0]["ability"] == "math"
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["prompt"][0]["content"].endswith('after "####".')
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["72", "10", "3"]
    assert rows[1]["extra_info"] == {"split": "train", "index": 1, "answer": GSM8K[1]["answer"],
                                     "question": GSM8K[1]["question"]}  # fmt: skip


def test_check_data_accepts_the_recipes_parquet(tmp_path):
    train, test = _recipe_data(tmp_path)
    args = _command("rlloop check-data", train, test)
    # the recipe's model is a hub name; the check's own logic is the same with the tiny built-in model
    args = [a for a in args if not a.startswith("model")] + ["model=tiny"]
    out = io.StringIO()
    assert check(compose_config(args), out=out) == 0, out.getvalue()
    report = out.getvalue()
    assert "Natalia sold clips" in report and 'output the final answer after "####".' in report
    assert "train: " in report and "3 rows, verifier(s) ['math']: 0 gold(s) unusable" in report
    assert "1 rows, verifier(s) ['math']: 0 gold(s) unusable" in report  # 1,234 read as 1234


def test_the_recipes_commands_compose_and_validate(tmp_path, monkeypatch):
    train, test = _recipe_data(tmp_path)
    cpu = compose_config(_command("rlloop train model=tiny", train, test))
    validate_config(cpu)
    assert cpu.task.train_path == str(train) and cpu.trainer.total_steps == 1
    # the GPU extra's vLLM is not installed here; the rest of the check runs as on the GPU machine
    monkeypatch.setattr(vllm_engine, "check_vllm_version", lambda: f"vllm=={vllm_engine.VLLM_PIN}")
    gpu = compose_config(_command("rlloop train model=hf", train, test))
    validate_config(gpu)  # values only: the GPUs themselves are checked where the run starts
    assert gpu.rollout.engine == "vllm" and gpu.cluster.placement == "separate" and gpu.learner.world_size == 4
    assert gpu.model.path == "Qwen/Qwen2.5-0.5B-Instruct" and "tensorboard" in gpu.logger
