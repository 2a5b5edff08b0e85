"""rlloop.evaluate: the pass@k / maj@k / bon@k estimators, per-set and per-data_source metrics, the
trainer's periodic eval, and `python -m rlloop.evaluate` on a tiny model."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

from rlloop.evaluation import (
    PromptResult,
    bon_at_k,
    evaluate_sets,
    final_answer,
    maj_at_k,
    pass_at_k,
    set_metrics,
)
from rlloop.types import Rollout, Sample


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample():
    for n in range(1, 7):
        for c in range(n + 1):
            flags = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(flags, k))
                expected = sum(1 for s in subsets if any(s)) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError, match="n=2 c=1 k=3"):
        pass_at_k(2, 1, 3)


def test_maj_and_bon_over_disjoint_groups_hand_worked():
    correct = [0.0, 1.0, 1.0, 0.0]
    answers = ["3", "4", "4", "3"]
    assert maj_at_k(correct, answers, 1) == 0.5  # each sample alone: the mean
    # groups [0, 1] ("3" vs "4": a tie goes to the first seen, wrong) and [2, 3] ("4" first, right)
    assert maj_at_k(correct, answers, 2) == 0.5
    assert maj_at_k(correct, answers, 4) == 0.0  # 2 votes each: "3" seen first
    assert maj_at_k([1.0, 0.0], [None, None], 2) == 0.0  # no answer to vote for
    scores = [0.1, 0.9, 0.2, 0.8]
    assert bon_at_k(correct, scores, 2) == 0.5  # picks 1 (right) and 3 (wrong)
    assert bon_at_k(correct, scores, 4) == 1.0
    assert bon_at_k(correct, scores, 3) == 1.0  # one group of 3; the 4th sample is left out
    assert final_answer("so \\boxed{042}.") == "42" and final_answer("#### 1,234") == "1234"
    assert final_answer("no answer") is None


def test_set_metrics_per_data_source_and_whole_set():
    results = [
        PromptResult("a", "gsm8k", 1.0, 10, [1.0, 0.0], ["1", "2"], [0.2, 0.7]),
        PromptResult("b", "gsm8k", 0.0, 10, [0.0, 0.0], ["5", "5"], [0.5, 0.1]),
        PromptResult("c", "math", 1.0, 10, [1.0, 1.0], ["7", "7"], [0.3, 0.4]),
    ]
    m = set_metrics("dev", results, [1, 2])
    assert m["eval/dev/gsm8k/accuracy"] == 0.5 and m["eval/dev/math/accuracy"] == 1.0
    assert m["eval/dev/accuracy"] == pytest.approx(2 / 3)
    assert m["eval/dev/gsm8k/mean"] == 0.25 and m["eval/dev/gsm8k/pass@1"] == 0.25
    assert m["eval/dev/gsm8k/pass@2"] == 0.5  # prompt a has one right in two
    assert m["eval/dev/gsm8k/maj@2"] == 0.5  # a: "1" first on the tie (right); b: "5" (wrong)
    assert m["eval/dev/gsm8k/bon@2"] == 0.0  # a: 0.7 picks the wrong one; b: all wrong
    assert m["eval/dev/math/bon@2"] == 1.0
    assert m["eval/dev/num_prompts"] == 3.0 and m["eval/dev/math/num_prompts"] == 1.0


def _rollout(sample: Sample, i: int, text: str, steps: int) -> Rollout:
    ends = [len(text)] * steps
    return Rollout(uid=f"{sample.uid}/{i}", group=sample.uid, prompt_ids=[1], response_ids=[2] * (i + 3),
                   rollout_logprobs=[], step_ends=[0] * steps, step_char_ends=ends, text=text, prompt_text="Q",
                   finish_reason="stop", policy_version=0, data_source=sample.data_source,
                   ground_truth=sample.ground_truth)  # fmt: skip


def fake_policy(answers: dict[str, list[str]], greedy: dict[str, str]):
    """generate(samples, n, temperature): sample i of a prompt answers answers[uid][i], verified."""
    calls = []

    def generate(samples, n, temperature):
        calls.append((len(samples), n, temperature))
        out = []
        for s in samples:
            texts = [greedy[s.uid]] if n == 1 and temperature == 0.0 else answers[s.uid][:n]
            for i, t in enumerate(texts):
                ro = _rollout(s, i, f"\\boxed{{{t}}}", 1)
                ro.outcome = {"correct": float(t == s.ground_truth)}
                out.append(ro)
        return out

    return generate, calls


SETS = {
    "test": [Sample("t0", "q", "arith", "4"), Sample("t1", "q", "gsm8k", "9")],
    "hard": [Sample("h0", "q", "math", "1")],
}
ANSWERS = {"t0": ["4", "5", "5", "4"], "t1": ["1", "2", "3", "9"], "h0": ["0", "0", "0", "0"]}
GREEDY = {"t0": "4", "t1": "2", "h0": "0"}


def prm_prefers_the_last_sample(rollouts):
    for ro in rollouts:
        ro.step_values = [int(ro.uid.rsplit("/", 1)[1]) / 10]


def test_evaluate_sets_from_one_set_of_samples():
    generate, calls = fake_policy(ANSWERS, GREEDY)
    m, per_set = evaluate_sets(SETS, generate, n=4, ks=[1, 2, 4], greedy_temperature=0.0, temperature=1.0,
                               score=prm_prefers_the_last_sample, bon_aggregation="last")  # fmt: skip
    # one greedy and one sampled call per set: every metric comes from the same 4 samples
    assert calls == [(2, 1, 0.0), (2, 4, 1.0), (1, 1, 0.0), (1, 4, 1.0)]
    assert m["eval/test/arith/accuracy"] == 1.0 and m["eval/test/gsm8k/accuracy"] == 0.0
    assert m["eval/test/arith/mean"] == 0.5 and m["eval/test/gsm8k/mean"] == 0.25
    assert m["eval/test/gsm8k/pass@2"] == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert m["eval/test/arith/maj@4"] == 1.0  # "4" and "5" tie, "4" first
    assert m["eval/test/gsm8k/maj@4"] == 0.0  # four answers once each: the first, "1"
    assert m["eval/test/gsm8k/bon@4"] == 1.0  # the PRM picks the last sample, "9"
    assert m["eval/test/arith/bon@2"] == 0.5  # groups [4, 5] -> "5", [5, 4] -> "4"
    assert m["eval/hard/math/pass@4"] == 0.0 and m["eval/hard/num_prompts"] == 1.0
    assert [r.uid for r in per_set["test"]] == ["t0", "t1"]
    greedy_only, _ = evaluate_sets(SETS, fake_policy(ANSWERS, GREEDY)[0], n=0, ks=[], greedy_temperature=0.0,
                                   temperature=1.0)  # fmt: skip
    assert sorted(k for k in greedy_only if k.startswith("eval/test/")) == [
        "eval/test/accuracy", "eval/test/arith/accuracy", "eval/test/arith/num_prompts",
        "eval/test/gsm8k/accuracy", "eval/test/gsm8k/num_prompts", "eval/test/num_prompts",
    ]  # fmt: skip


def test_trainer_periodic_eval_reports_every_set_and_the_old_keys():
    """Trainer.evaluate (the eval at trainer.eval_every) wired to fake actors: eval/<set>/<source>/...
    beside the keys the loop and the summary read (eval/accuracy, eval/pass_at_<k>)."""
    from rlloop.controller import Trainer

    generate, _ = fake_policy(ANSWERS, GREEDY)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(
        trainer=SimpleNamespace(eval_samples=4, seed=0),
        rollout=SimpleNamespace(eval_temperature=0.0, temperature=1.0),
        eval=SimpleNamespace(ks=[2, 4], bon_aggregation="last"),
    )
    trainer.eval_sets = SETS
    trainer._quiesce = lambda: None
    trainer.generate_all = lambda samples, n, temperature, seed: generate(samples, n, temperature)
    trainer.verify = lambda rollouts: None  # the fake policy's rollouts come verified
    scored = []
    trainer.actors = SimpleNamespace(prm_pool=SimpleNamespace(
        score=lambda p, t, e: scored.append(len(t)) or [{"step_values": [0.0]} for _ in t]))  # fmt: skip
    m = trainer.evaluate()
    assert scored == [8, 4]  # the sampled answers of each set, once
    assert m["eval/accuracy"] == 0.5 and m["eval/test/accuracy"] == 0.5
    assert m["eval/accuracy_sampled"] == m["eval/test/mean"] == pytest.approx(3 / 8)
    assert m["eval/pass_at_4"] == m["eval/test/pass@4"] == 1.0
    assert m["eval/num_samples"] == 2.0 and m["eval/response_length"] == 3.0
    assert m["eval/test/gsm8k/bon@4"] == 0.0  # all step values tie: the first sample, wrong
    assert {"eval/hard/math/maj@2", "eval/hard/math/bon@2", "time/eval"} <= m.keys()


@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory):
    """rlloop's tiny policy, and a PRM folder on its backbone with a random value head."""
    import torch

    from rlloop.models import resolve_model
    from rlloop.rewards.prm.model import ValueHeadModel
    from rlloop.train import compose_config

    cfg = compose_config(["model=tiny", "task=arith"])
    model_path = resolve_model(cfg.model, cfg.task)
    prm = ValueHeadModel.from_backbone(model_path)
    torch.manual_seed(0)
    with torch.no_grad():
        prm.head.weight.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("prm")
    prm.save_pretrained(str(path))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_path).save_pretrained(str(path))
    return str(path)


