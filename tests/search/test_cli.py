"""`python -m rlloop.search` end to end on model=tiny, and `run_search`'s table with a scripted backend."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from rlloop.errors import ConfigError
from rlloop.search.beam import StepOutput
from rlloop.search.bon import Candidate
from rlloop.search.cli import check_config, format_table, run_search
from tests.conftest import ROOT, run_cli


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="search", overrides=overrides)


class ScriptedBackend:
    """Answers from a table: problem i's samples and steps, values by answer; no model involved."""

    def __init__(self, answers_by_gt: dict[str, list[str]], value_of: dict[str, float]):
        self.answers_by_gt = answers_by_gt
        self.value_of = value_of
        self.closed = False

    def sample(self, prompts, n, seed):
        out = []
        for p in prompts:
            answers = self.answers_by_gt[p["ground_truth"]][:n]
            out.append([self._cand(a) for a in answers])
        return out

    @staticmethod
    def _cand(answer):
        text = f"work\n\nThe answer is \\boxed{{{answer}}}."
        return Candidate(text=text, step_char_ends=[4, len(text)], num_tokens=5)

    def steps(self, requests, n, seed):
        out = []
        for r in requests:
            answers = self.answers_by_gt[r.prompt["ground_truth"]][:n]
            out.append([StepOutput(f"The answer is \\boxed{{{a}}}.", [1, 2], 3, "stop") for a in answers])
        return out

    def score(self, prompt_texts, texts, ends):
        from rlloop.rewards.verifiers.math import last_boxed

        return [
            [0.5] * (len(e) - 1) + [self.value_of[last_boxed(t)]] for t, e in zip(texts, ends, strict=True)
        ]

    def close(self):
        self.closed = True


def test_run_search_table_with_a_scripted_backend(tmp_path):
    from rlloop.config import TaskConfig
    from rlloop.data import build_datasets

    # 2-digit problems: the script below needs the first two to have different answers (on the default
    # 1-digit task, seed 0, they share one)
    cfg = compose_cfg(
        [
            "model=tiny",
            "num_problems=2",
            "n=[1,3]",
            "beams=[{top_k:1,num_branch:3}]",
            "ray=false",
            "task.max_digits=2",
        ]
    )
    _, test = build_datasets(TaskConfig(**{k: v for k, v in cfg.task.items()}))
    g0, g1 = test[0].ground_truth, test[1].ground_truth
    assert g0 != g1, (g0, g1)
    wrong = "99999"
    # problem 0: first sample wrong, majority wrong, the PRM likes the right one
    # problem 1: first sample right, majority right, the PRM likes a wrong one
    answers = {g0: [wrong, wrong, g0], g1: [g1, g1, wrong + "1"]}
    values = {wrong: 0.2, g0: 0.9, g1: 0.3, wrong + "1": 0.8}
    backend = ScriptedBackend(answers, values)
    res = run_search(cfg, str(tmp_path), backend=backend)
    assert backend.closed
    table = {(r["method"], r["N"]): r for r in res["methods"]}
    assert table[("sample", 1)]["accuracy"] == 0.5
    assert table[("sample", 3)]["accuracy"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert table[("oracle", 3)]["accuracy"] == 1.0
    assert table[("majority", 3)]["accuracy"] == 0.5
    assert table[("bon_last", 3)]["accuracy"] == 0.5
    assert table[("bon_last", 1)]["accuracy"] == 0.5
    # weighted: p0 wrong 0.4 vs right 0.9 -> right; p1 right 0.6 vs wrong 0.8 -> wrong
    assert table[("weighted_majority", 3)]["accuracy"] == 0.5
    # beam picks the highest V_last leaf: right on p0 (0.9), wrong on p1 (0.8)
    beam = table[("beam_k1_b3", 3)]
    assert beam["accuracy"] == 0.5 and beam["tokens_per_problem"] == 9 and beam["finished"] == 1.0
    assert table[("sample", 3)]["tokens_per_problem"] == 15
    saved = json.loads((tmp_path / "search_results.json").read_text())
    assert saved["num_problems"] == 2 and len(saved["methods"]) == len(res["methods"])
    assert "bon_prod" in format_table(res)


@pytest.mark.parametrize(
    "override, key",
    [
        ("methods=[bon,vote]", "methods"),
        ("aggregations=[median]", "aggregations"),
        ("n=[0]", "n"),
        ("beams=[{top_k:0,num_branch:2}]", "beams"),
        ("split=dev", "split"),
        ("+bogus=1", "bogus"),
    ],
)
def test_bad_config_names_the_key(override, key):
    cfg = compose_cfg(["model=tiny", override])
    with pytest.raises(ConfigError, match=key):
        check_config(cfg)


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_with_ray(tmp_path, prm_dir):
    """`python -m rlloop.search` with Ray actors: BoN, votes and beam search, results file and dump."""
    dump = tmp_path / "samples.jsonl"
    proc = run_cli(
        [
            "model=tiny",
            "num_problems=3",
            "n=[1,2]",
            "max_new_tokens=16",
            "max_step_tokens=8",
            "max_depth=2",
            "beams=[{top_k:1,num_branch:2}]",
            f"prm.path={prm_dir}",
            "cluster.num_cpus=2",
            f"dump_rollouts={dump}",
            f"output_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/hydra",
        ],
        module="rlloop.search",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "search_results.json").read_text())
    methods = {(r["method"], r["N"]) for r in res["methods"]}
    for m in (
        "sample",
        "oracle",
        "bon_last",
        "bon_min",
        "bon_mean",
        "bon_prod",
        "majority",
        "weighted_majority",
    ):
        assert (m, 1) in methods and (m, 2) in methods
    assert ("beam_k1_b2", 2) in methods
    for r in res["methods"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_problem"] > 0
    assert "bon_last" in proc.stdout and "beam_k1_b2" in proc.stdout
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert rows and all({"prompt_text", "text", "step_char_ends", "correct"} <= set(r) for r in rows)


def test_cli_bad_prm_path_is_one_clear_error(tmp_path):
    proc = run_cli(
        ["model=tiny", "ray=false", "num_problems=1", "prm.path=/nonexistent/prm", f"output_dir={tmp_path}"],
        module="rlloop.search",
        timeout=300,
    )
    assert proc.returncode == 2
    assert "prm.path=/nonexistent/prm" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_prm_folder_without_tokenizer_is_one_clear_error(tmp_path):
    (tmp_path / "prm").mkdir()  # a folder, but nothing to tokenize with
    proc = run_cli(
        ["model=tiny", "ray=false", "num_problems=1", f"prm.path={tmp_path / 'prm'}", f"output_dir={tmp_path}"],
        module="rlloop.search",
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cannot load its tokenizer" in proc.stdout + proc.stderr and "prm.tokenizer_path" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
