"""The experiment suite (rlloop.experiments): aggregation and Best-of-N on hand-worked inputs, and a
CI-sized smoke run of each experiment through real `rlloop.train` runs on `model=tiny`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlloop.errors import RlloopError
from rlloop.experiments import common
from rlloop.experiments.prm_quality import best_of_n, markdown


def _write_metrics(path: Path, evals: dict[int, float]) -> None:
    rows = []
    for step in range(max(evals) + 1):
        row = {"step": step, "reward/total": 0.1}
        if step in evals:
            row["eval/accuracy"] = evals[step]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_curve_reads_only_eval_rows(tmp_path):
    _write_metrics(tmp_path / "m.jsonl", {0: 0.1, 10: 0.2, 20: 0.35})
    assert common.eval_curve(tmp_path / "m.jsonl", prompts_per_step=16) == [
        (0, 0, 0.1), (10, 160, 0.2), (20, 320, 0.35),
    ]  # fmt: skip
    (tmp_path / "bad.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(RlloopError, match=r"bad.jsonl:2"):
        common.eval_curve(tmp_path / "bad.jsonl", 16)


def test_summarise_mean_spread_and_gain():
    runs = [
        common.RunResult("a", 0, "", 0, 10.0, [(0, 0, 0.1), (10, 160, 0.3)]),
        common.RunResult("a", 1, "", 0, 20.0, [(0, 0, 0.1), (10, 160, 0.5)]),
        common.RunResult("a", 2, "", 1, 5.0, []),  # a failed run is left out, not counted as 0
    ]
    s = common.summarise(runs)["a"]
    assert s["seeds"] == [0, 1]
    assert s["mean"] == pytest.approx([0.1, 0.4]) and s["min"] == [0.1, 0.3] and s["max"] == [0.1, 0.5]
    assert s["final_mean"] == pytest.approx(0.4) and s["final_std"] == pytest.approx(0.1)
    assert s["gain_mean"] == pytest.approx(0.3)
    assert "| a | 2 | 0.100 | 0.400 ± 0.100 | +0.300 ± 0.100 | 15 |" in common.markdown_table({"a": s})


def test_best_of_n_picks_highest_value_among_first_n():
    # prompt p: 4 samples, only the 3rd correct; the PRM ranks it highest. Prompt q: 4 samples, 1st correct,
    # PRM prefers a wrong one. Answers: p votes 7 (wrong, twice) over 9; q votes 5 (right) twice.
    rows = [
        {"uid": "p", "text": r"\boxed{7}", "correct": 0.0},
        {"uid": "p", "text": r"\boxed{7}", "correct": 0.0},
        {"uid": "p", "text": r"\boxed{9}", "correct": 1.0},
        {"uid": "p", "text": r"\boxed{8}", "correct": 0.0},
        {"uid": "q", "text": r"\boxed{5}", "correct": 1.0},
        {"uid": "q", "text": r"\boxed{4}", "correct": 0.0},
        {"uid": "q", "text": r"\boxed{5}", "correct": 1.0},
        {"uid": "q", "text": r"\boxed{3}", "correct": 0.0},
    ]
    scores = [0.1, 0.2, 0.9, 0.3, 0.4, 0.8, 0.3, 0.1]
    for i, r in enumerate(rows):  # rlloop's rollout format: uid "<prompt>/<k>", group "<prompt>"
        r["group"], r["uid"] = r["uid"], f"{r['uid']}/{i % 4}"
    b = best_of_n(rows, scores, ns=(1, 4, 16))
    assert b["bon@1"] == 0.5 and b["pass@1"] == 0.5  # first samples: p wrong, q right
    assert b["bon@4"] == 0.5  # p right (0.9), q wrong (0.8 on a wrong one)
    assert b["vote@4"] == 0.5 and b["pass@4"] == 1.0
    assert "bon@16" not in b  # no prompt has 16 samples


def test_prm_quality_markdown_table():
    kind = {"heldout": {"prm/auroc": 0.7, "prm/v_last_acc": 0.8, "prm/smoothness": 0.01},
            "best_of_n": {"bon@1": 0.1, "bon@4": 0.2, "vote@1": 0.1, "vote@4": 0.15, "pass@1": 0.1, "pass@4": 0.4}}  # fmt: skip
    md = markdown({"td0": kind, "mc": kind})
    assert "| TD(0) | 0.700 | 0.800 | 0.0100 | 0.100 | 0.200 |" in md
    assert "| pass@N (ceiling) | | | | 0.100 | 0.400 |" in md


def test_bad_arguments_are_named():
    from rlloop.experiments import data_efficiency, wprm_ablation

    with pytest.raises(RlloopError, match="unknown arm 'nope'"):
        data_efficiency.main(["--arms", "rule,nope", "--out", "/nonexistent/x"])
    with pytest.raises(RlloopError, match="--w-prm"):
        data_efficiency.main(["--w-prm", "1.5", "--arms", "rule"])
    with pytest.raises(RlloopError, match="--weights"):
        wprm_ablation.main(["--weights", "0,2"])
    with pytest.raises(RlloopError, match="--seeds"):
        common.parse_seeds("a,b")


@pytest.fixture(scope="module")
def data_efficiency_smoke(tmp_path_factory):
    from rlloop.experiments import data_efficiency

    out = tmp_path_factory.mktemp("de")
    rc = data_efficiency.main(["--smoke", "--arms", "rule,rule+td-step-online", "--out", str(out)])
    return rc, out


@pytest.mark.slow
def test_data_efficiency_smoke_runs_every_stage(data_efficiency_smoke):
    rc, out = data_efficiency_smoke
    assert rc == 0
    report = json.loads((out / "data_efficiency.json").read_text())
    assert set(report["summary"]) == {"rule", "rule+td-step-online"}
    for arm in report["summary"].values():
        assert arm["prompts_seen"] == [0, 2, 4]  # eval before, after step 1 and step 2 (2 prompts/step)
        assert all(0.0 <= a <= 1.0 for a in arm["mean"])
    assert (out / "data_efficiency.png").stat().st_size > 1000
    # the online arm really TD-updated its PRM (its version moved)
    rows = [json.loads(x) for x in (out / "runs" / "rule_td-step-online" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("prm/version", 0) for r in rows) >= 1, sorted({k for r in rows for k in r})
    assert json.loads((out / "prm_quality" / "prm_quality.json").read_text())["td0"]["path"]


@pytest.mark.slow
def test_wprm_ablation_smoke_reuses_prms(data_efficiency_smoke, tmp_path):
    from rlloop.experiments import wprm_ablation

    _, de_out = data_efficiency_smoke
    prms = de_out / "prm_quality" / "prms"
    rc = wprm_ablation.main(["--smoke", "--weights", "0.2", "--prm-dir", str(prms), "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "wprm_ablation.json").read_text())["summary"]
    assert list(summary) == ["w_prm=0.2"] and not math.isnan(summary["w_prm=0.2"]["final_mean"])
    assert (tmp_path / "wprm_ablation.png").exists()
    assert not (tmp_path / "prm_quality").exists()  # --prm-dir: no PRM retrained


def test_compare_groups_runs_by_label(tmp_path):
    from rlloop.experiments import compare

    for name, evals in {"a0": {0: 0.1, 2: 0.3}, "a1": {0: 0.1, 2: 0.5}, "b0": {0: 0.1, 2: 0.1}}.items():
        (tmp_path / name).mkdir()
        _write_metrics(tmp_path / name / "metrics.jsonl", evals)
    png = tmp_path / "cmp.png"
    runs = [f"A={tmp_path / 'a0'}", f"A={tmp_path / 'a1'}", f"B={tmp_path / 'b0'}"]
    assert compare.main([*sum((["--run", r] for r in runs), []), "--prompts-per-step", "4", "--out", str(png)]) == 0
    table = png.with_suffix(".md").read_text()
    assert "| A | 2 | 0.100 | 0.400 ± 0.100 | +0.300 ± 0.100 |" in table and "| B | 1 |" in table
    assert png.stat().st_size > 1000
    with pytest.raises(RlloopError, match="LABEL=RUN_DIR"):
        compare.main(["--run", str(tmp_path / "a0"), "--out", str(png)])


def test_prompts_to_reach_reads_the_mean_curve():
    from rlloop.experiments.credit import prompts_to_reach

    summary = {"a": {"prompts_seen": [0, 160, 320], "mean": [0.1, 0.4, 0.6]}}
    assert prompts_to_reach(summary, "a", 0.4) == 160
    assert prompts_to_reach(summary, "a", 0.05) == 0
    assert prompts_to_reach(summary, "a", 0.7) == math.inf
    # interpolated: 0.5 lies half-way between 0.4 (160 prompts) and 0.6 (320)
    assert prompts_to_reach(summary, "a", 0.5, interpolate=True) == pytest.approx(240)
    assert prompts_to_reach(summary, "a", 0.25, interpolate=True) == pytest.approx(80)
    assert prompts_to_reach(summary, "a", 0.05, interpolate=True) == 0  # already there at the start
    assert prompts_to_reach(summary, "a", 0.7, interpolate=True) == math.inf


@pytest.mark.slow
def test_credit_smoke_runs_rule_and_oracle(tmp_path):
    """The credit calibration at CI size: both arms train on the chain task and the report is written."""
    from rlloop.experiments.credit import main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "credit.json").read_text())
    assert set(report["summary"]) == {"rule", "oracle"}
    assert "prompts_to_reach" in report and (tmp_path / "credit.png").exists()


def test_train_stats_averages_first_and_last_steps_over_seeds(tmp_path):
    from rlloop.experiments import train_stats

    def write(name, rows, done=True):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        if done:
            (d / "done.json").write_text("{}")

    # seed 0: pairs 1, 2 | 3, 4 ; seed 1: pairs 3, 4 | 5, 6 ; eval rows and an unfinished run are ignored
    write("dpo-0", [{"step": 0, "eval/accuracy": 0.1}, *({"step": s, "dpo/pairs": float(s)} for s in (1, 2, 3, 4))])
    write("dpo-1", [{"step": s, "dpo/pairs": float(s + 2)} for s in (1, 2, 3, 4)])
    write("dpo-2", [{"step": 1, "dpo/pairs": 100.0}], done=False)
    write("rule-0", [{"step": 1, "reward/total": 0.5}])
    stats = train_stats.experiment_stats(tmp_path, ["dpo/pairs", "reward/total"], window=2)
    assert stats["dpo"]["seeds"] == [0, 1]
    assert stats["dpo"]["stats"]["dpo/pairs"] == pytest.approx((2.5, 4.5))
    assert math.isnan(stats["dpo"]["stats"]["reward/total"][0])
    assert stats["rule"]["stats"]["reward/total"] == pytest.approx((0.5, 0.5))
    text = train_stats.to_markdown(stats, 2)
    assert "dpo (seeds 0, 1)" in text and "reward/total" in text.split("rule")[1]
    with pytest.raises(RlloopError, match="no runs/ folder"):
        train_stats.experiment_stats(tmp_path / "runs", ["x"], 2)
