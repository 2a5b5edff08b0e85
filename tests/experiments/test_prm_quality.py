"""rlloop.experiments.prm_quality on tasks with an exact step checker: ProcessBench-style first-error
localisation checked on hand-made examples, MC-label targets by hand, and the pipeline at CI size."""

from __future__ import annotations

import json
import math

import pytest

from rlloop.experiments.prm_quality import (
    best_threshold,
    label_targets,
    localisation,
    mc_labels,
    predicted_first_error,
)
from rlloop.tasks import chain

# Hand-made PRM outputs with known first errors (e = -1: every step right).
VALUES = [
    [0.9, 0.8, 0.3, 0.2],  # e = 2; V < 0.5 first at 2: right
    [0.9, 0.4, 0.3],  # e = 2; first at 1: too early
    [0.9, 0.9, 0.9],  # e = 1; never below: too late
    [0.7, 0.8, 0.9],  # e = -1; never below: right
    [0.6, 0.45, 0.9],  # e = -1; below at 1: wrong
    [0.9],  # e = 3: the text stops before its wrong step, not localisable by step scores
]
FIRST_ERRORS = [2, 2, 1, -1, -1, 3]


def test_predicted_first_error_rules():
    assert predicted_first_error([0.9, 0.6, 0.4, 0.1]) == 2
    assert predicted_first_error([0.9, 0.6]) == -1
    assert predicted_first_error([0.3, 0.2], threshold=0.25) == 1
    # drop rule: V_k < τ·V_{k-1} with V_{-1} = 1; a low but steady value is not an error
    assert predicted_first_error([0.3, 0.35, 0.1], rule="drop") == 0
    assert predicted_first_error([0.6, 0.35, 0.4, 0.1], rule="drop") == 3
    # from the prompt's value instead of 1: a low start is no drop at step 0
    assert predicted_first_error([0.3, 0.35, 0.1], rule="drop", start=0.3) == 2
    assert predicted_first_error([0.1, 0.35], rule="drop", start=0.3) == 0


def test_localisation_f1_by_hand():
    loc = localisation(VALUES, FIRST_ERRORS)
    # erroneous (localisable): 3, one exact -> 1/3; all-correct: 2, one predicted -1 -> 1/2
    assert loc["err_acc"] == pytest.approx(1 / 3)
    assert loc["correct_acc"] == pytest.approx(1 / 2)
    assert loc["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # = 0.4
    assert loc["f1"] == pytest.approx(0.4)
    assert (loc["n_err"], loc["n_correct"], loc["unlocalisable"]) == (3, 2, 1)
    assert loc["early"] == pytest.approx(1 / 3) and loc["late"] == pytest.approx(1 / 3)
    # the drop rule at τ = 0.5: [0.6, 0.45, 0.9] no longer flags step 1 (0.45 > 0.3) -> correct acc 1
    drop = localisation(VALUES, FIRST_ERRORS, 0.5, "drop")
    assert (drop["err_acc"], drop["correct_acc"]) == (pytest.approx(1 / 3), 1.0)
    assert drop["f1"] == pytest.approx(0.5)


def test_localisation_without_one_class_is_nan_and_oracle_is_perfect():
    assert math.isnan(localisation([[0.9, 0.1]], [1])["f1"])
    # the exact checker's first error, and a perfect PRM built from it, give F1 = 1
    p = chain.ChainProblem(start=7, ops=(("+", 5), ("-", 3), ("+", 8)))
    right = chain.solution_text(p)
    wrong = chain.format_solution(p.start, p.ops, [12, 8, 16])  # 12-3=8 is wrong (step 1)
    texts, fes = [right, wrong], [chain.first_error(p, t) for t in (right, wrong)]
    assert fes == [-1, 1]
    oracle = [
        [1.0 if e == -1 or k < e else 0.0 for k in range(len(chain.split_steps(t)))]
        for t, e in zip(texts, fes)
    ]
    assert localisation(oracle, fes)["f1"] == 1.0


def test_best_threshold_is_chosen_on_the_given_split():
    # every erroneous solution drops to 0.2 at its error, correct ones stay at 0.3: only τ in (0.2, 0.3] wins
    vals = [[0.3, 0.2, 0.2], [0.3, 0.3, 0.2], [0.3, 0.3, 0.3]]
    fes = [1, 2, -1]
    t = best_threshold(vals, fes)
    assert 0.2 < t <= 0.3
    assert localisation(vals, fes, t)["f1"] == 1.0
    assert localisation(vals, fes)["f1"] == 0.0  # at 0.5 every solution is flagged at step 0


def test_mc_labels_and_targets_by_hand():
    row = {"correct": 0.0}
    outcomes = [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], []]  # 3 samples after steps 0 and 1; terminal: none
    soft = mc_labels(row, outcomes, hard=False)
    assert soft == pytest.approx([2 / 4, 1 / 4, 0.0])  # own outcome 0 is one more sample
    assert mc_labels(row, outcomes, hard=True) == [1.0, 1.0, 0.0]
    assert label_targets("mc", soft, 0.0, gamma=0.8, n=2, lam=0.7) == pytest.approx(soft)
    # TD(0) on MC labels: y_k = γ m_{k+1}, terminal ℓ
    assert label_targets("td0", soft, 0.0, gamma=0.8, n=2, lam=0.7) == pytest.approx([0.8 * 0.25, 0.0, 0.0])
    # 2-step: y_0 = γ² m_2 = 0.64, y_1 = γ m_2 = 0.8 (the window is truncated at the terminal), y_2 = ℓ
    assert label_targets("nstep", [0.5, 0.25, 1.0], 1.0, gamma=0.8, n=2, lam=0.7) == pytest.approx(
        [0.64, 0.8, 1.0]
    )
    # TD(λ): G_2 = 1, G_1 = γ((1-λ)·1 + λ·1) = 0.8, G_0 = γ((1-λ)·0.25 + λ·0.8)
    y = label_targets("td_lambda", [0.5, 0.25, 1.0], 1.0, gamma=0.8, n=2, lam=0.7)
    assert y == pytest.approx([0.8 * (0.3 * 0.25 + 0.7 * 0.8), 0.8, 1.0])