def test_eval_command_on_a_tiny_model_writes_the_report(tmp_path, tiny_prm):
    from rlloop.evaluate import format_metrics, run
    from rlloop.train import compose_config

    extra = tmp_path / "extra.jsonl"
    rows = [{"prompt": "What is 2 + 3?", "answer": "5", "data_source": "other"},
            {"prompt": "What is 1 + 1?", "answer": "2", "data_source": "other"}]  # fmt: skip
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config([
        "model=tiny", "task=arith", "task.num_test=3", "trainer.eval_samples=2", "eval.ks=[1,2]",
        "rollout.max_new_tokens=8", f"+eval.sets.extra={extra}", f"reward.prm.path={tiny_prm}",
        f"output_dir={tmp_path}",
    ])  # fmt: skip
    report = run(cfg)
    saved = json.loads((tmp_path / "eval_report.json").read_text())
    m = saved["metrics"]
    for name, source, prompts in (("test", "arith", 3), ("extra", "other", 2)):
        assert m[f"eval/{name}/{source}/num_prompts"] == prompts
        for metric in ("accuracy", "mean", "pass@1", "pass@2", "maj@2", "bon@2"):
            assert 0.0 <= m[f"eval/{name}/{source}/{metric}"] <= 1.0, metric
    assert [len(p["correct"]) for p in saved["prompts"]["extra"]] == [2, 2]
    assert all(len(p["prm_scores"]) == 2 for p in saved["prompts"]["test"])
    assert saved["ks"] == [1, 2] and report["path"].endswith("eval_report.json")
    assert "eval/extra/other/bon@2" in format_metrics(m)