def test_pipeline_runs_on_a_small_chain(tmp_path):
    """The whole experiment at CI size: a random-init tiny policy on 3-4-step chains, 1 epoch, outcome and
    MC labels; every arm reports localisation, AUROC fields, Best-of-N, and the plot is written."""
    from rlloop.experiments import prm_quality

    res = prm_quality.run(
        out=str(tmp_path),
        train_prompts=2,
        eval_prompts=2,
        val_prompts=1,
        n=2,
        eval_n=4,
        max_new_tokens=12,
        temperature=1.0,
        epochs=1,
        lr=3e-4,
        batch_size=4,
        gamma=0.8,
        seed=0,
        model_name="tiny",
        kinds=("td0", "mc"),
        task="chain",
        task_overrides=["task.min_ops=3", "task.max_ops=4"],
        labels=("outcome", "mc_soft"),
        mc_samples=1,
    )
    assert set(res) >= {"td0", "mc", "td0@mc_soft", "mc@mc_soft"}
    for key in ("td0", "mc@mc_soft"):
        loc = res[key]["localisation"]
        assert {"abs@0.5", "drop@0.5", "abs@val", "drop@val"} <= set(loc)
        assert loc["abs@0.5"]["threshold"] == 0.5
        assert "bon@4" in res[key]["best_of_n"]
    assert res["rollouts"]["heldout"] == 8 and "heldout_all_steps_right" in res["rollouts"]
    rows = [json.loads(x) for x in (tmp_path / "heldout_rollouts.jsonl").read_text().splitlines()]
    assert all(isinstance(r["first_error"], int) for r in rows)
    assert "| TD(0) | bootstrap on V |" in (tmp_path / "prm_quality.md").read_text()
    assert (tmp_path / "localisation.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "heldout_values.json").read_text())["td0"]) == 8
    # several runs on the same held-out rollouts in one plot (docs/results.md §0d); names may hold "="
    prm_quality.combine_plots([f"a, λ=1={tmp_path}", f"b={tmp_path}"], tmp_path / "both.png")
    assert (tmp_path / "both.png").stat().st_size > 1000
    other = tmp_path / "other"
    other.mkdir()
    (other / "heldout_rollouts.jsonl").write_text(json.dumps({**rows[0], "uid": "x"}) + "\n")
    (other / "heldout_values.json").write_text(json.dumps({"td0": [[0.5]]}))
    with pytest.raises(ValueError, match="other held-out rollouts"):
        prm_quality.combine_plots([f"a={tmp_path}", f"b={other}"], tmp_path / "bad.png")


def test_teacher_rollouts_and_frozen_heads(tmp_path):
    """The cheap path (docs/results.md §0c): teacher-written rollouts with exact labels, teacher MC step
    labels, and value heads on the frozen policy's step features; seeds give a spread."""
    from rlloop.experiments import prm_quality

    res = prm_quality.run(
        out=str(tmp_path),
        train_prompts=6,
        eval_prompts=3,
        val_prompts=2,
        n=2,
        eval_n=4,
        max_new_tokens=None,
        temperature=1.0,
        epochs=2,
        lr=1e-3,
        batch_size=8,
        gamma=1.0,
        seed=0,
        model_name="tiny",
        kinds=("td0", "mc", "reach"),
        task="chain",
        task_overrides=["task.min_ops=3", "task.max_ops=4"],
        labels=("outcome", "mc_hard"),
        mc_samples=2,
        prm_seeds=[0, 1],
        backbone="frozen",
        rollouts="teacher",
        label_budget_ms=(1, 16),
    )
    rows = [json.loads(x) for x in (tmp_path / "train_rollouts.jsonl").read_text().splitlines()]
    # the MC labels' own localisation per completer budget: nested samples, so more of them can only turn
    # a hard label from 0 to 1 (fewer too-early predictions); an all-correct solution's labels are all 1
    budget = res["label_budget"]
    assert set(budget) == {"1", "16"}
    assert budget["16"]["hard"]["early"] <= budget["1"]["hard"]["early"]
    assert budget["16"]["hard"]["late"] >= budget["1"]["hard"]["late"]
    if budget["1"]["hard"]["n_correct"]:
        assert budget["1"]["hard"]["correct_acc"] == 1.0
    assert "| 16 | " in (tmp_path / "prm_quality.md").read_text()
    p = chain.parse_question(rows[0]["question"])
    assert all(
        chain.first_error(chain.parse_question(r["question"]), r["text"]) == r["first_error"] for r in rows
    )
    assert all(len(r["step_char_ends"]) == p.num_steps or r["question"] != rows[0]["question"] for r in rows)
    assert set(res["td0@mc_hard"]["seeds"]) == {"0", "1"}
    assert "reach" not in res  # reach backs up hard labels only: no outcome-label arm
    assert "localisation" in res["reach@mc_hard"] and "| TD-reach (max backup) | MC hard |" in (
        tmp_path / "prm_quality.md"
    ).read_text()
    # the backed-up labels localise no worse on the late side than never: they can only turn 0s into 1s
    lq = res["label_quality"]
    assert lq["mc_hard_max"]["early"] <= lq["mc_hard"]["early"]
    assert res["settings"]["backbone"] == "frozen" and res["settings"]["rollouts"] == "teacher"
    assert 0.0 <= res["label_quality"]["mc_hard"]["f1"] <= 1.0
    assert "| ScalarPRM | MC hard |" in (tmp_path / "prm_quality.md").read_text()


def test_group_prompt_outcomes_are_the_other_samples():
    from rlloop.experiments.prm_quality import group_prompt_outcomes

    rows = [{"group": "a", "correct": 1.0}, {"group": "a", "correct": 0.0}, {"group": "b", "correct": 0.0},
            {"group": "a", "correct": 0.0}]  # fmt: skip
    assert group_prompt_outcomes(rows) == [[0.0, 0.0], [1.0, 0.0], [], [1.0, 0.0]]


def test_prompt_value_arms_add_the_drop_rule_from_the_prompt(tmp_path):
    """--prompt-value at CI size: the PRM learns V of the prompt from the prompt's own MC samples, the
    localisation adds the drop rule from it, and the labels' own drop-from-prompt F1 is reported."""
    from rlloop.experiments import prm_quality

    kw = dict(
        out=str(tmp_path), train_prompts=6, eval_prompts=3, val_prompts=2, n=2, eval_n=4, max_new_tokens=None,
        temperature=1.0, epochs=1, lr=1e-3, batch_size=8, gamma=1.0, seed=0, model_name="tiny",
        kinds=("td0", "mc"), task="chain", task_overrides=["task.min_ops=3", "task.max_ops=4"],
        labels=("outcome", "mc_soft"), mc_samples=3, rollouts="teacher", prompt_value=True,
    )  # fmt: skip
    res = prm_quality.run(**kw)
    prompt = json.loads((tmp_path / "mc_prompt_outcomes.json").read_text())
    assert len(prompt) == res["rollouts"]["train"] and all(len(x) == 3 for x in prompt)
    for key in ("td0", "mc@mc_soft"):
        loc = res[key]["localisation"]["dropp@val"]
        assert 0.0 <= loc["f1"] <= 1.0 and 0.02 <= loc["threshold"] <= 0.98
    assert {"mc_soft_dropp", "mc_hard_dropp"} <= set(res["label_quality"])
    assert "F1 (drop from V(prompt), τ from val)" in (tmp_path / "prm_quality.md").read_text()
    with pytest.raises(ValueError, match="--prompt-value needs --backbone full"):
        prm_quality.run(**{**kw, "backbone": "frozen"})


def test_mc_labels_from_counts_and_backed_up():
    """Counts ({"successes", "samples"}) give the same labels as the outcome lists they summarise; the
    backup turns a hard 0 into 1 when a later prefix of the same solution has a success."""
    row = {"correct": 0.0}
    lists = [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], []]
    counts = [{"successes": int(sum(x)), "samples": len(x)} for x in lists[:-1]] + [[]]
    for hard in (False, True):
        assert mc_labels(row, counts, hard=hard) == pytest.approx(mc_labels(row, lists, hard=hard))
    assert mc_labels(row, lists, hard=True) == [0.0, 1.0, 0.0, 0.0]
    assert mc_labels(row, lists, hard=True, backup=True) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="hard labels only"):
        mc_labels(row, lists, hard=False, backup=True)
    # the backed-up labels are reach's λ = 1 targets (γ = 1): the ScalarPRM on them is that TD's MC limit
    import torch

    from rlloop.algos.td import reach_targets

    h = torch.tensor([mc_labels(row, lists, hard=True)])
    lam1 = reach_targets(torch.rand_like(h), torch.ones_like(h), torch.tensor([0.0]), h, gamma=1.0, lam=1.0)
    assert lam1[0].tolist() == mc_labels(row, lists, hard=True, backup=True)
    # reach trains on the labels themselves (the backup happens against V during training)
    assert label_targets("reach", [0.0, 1.0, 0.0], 0.0, gamma=1.0, n=1, lam=0.7) == [0.0, 1.0, 0.0]


def test_vectorised_teacher_is_the_teacher():
    """`_teacher_finals` follows `chain.teacher_values`: exactly where the teacher is deterministic
    (error_p 0 or 1), and in distribution (success rate within 4 standard errors) in between."""
    import random

    import numpy as np
    from omegaconf import OmegaConf

    from rlloop.experiments.prm_quality import _teacher_finals, _teacher_table

    cfg = OmegaConf.create({"name": "chain", "min_ops": 8, "max_ops": 12, "misconception_frac": 0.5, "seed": 3})
    table, _ = _teacher_table(cfg)
    wrong = chain.task_misconceptions(cfg)
    problems = chain.generate_problems(20, seed="vec", min_ops=8, max_ops=12)
    rng = np.random.default_rng(0)
    for p in problems:
        for error_p in (0.0, 1.0):
            got = _teacher_finals(p.start, p.ops, 3, table, error_p, rng)
            want = chain.teacher_values(p.start, p.ops, wrong, error_p, random.Random(0))[-1]
            assert got.tolist() == [want] * 3
    p = next(q for q in problems if 0.05 < np.mean(_teacher_finals(q.start, q.ops, 4000, table, 0.5, rng) == q.answer) < 0.95)
    fast = float(np.mean(_teacher_finals(p.start, p.ops, 20_000, table, 0.5, rng) == p.answer))
    py = random.Random(1)
    slow = sum(chain.teacher_values(p.start, p.ops, wrong, 0.5, py)[-1] == p.answer for _ in range(20_000)) / 20_000
    se = math.sqrt(fast * (1 - fast) / 20_000 + slow * (1 - slow) / 20_000)
    assert abs(fast - slow) < 4 * se