def test_eval_command_bad_input_exits_2(capsys):
    from rlloop.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(["model=tiny", "task=arith", "trainer.eval_samples=2", "eval.ks=[4]"])
    assert exc.value.code == 2
    assert "eval.ks" in capsys.readouterr().err


@pytest.mark.slow
def test_training_run_evaluates_named_sets_with_a_published_prm(tmp_path, tmp_path_factory):
    """One training step through every actor, the PRM service a TRL token-classification PRM (adapter
    detected from its folder): the periodic eval logs eval/<set>/<data_source>/... with bon@k."""
    from tests.conftest import TINY_RUN, run_cli
    from tests.rewards.prm.test_adapters import two_class_folder

    prm = two_class_folder(tmp_path_factory, "trl_prm")
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5", "data_source": "other"}) + "\n")
    out = tmp_path / "run"
    proc = run_cli([
        *TINY_RUN, "trainer.total_steps=1", "learner.world_size=1", "task.num_test=2", "trainer.eval_samples=2",
        "eval.ks=[1,2]", f"+eval.sets.extra={extra}", f"reward.prm.path={prm}", "trainer.save_final=false",
        f"hydra.run.dir={out}",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the adapter scored: a value-head PRM started fresh on that folder would give V = 0.5 exactly
    (train,) = [r for r in rows if "reward/total" in r]
    assert abs(train["reward/prm_value"] - 0.5) > 1e-4, train["reward/prm_value"]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 1]
    for r in evals:
        for key in ("eval/test/arith/pass@2", "eval/test/arith/maj@2", "eval/test/arith/bon@2",
                    "eval/extra/other/accuracy", "eval/extra/other/bon@2", "eval/extra/num_prompts"):  # fmt: skip
            assert 0.0 <= r[key] <= 2.0, (key, r)
        assert r["eval/pass_at_2"] == r["eval/test/pass@2"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["trainer.eval_samples=2", "eval.ks=[1,3]"], r"eval.ks=\[1, 3\]: \[3\] not in \[1, trainer.eval_samples=2\]"),
        (["trainer.eval_samples=0", "eval.ks=[1]"], r"\[1\] not in \[1, trainer.eval_samples=0\]"),
        (["eval.bon_aggregation=max"], "eval.bon_aggregation='max': unknown; choose last, min, mean or prod"),
        (["+eval.sets.test=x.jsonl"], "eval.sets='test': a set name may not contain '/' or be 'test'"),
    ],
)  # fmt: skip
def test_eval_config_is_checked_at_start(overrides, words):
    from rlloop.errors import ConfigError
    from rlloop.train import compose_config
    from rlloop.validate import validate_config

    with pytest.raises(ConfigError, match=words):
        validate_config(compose_config(overrides))