def test_mean_values_by_hand():
    from rlloop.experiments.prm_quality import mean_values

    a = [[0.9, 0.5], [0.2]]
    b = [[0.7, 0.1], [0.4]]
    got = mean_values([a, b])
    assert [len(r) for r in got] == [2, 1]
    assert [v for r in got for v in r] == pytest.approx([0.8, 0.3, 0.3])
    assert mean_values([a]) == a
    with pytest.raises(ValueError, match="step count"):
        mean_values([a, [[0.7], [0.4]]])


def test_seed_ensembles_of_saved_prms(tmp_path):
    """--ensemble (docs/results.md §0d): saved PRMs rescored on a run's rollouts reproduce the run's own
    held-out values and localisation; an ensemble of one PRM twice is that PRM; two seeds are averaged
    step by step; the CLI writes the table and the plot; a folder that is no PRM is named."""
    from rlloop.experiments import prm_quality

    kw = dict(
        train_prompts=6, eval_prompts=3, val_prompts=2, n=2, eval_n=4, max_new_tokens=None, temperature=1.0,
        epochs=1, lr=1e-3, batch_size=8, gamma=1.0, seed=0, model_name="tiny", kinds=("mc",), task="chain",
        task_overrides=["task.min_ops=3", "task.max_ops=4"], labels=("mc_hard",), mc_samples=2, rollouts="teacher",
    )  # fmt: skip
    runs = {}
    for s in (0, 1):
        out = tmp_path / f"s{s}"
        out.mkdir()
        if s:  # the same rollouts and labels, another PRM seed (as docs/results.md §0d's runs)
            for f in ("train_rollouts.jsonl", "heldout_rollouts.jsonl", "val_rollouts.jsonl", "mc_outcomes.json"):
                (out / f).write_text((tmp_path / "s0" / f).read_text())
        runs[s] = prm_quality.run(out=str(out), prm_seeds=[s], reuse_rollouts=bool(s), **kw)
    s0, s1 = str(tmp_path / "s0"), str(tmp_path / "s1")
    res = prm_quality.ensemble_eval(
        {"one twice": [s0, s0], "two seeds": [s0, s1]}, rollouts=tmp_path / "s0", out=tmp_path / "ens", size=1
    )
    saved = json.loads((tmp_path / "s0" / "heldout_values.json").read_text())["mc@mc_hard"]
    rows = [json.loads(x) for x in (tmp_path / "s0" / "heldout_rollouts.jsonl").read_text().splitlines()]
    rescored = prm_quality.score_prm(prm_quality.prm_folder(s0), rows)
    assert [v for r in rescored for v in r] == pytest.approx([v for r in saved for v in r], abs=1e-5)
    member = res["two seeds"]["members"][0]["localisation"]["drop@val"]
    assert member["f1"] == pytest.approx(runs[0]["mc@mc_hard"]["localisation"]["drop@val"]["f1"], nan_ok=True)
    twice = res["one twice"]["ensemble"]["localisation"]["drop@val"]
    assert twice["f1"] == pytest.approx(member["f1"], nan_ok=True) and twice["threshold"] == member["threshold"]
    assert [s["members"] for s in res["two seeds"]["subsets"]] == [[0], [1]]
    other = prm_quality.score_prm(prm_quality.prm_folder(s1), rows)
    both = prm_quality.mean_values([rescored, other])
    assert both[0][0] == pytest.approx((rescored[0][0] + other[0][0]) / 2, abs=1e-6)
    assert rescored != other  # two seeds are two PRMs
    prm_quality.main(["--ensemble", f"a, λ=1={s0},{s1}", "--rollouts-from", s0, "--out", str(tmp_path / "cli")])
    assert "| a, λ=1 | 2 |" in (tmp_path / "cli" / "ensembles.md").read_text()
    assert (tmp_path / "cli" / "localisation_ensembles.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="not a PRM folder"):
        prm_quality.prm_folder(tmp_path)
    with pytest.raises(SystemExit, match="go with --ensemble"):
        prm_quality.main(["--rollouts-from", s0, "--out", str(tmp_path / "cli")])