def test_greedy_format_share_when_the_verifier_reports_one():
    def generate(samples, n, temperature):
        out = []
        for s in samples:
            text = "\\boxed{4}" if s.uid == "t0" else "no box"  # t1's greedy answer has nothing to read
            ro = _rollout(s, 0, text, 1)
            ro.outcome = {"correct": float(s.uid == "t0"), "format": float(s.uid == "t0")}
            out.append(ro)
        return out

    m, _ = evaluate_sets({"test": SETS["test"]}, generate, n=0, ks=[], greedy_temperature=0.0, temperature=1.0)
    assert m["eval/test/format"] == 0.5 and m["eval/test/arith/format"] == 1.0 and m["eval/test/gsm8k/format"] == 0.0
    # a prompt whose verification gave no format score (a timeout) is left out of the format mean only
    def timing_out(samples, n, temperature):
        out = generate(samples, n, temperature)
        out[1].outcome = {"correct": 0.0}
        return out

    m, _ = evaluate_sets({"test": SETS["test"]}, timing_out, n=0, ks=[], greedy_temperature=0.0, temperature=1.0)
    assert m["eval/test/format"] == 1.0 and m["eval/test/accuracy"] == 0.5 and "eval/test/gsm8k/format" not in m
    # a verifier without a format score: no format metric rather than a made-up 0
    m, _ = evaluate_sets(SETS, fake_policy(ANSWERS, GREEDY)[0], n=0, ks=[], greedy_temperature=0.0, temperature=1.0)
    assert not any(k.endswith("/format") for k in m)
