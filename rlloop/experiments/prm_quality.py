"""Experiment 2, PRM quality: TD(0) / n-step / TD(λ) vs ScalarPRM on the same rollouts (`arith`, `chain`).

Samples rollouts from the policy (HF engine, temperature 1) on train and held-out test prompts, verifies them
(the `\\boxed{}` integer against the ground truth), writes them in rlloop's rollout format (what
`rlloop.prm_train data.format=rollouts` reads), trains one PRM per arm from the policy's backbone with a
fresh value head and identical settings, saves each as a PRM folder (what `reward.prm.path` loads), and
reports on the held-out rollouts: AUROC of V_last against the verified outcome, V_last accuracy, smoothness
(mean |V_{k+1} - V_k|, lower is smoother), and Best-of-N accuracy at N = 1, 4, 16 (pick the sample with the
highest V_last among the first N of each prompt), next to majority vote and pass@N.

Arms: a PRM kind (how a step's target is formed) and a label source (where the value information comes from):

- label `outcome` (the default, and the only one `arith` uses): the rollout's own verified outcome ℓ, a
  one-sample Monte-Carlo label. `mc` (ScalarPRM): y_k = ℓ at every step. `td0` / `nstep` (n = 2) /
  `td_lambda` (λ = 0.7): the TD targets of `rlloop.algos.td`, bootstrapped on the PRM's own detached
  values V_{k+j}, ℓ at the terminal step.
- kind `reach` (hard labels only): TD on "can some continuation still succeed", whose Bellman backup is a
  max: G_k = max(h_k, γ((1-λ)V_{k+1} + λG_{k+1})), bootstrapped on the PRM's own detached values
  (`rlloop.algos.td.reach_targets`; λ = `--lam`, 0 for the one-step backup).
  Label `mc_hard_max`: the hard labels after that backup along each solution, h_k = max(h_k, h_{k+1}, ...)
  (the Monte-Carlo limit of `reach`; a ScalarPRM on them isolates what bootstrapping on V adds).
- label `mc_soft` / `mc_hard` (Math-Shepherd's MC estimation, soft and hard): from the prefix ending at
  each step k, `mc_samples` more completions are sampled from the policy; with the rollout's own
  continuation that is M + 1 outcomes, and m_k = their mean (soft) or 1 if any is correct (hard); the
  terminal step's label is ℓ. `mc` (ScalarPRM): y_k = m_k. `td0` / `nstep` / `td_lambda`: the SAME TD
  formulas with the MC labels m_{k+j} in place of the bootstrapped V_{k+j} (TD(0): y_k = γ·m_{k+1}), i.e.
  targets fixed before training (`TDPRMTrainer(td="labels")`). At γ = 1 and λ = 1 all coincide with ℓ.

Tasks with an exact step checker (`chain`: `rlloop.tasks.chain.first_error`, ProcessBench's convention,
-1 when every step is right) also get first-error localisation: the predicted first wrong step of a solution
is the first step with V_k < 0.5 (-1 if none); accuracy on erroneous solutions (exact step index), accuracy
on all-correct ones, and their harmonic mean F1 (ProcessBench). Also reported: the threshold and a
drop rule (first k with V_k < τ·V_{k-1}, V_{-1} = 1) chosen on a validation split of train-split prompts
(never on the test split), and bootstrap standard errors over held-out prompts.

    python -m rlloop.experiments.prm_quality --out outputs/experiments/prm_quality   # arith, ~15-30 min
    python -m rlloop.experiments.prm_quality --task chain-credit --labels outcome,mc_soft,mc_hard \\
        --prm-seeds 0,1,2 --out outputs/prm_quality_chain                             # docs/results.md §0c

Results: `<out>/prm_quality.json`, `<out>/prm_quality.md`; the trained PRMs under `<out>/prms/<arm>/`;
for chain tasks `<out>/heldout_values.json` (held-out V per arm) and `<out>/localisation.png`.

Seed ensembles (docs/results.md §0e): `--ensemble NAME=DIR,DIR,...` rescores saved PRMs (one recipe trained
with several `--prm-seeds`, each in its own `--out`) on one run's held-out and validation rollouts, alone and
with their step values averaged, and `--ensemble-size k` adds every ensemble of k members (the spread):

    python -m rlloop.experiments.prm_quality --rollouts-from RUN --out ENS --ensemble-size 3 \
        --ensemble "backed up=RUN_S0,RUN_S1,..." --ensemble "hard=..."
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

KINDS = ("td0", "nstep", "td_lambda", "mc", "reach")
LABELS = ("outcome", "mc_soft", "mc_hard", "mc_hard_max")
BON_N = (1, 4, 16)
THRESHOLD = 0.5  # ProcessBench: the first step whose value falls below it is the predicted first error
DEFAULT_MODEL = {"arith": "arith-small", "chain": "chain-small"}


def verified(text: str, ground_truth: str) -> float:
    """1.0 iff the last `\\boxed{}` of `text` is the integer `ground_truth`."""
    from rlloop.rewards.verifiers.math import last_boxed

    got = last_boxed(text)
    try:
        return float(got is not None and int(got.replace(",", "").strip()) == int(ground_truth))
    except ValueError:
        return 0.0


def step_checker(task_cfg: Any) -> Callable[[dict, str], int] | None:
    """`fn(sample.extra, text) -> index of the first wrong step (-1: all right)` for tasks that have an
    exact step checker (`first_error` and `parse_question` in their module), else None."""
    from rlloop.tasks import BUILTIN

    module = BUILTIN.get(str(getattr(task_cfg, "name", "")))
    if module is None or not hasattr(module, "first_error"):
        return None
    return lambda extra, text: module.first_error(module.parse_question(extra["question"]), text)


def sample_rollouts(
    model_path: str,
    samples,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_prompts: int = 16,
    num_threads: int = 2,
    task_cfg: Any = None,
) -> list[dict]:
    """Rollouts (as dicts of `Rollout` fields + `correct`, and `first_error` where the task has a step
    checker) of `samples`, `n` per prompt; empty ones dropped."""
    from rlloop.config import TaskConfig
    from rlloop.data import render_prompt
    from rlloop.rollout.worker import RolloutWorkerCore

    worker = RolloutWorkerCore(model_path, engine="hf", num_threads=num_threads, seed=seed)
    task_cfg = task_cfg if task_cfg is not None else TaskConfig()
    checker = step_checker(task_cfg)
    out = []
    for lo in range(0, len(samples), batch_prompts):
        chunk = samples[lo : lo + batch_prompts]
        by_uid = {s.uid: s for s in chunk}
        prompts = []
        for s in chunk:
            ids = render_prompt(s, worker.tokenizer, task_cfg)
            prompts.append(
                {
                    "uid": s.uid,
                    "prompt_ids": ids,
                    "ground_truth": s.ground_truth,
                    "data_source": s.data_source or "arith",
                    "prompt_text": worker.tokenizer.decode(ids, skip_special_tokens=False),
                }
            )
        for r in worker.generate(
            prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + lo
        ):
            if not r.step_char_ends:
                continue
            row = asdict(r)
            row["correct"] = verified(r.text, r.ground_truth)
            if checker is not None:
                row["first_error"] = checker(by_uid[r.group].extra, r.text)
            out.append(row)
        logger.info("sampled %d/%d prompts", min(lo + batch_prompts, len(samples)), len(samples))
    return out


def teacher_rollouts(model_path: str, samples, *, n: int, seed: int, task_cfg: Any) -> list[dict]:
    """`n` solutions per prompt written by the chain task's misconception teacher (the distribution its
    built-in model was pretrained to imitate), as rollout rows (`prompt_text`, `text`, `step_char_ends`,
    `correct`, `first_error`, `written`: the teacher's written results). No model is sampled: a cheap,
    exactly labelled stand-in for policy rollouts."""
    from transformers import AutoTokenizer

    from rlloop.data import render_prompt
    from rlloop.rollout.steps import split_steps
    from rlloop.tasks import chain

    tok = AutoTokenizer.from_pretrained(model_path)
    wrong = chain.task_misconceptions(task_cfg)
    error_p = chain.knobs(task_cfg)["teacher_error_p"]
    rng = random.Random(f"prm-quality-teacher-{seed}")
    out = []
    for s in samples:
        p = chain.parse_question(s.extra["question"])
        prompt_text = tok.decode(render_prompt(s, tok, task_cfg), skip_special_tokens=False)
        for i in range(n):
            text = chain.teacher_solution(p, wrong, error_p, rng)
            written = [int(step.split("=")[1]) for step in chain.split_steps(text)[:-1]]
            out.append(
                {
                    "uid": f"{s.uid}/{i}",
                    "group": s.uid,
                    "prompt_text": prompt_text,
                    "text": text,
                    "step_char_ends": [e for _, e in split_steps(text)],
                    "ground_truth": s.ground_truth,
                    "data_source": s.data_source,
                    "correct": verified(text, s.ground_truth),
                    "first_error": chain.first_error(p, text),
                    "question": s.extra["question"],
                    "written": written,
                }
            )
    return out


def _teacher_table(task_cfg: Any):
    """(wrong-result lookup, error probability) for `_teacher_finals`: table[(op, b)][a - _LO] is the wrong
    result the teacher holds for fact (a, op, b), or _NONE when it holds none."""
    from rlloop.tasks import chain

    wrong = chain.task_misconceptions(task_cfg)
    table = {
        (op, b): np.array([wrong.get((a, op, b), _NONE) for a in range(_LO, -_LO)], dtype=np.int64)
        for op in "+-"
        for b in range(1, chain.MAX_OPERAND + 1)
    }
    return table, float(chain.knobs(task_cfg)["teacher_error_p"])


_LO = -1000  # teacher values stay within +-(19 + 16 ops x (9 + 6)) on every built-in preset
_NONE = 1 << 40


def _teacher_finals(start: int, ops, m: int, table, error_p: float, rng) -> np.ndarray:
    """The final values of `m` independent teacher continuations from running value `start` through `ops`:
    `chain.teacher_values`, vectorised over the samples (the same rule: a misconception fact's wrong result
    with probability error_p, correct arithmetic otherwise, always from the value written)."""
    a = np.full(m, start, dtype=np.int64)
    for op, b in ops:
        idx = a - _LO
        if idx.min() < 0 or idx.max() >= -2 * _LO:
            raise ValueError(f"teacher value out of the lookup range: {int(a.min())}..{int(a.max())}")
        w = table[(op, b)][idx]
        err = (w != _NONE) & (rng.random(m) < error_p)
        a = np.where(err, w, a + b if op == "+" else a - b)
    return a


def _teacher_step_finals(rows: list[dict], *, m: int, seed: int, stream: int, task_cfg: Any):
    """Per row, per step: the final values of `m` teacher continuations from the value written at that
    step (the teacher carries on from what it wrote, as it does in its corpus), with the row's answer;
    None for the boxed step, whose label is the outcome."""
    from rlloop.tasks import chain

    table, error_p = _teacher_table(task_cfg)
    rng = np.random.default_rng([seed, stream])
    for r in rows:
        p = chain.parse_question(r["question"])
        yield p.answer, [
            _teacher_finals(r["written"][k], p.ops[k + 1 :], m, table, error_p, rng) if k < len(r["written"]) else None
            for k in range(len(r["step_char_ends"]))
        ]


def teacher_mc_counts(rows: list[dict], *, m: int, seed: int, task_cfg: Any) -> list[list[Any]]:
    """`mc_step_outcomes` for teacher rows, as counts: per row, per step {"successes": s, "samples": m} of
    `m` teacher continuations ([] for the boxed step). Counts, not outcome lists, so thousands of
    continuations per step stay small; vectorised with numpy (8,192 solutions x 1,024 continuations in
    about ten seconds)."""
    return [
        [[] if f is None else {"successes": int((f == answer).sum()), "samples": m} for f in steps]
        for answer, steps in _teacher_step_finals(rows, m=m, seed=seed, stream=7_301, task_cfg=task_cfg)
    ]


def teacher_mc_outcomes(rows: list[dict], *, m: int, seed: int, task_cfg: Any) -> list[list[list[float]]]:
    """`mc_step_outcomes` for teacher rows: the outcomes of `m` teacher continuations per step, in order
    ([] for the boxed step). For `label_budget`, which uses the first m of them for each m."""
    return [
        [[] if f is None else (f == answer).astype(float).tolist() for f in steps]
        for answer, steps in _teacher_step_finals(rows, m=m, seed=seed, stream=7_302, task_cfg=task_cfg)
    ]


def teacher_prompt_outcomes(rows: list[dict], *, m: int, seed: int, task_cfg: Any) -> list[list[float]]:
    """For `--prompt-value`: the outcomes of `m` teacher solutions of each row's problem from its start (the
    empty prefix's MC samples; a stream of its own, so the step labels' draws do not move)."""
    from rlloop.tasks import chain

    wrong = chain.task_misconceptions(task_cfg)
    error_p = chain.knobs(task_cfg)["teacher_error_p"]
    rng = random.Random(f"prm-quality-teacher-prompt-{seed}")
    out = []
    for r in rows:
        p = chain.parse_question(r["question"])
        out.append(
            [float(chain.teacher_values(p.start, p.ops, wrong, error_p, rng)[-1] == p.answer) for _ in range(m)]
        )
    return out


def group_prompt_outcomes(rows: list[dict]) -> list[list[float]]:
    """For `--prompt-value` on policy rollouts: the other rollouts of a row's prompt are samples from the
    empty prefix; their outcomes (mc_labels adds the row's own)."""
    by_group: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_group.setdefault(r["group"], []).append(i)
    return [[float(rows[j]["correct"]) for j in by_group[r["group"]] if j != i] for i, r in enumerate(rows)]


# ----- Monte-Carlo step labels (Math-Shepherd) ------------------------------------------------------------


def mc_step_outcomes(
    model_path: str,
    rows: list[dict],
    *,
    m: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    num_threads: int = 2,
    prefixes_per_call: int = 64,
) -> list[list[list[float]]]:
    """For every row and every non-terminal step k: the outcomes of `m` completions sampled from the
    policy after the prefix that ends at step k (the response's own tokens up to the step's end token).
    The terminal step gets [] (its label is the rollout's own outcome), and so does a prefix that already
    holds a `\\boxed{}` answer. Returns outcomes[row][k] (lists of 0/1)."""
    from rlloop.rollout.worker import RolloutWorkerCore

    worker = RolloutWorkerCore(
        model_path, engine="hf", num_threads=num_threads, seed=seed, max_batch_size=128
    )
    jobs = []  # (row index, step index, prompt dict)
    for i, r in enumerate(rows):
        for k, (tok_end, char_end) in enumerate(zip(r["step_ends"][:-1], r["step_char_ends"][:-1])):
            prefix_text = r["text"][:char_end]
            if "\\boxed" in prefix_text:
                continue
            jobs.append(
                (
                    i,
                    k,
                    {
                        "uid": f"{r['uid']}@{k}",
                        "prompt_ids": list(r["prompt_ids"]) + list(r["response_ids"][: tok_end + 1]),
                        "prefix_text": prefix_text,
                        "ground_truth": r["ground_truth"],
                    },
                )
            )
    out: list[list[list[float]]] = [[[] for _ in r["step_char_ends"]] for r in rows]
    t0 = time.perf_counter()
    for lo in range(0, len(jobs), prefixes_per_call):
        chunk = jobs[lo : lo + prefixes_per_call]
        rollouts = worker.generate(
            [p for _, _, p in chunk],
            n=m,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + lo,
        )
        for j, (i, k, p) in enumerate(chunk):
            out[i][k] = [
                verified(p["prefix_text"] + c.text, p["ground_truth"]) for c in rollouts[j * m : (j + 1) * m]
            ]
        if (lo // prefixes_per_call) % 20 == 0:
            done = min(lo + prefixes_per_call, len(jobs))
            el = time.perf_counter() - t0
            logger.info(
                "MC labels: %d/%d prefixes, %.0fs, ETA %.0fs",
                done,
                len(jobs),
                el,
                el / done * (len(jobs) - done),
            )
    return out


def _successes(samples: Sequence) -> tuple[float, int]:
    """(successes, trials) of one step's samples: a list of outcomes, or a {"successes", "samples"} count."""
    if isinstance(samples, dict):
        return float(samples["successes"]), int(samples["samples"])
    return float(sum(samples)), len(samples)


def mc_labels(row: dict, outcomes: list, hard: bool, backup: bool = False) -> list[float]:
    """m_k per step: the mean (soft) or any (hard) of the step's sampled outcomes plus the rollout's own
    outcome ℓ (its own continuation is one more sample from the policy); ℓ at steps without samples.

    `outcomes[k]` is a list of outcomes, or a {"successes", "samples"} count (`teacher_mc_counts`).
    `backup` (hard only): m_k = max(m_k, m_{k+1}, ...), the max backup of `reach` applied to the labels
    themselves (a prefix is reachable when a later prefix of the same solution is)."""
    own = float(row["correct"])
    labels = []
    for samples in outcomes:
        s, n = _successes(samples)
        s, n = s + own, n + 1
        labels.append(float(s > 0) if hard else s / n)
    if backup:
        if not hard:
            raise ValueError("mc_labels: backup applies to hard labels only")
        for k in range(len(labels) - 2, -1, -1):
            labels[k] = max(labels[k], labels[k + 1])
    return labels



def label_budget(
    rows: list[dict], ms: Sequence[int], *, seed: int, task_cfg: Any
) -> dict[str, dict[str, dict[str, float]]]:
    """How well MC labels localise the first error as the completer budget grows: for each m in `ms`,
    `localisation` (V < 0.5) of the soft and hard labels from m teacher continuations per step (plus each
    row's own outcome), against the exact first errors. The labels come from the verifier alone; the
    step checker only scores them. Teacher rows only (`--rollouts teacher`)."""
    fe = [r["first_error"] for r in rows]
    # one draw of max(ms) continuations; each m uses the first m of them (common random numbers: a hard
    # label can only turn from 0 to 1 as m grows, so the comparison across m carries no sampling noise)
    full = teacher_mc_outcomes(rows, m=max(ms), seed=seed, task_cfg=task_cfg)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in sorted(ms):
        outcomes = [[samples[:m] for samples in row] for row in full]
        out[str(m)] = {
            kind: localisation([mc_labels(r, o, hard=kind == "hard") for r, o in zip(rows, outcomes)], fe)
            for kind in ("soft", "hard")
        }
        logger.info("label budget m=%d: hard F1 %.3f, soft F1 %.3f", m, out[str(m)]["hard"]["f1"], out[str(m)]["soft"]["f1"])
    return out


def label_targets(
    kind: str, labels: Sequence[float], outcome: float, *, gamma: float, n: int, lam: float
) -> list[float]:
    """Per-step targets of PRM `kind` from MC labels m_k (module docstring): ScalarPRM y_k = m_k; TD kinds
    use `rlloop.algos.td`'s formulas with m in place of the bootstrapped values (terminal: ℓ)."""
    from rlloop.algos.td import compute_td_targets

    if kind in ("mc", "reach"):  # reach: the labels themselves, backed up against V during training
        return [float(x) for x in labels]
    values = torch.tensor([list(labels)], dtype=torch.float32)
    y = compute_td_targets(
        kind, values, torch.ones_like(values), torch.tensor([float(outcome)]), gamma=gamma, n=n, lam=lam
    )
    return y[0].tolist()


# ----- first-error localisation (ProcessBench) ------------------------------------------------------------


def predicted_first_error(
    values: Sequence[float], threshold: float = THRESHOLD, rule: str = "abs", start: float = 1.0
) -> int:
    """The predicted first wrong step: the first k with V_k < threshold (`abs`), or with
    V_k < threshold·V_{k-1}, V_{-1} = `start` (`drop`: 1, or the PRM's value of the prompt); -1 when there
    is none."""
    prev = start
    for k, v in enumerate(values):
        if (v < threshold) if rule == "abs" else (v < threshold * prev):
            return k
        prev = v
    return -1


def localisation(
    values: Sequence[Sequence[float]],
    first_errors: Sequence[int],
    threshold: float = THRESHOLD,
    rule: str = "abs",
    starts: Sequence[float] | None = None,
) -> dict[str, float]:
    """ProcessBench's metrics of a PRM's step values against the exact first errors.

    err_acc: share of erroneous solutions (first error e >= 0) whose predicted first error is exactly e;
    correct_acc: share of all-correct solutions (e = -1) predicted -1; f1: their harmonic mean. Solutions
    whose first error lies past their last step (a step is missing: the text stops early) cannot be
    localised by a per-step score and are left out (`unlocalisable`). Also, on erroneous solutions, the
    shares predicted too early (`early`) and too late or never (`late`). `starts`: V_{-1} of each solution
    for the drop rule (the prompt's value; default 1).
    """
    hit_err = hit_ok = n_err = n_ok = early = late = skipped = 0
    starts = [1.0] * len(values) if starts is None else starts
    for v, e, v0 in zip(values, first_errors, starts, strict=True):
        pred = predicted_first_error(v, threshold, rule, v0)
        if e == -1:
            n_ok += 1
            hit_ok += pred == -1
        elif e < len(v):
            n_err += 1
            hit_err += pred == e
            early += 0 <= pred < e
            late += pred == -1 or pred > e
        else:
            skipped += 1
    a = hit_err / n_err if n_err else math.nan
    b = hit_ok / n_ok if n_ok else math.nan
    f1 = 2 * a * b / (a + b) if n_err and n_ok and a + b > 0 else (0.0 if n_err and n_ok else math.nan)
    return {
        "f1": f1,
        "err_acc": a,
        "correct_acc": b,
        "early": early / n_err if n_err else math.nan,
        "late": late / n_err if n_err else math.nan,
        "n_err": float(n_err),
        "n_correct": float(n_ok),
        "unlocalisable": float(skipped),
        "threshold": float(threshold),
    }


def best_threshold(
    values: Sequence[Sequence[float]],
    first_errors: Sequence[int],
    rule: str = "abs",
    starts: Sequence[float] | None = None,
) -> float:
    """The threshold in 0.02..0.98 (step 0.02) with the highest F1 on these (validation) solutions; ties go
    to the one nearest 0.5."""
    grid = [round(0.02 * i, 2) for i in range(1, 50)]
    return max(
        grid, key=lambda t: (localisation(values, first_errors, t, rule, starts)["f1"], -abs(t - 0.5))
    )


def bootstrap_se(
    groups: Sequence[str], stat: Callable[[list[int]], float], *, reps: int = 100, seed: int = 0
) -> float:
    """Standard error of `stat(row indices)` by resampling whole prompts (their rollouts are correlated)."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    keys = list(by_group)
    rng = random.Random(seed)
    draws = []
    for _ in range(reps):
        idx = [i for _ in keys for i in by_group[rng.choice(keys)]]
        x = stat(idx)
        if not math.isnan(x):
            draws.append(x)
    return statistics.stdev(draws) if len(draws) > 1 else math.nan


def localisation_report(
    eval_rows: list[dict],
    eval_values: list[list[float]],
    val_rows: list[dict],
    val_values: list[list[float]],
    eval_prompt: list[float] | None = None,
    val_prompt: list[float] | None = None,
) -> dict[str, Any]:
    """Held-out localisation at V < 0.5, and with the threshold / drop factor chosen on validation; with
    the prompts' values (`--prompt-value`) also `dropp@val`, the drop rule from V_{-1} = V(prompt)."""
    fe = [r["first_error"] for r in eval_rows]
    groups = [r["group"] for r in eval_rows]
    out: dict[str, Any] = {"abs@0.5": localisation(eval_values, fe, THRESHOLD, "abs")}
    out["abs@0.5"]["f1_se"] = bootstrap_se(
        groups, lambda idx: localisation([eval_values[i] for i in idx], [fe[i] for i in idx])["f1"]
    )
    out["drop@0.5"] = localisation(eval_values, fe, THRESHOLD, "drop")
    if val_rows:
        vfe = [r["first_error"] for r in val_rows]
        # (key, rule, V_{-1} of each validation / held-out solution for the drop rule; None: 1)
        variants = [("abs@val", "abs", None, None), ("drop@val", "drop", None, None)]
        if eval_prompt is not None and val_prompt is not None:
            variants.append(("dropp@val", "drop", val_prompt, eval_prompt))
        for key, rule, vstart, estart in variants:
            t = best_threshold(val_values, vfe, rule, vstart)
            rep = localisation(eval_values, fe, t, rule, estart)
            rep["f1_se"] = bootstrap_se(
                groups,
                lambda idx, t=t, rule=rule, estart=estart: localisation(
                    [eval_values[i] for i in idx], [fe[i] for i in idx], t, rule,
                    None if estart is None else [estart[i] for i in idx],
                )["f1"],
            )  # fmt: skip
            rep["val_f1"] = localisation(val_values, vfe, t, rule, vstart)["f1"]
            out[key] = rep
    return out


# ----- training and evaluation ----------------------------------------------------------------------------


def train_and_eval(
    model_path: str,
    train_rows: list[dict],
    eval_rows: list[dict],
    *,
    td: str,
    lr: float,
    epochs: int,
    batch_size: int,
    gamma: float,
    seed: int,
    save_dir: Path | None = None,
    step_labels: list[list[float]] | None = None,
    val_rows: list[dict] | None = None,
    nstep: int = 2,
    lam: float = 0.7,
    prompt_value: bool = False,
) -> dict:
    """Train a PRM (fresh head on the policy backbone) on `train_rows`; metrics and Best-of-N on
    `eval_rows` (held out); saved (with the policy's tokenizer) to `save_dir` when given.

    `step_labels` (one target per step of each train row): train toward them (`td="labels"`) instead of
    `td`'s own targets. Rows with `first_error` add `localisation` (and the held-out values under
    `_values`, which the caller pops). `prompt_value`: the PRM also learns V of the prompt
    (`TDPRMTrainer(train_prompt=True)`; step_labels then start with the prompt's) and localisation adds
    the drop rule from it."""
    from transformers import AutoTokenizer

    from rlloop.rewards.prm.model import ValueHeadModel
    from rlloop.rewards.prm.td_trainer import TDPRMTrainer

    torch.manual_seed(seed)
    model = ValueHeadModel.from_backbone(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    trainer = TDPRMTrainer(
        model,
        tok,
        lr=lr,
        td=td if td == "reach" else "labels" if step_labels is not None else td,
        gamma=gamma,
        n=nstep,
        lam=lam,
        micro_batch_size=batch_size,
        weight_decay=0.001,
        train_prompt=prompt_value,
    )

    def cols(rows):
        return (
            [r["prompt_text"] for r in rows],
            [r["text"] for r in rows],
            [r["step_char_ends"] for r in rows],
            [r["correct"] for r in rows],
        )

    rng = random.Random(seed)
    order = list(range(len(train_rows)))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        rng.shuffle(order)
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            labels = {} if step_labels is None else {"step_labels": [step_labels[i] for i in idx]}
            m = trainer.step(*cols([train_rows[i] for i in idx]), **labels)
        logger.info("%s epoch %d: last batch %s", td, epoch, {k: round(v, 4) for k, v in m.items()})
    train_s = time.perf_counter() - t0
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(save_dir))
        tok.save_pretrained(str(save_dir))
    values = trainer.step_values(*cols(eval_rows)[:3], with_prompt=prompt_value)
    eval_prompt = [v[0] for v in values] if prompt_value else None
    values = [v[1:] for v in values] if prompt_value else values
    train_labels = {} if step_labels is None else {"step_labels": step_labels}
    result = {
        "td": td,
        "train_seconds": round(train_s, 1),
        "train": trainer.evaluate(*cols(train_rows), **train_labels),
        "heldout": trainer.evaluate(*cols(eval_rows)),
        "best_of_n": best_of_n(eval_rows, [v[-1] for v in values]),
        "path": str(save_dir) if save_dir is not None else None,
    }
    if step_labels is not None:
        result["labels"] = "given"
    if eval_rows and "first_error" in eval_rows[0]:
        val_values = trainer.step_values(*cols(val_rows)[:3], with_prompt=prompt_value) if val_rows else []
        val_prompt = [v[0] for v in val_values] if prompt_value else None
        val_values = [v[1:] for v in val_values] if prompt_value else val_values
        result["localisation"] = localisation_report(
            eval_rows, values, val_rows or [], val_values, eval_prompt, val_prompt
        )
        if prompt_value:
            result["_prompt_values"] = eval_prompt
        result["_values"] = values
    return result


@torch.no_grad()
def step_features(model_path: str, rows: list[dict], *, batch_size: int = 32) -> list[torch.Tensor]:
    """The policy backbone's last hidden state at each step-end token ([K, H] per row), encoded as the PRM
    trainer encodes (`TDPRMTrainer.encode`): what a value head on a frozen backbone reads."""
    from transformers import AutoTokenizer

    from rlloop.rewards.prm.model import ValueHeadModel
    from rlloop.rewards.prm.td_trainer import TDPRMTrainer

    model = ValueHeadModel.from_backbone(model_path).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    enc = TDPRMTrainer(model, tok, lr=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for lo in range(0, len(rows), batch_size):
        chunk = [
            enc.encode(r["prompt_text"], r["text"], r["step_char_ends"]) for r in rows[lo : lo + batch_size]
        ]
        T = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, e in enumerate(chunk):
            ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            att[b, : len(e.input_ids)] = 1
        hidden = model.hidden_states(ids, att).float()
        out += [hidden[b, e.step_positions].clone() for b, e in enumerate(chunk)]
        if (lo // batch_size) % 10 == 0:
            logger.info(
                "features %d/%d, %.0fs", min(lo + batch_size, len(rows)), len(rows), time.perf_counter() - t0
            )
    return out


def _pad_features(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K, H] features and [N, K] step mask (right-padded)."""
    K = max(f.shape[0] for f in feats)
    x = torch.zeros(len(feats), K, feats[0].shape[1])
    mask = torch.zeros(len(feats), K)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = 1
    return x, mask


def train_head_and_eval(
    feats: dict[str, list[torch.Tensor]],
    rows: dict[str, list[dict]],
    *,
    td: str,
    lr: float,
    epochs: int,
    batch_size: int,
    gamma: float,
    seed: int,
    step_labels: list[list[float]] | None = None,
    nstep: int = 2,
    lam: float = 0.7,
) -> dict:
    """A value head (TDRM's TD(λ) head shape: Linear(H, 2H), Tanh, Linear(2H, 1)) trained on the frozen
    policy's step features (`step_features`) with `td`'s targets (semi-gradient: the bootstrapped values
    come from the same head, detached, recomputed every mini-batch, as `TDPRMTrainer` does) or toward
    `step_labels`; the same metrics as `train_and_eval`. feats/rows: "train", "eval", "val"."""
    from rlloop.algos.td import auroc, compute_td_targets, prm_bce_loss, reach_targets, smoothness

    torch.manual_seed(seed)
    x, mask = _pad_features(feats["train"])
    outcome = torch.tensor([float(r["correct"]) for r in rows["train"]])
    labels = None
    if step_labels is not None:
        labels = torch.zeros_like(mask)
        for i, y in enumerate(step_labels):
            labels[i, : len(y)] = torch.tensor(y)
    H = x.shape[-1]
    head = torch.nn.Sequential(torch.nn.Linear(H, 2 * H), torch.nn.Tanh(), torch.nn.Linear(2 * H, 1))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.001)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            m = mask[idx]
            logits = head(x[idx]).squeeze(-1)
            if td == "reach":
                values = torch.sigmoid(logits.detach()) * m
                targets = reach_targets(values, m, outcome[idx], labels[idx], gamma=gamma, lam=lam)
            elif labels is not None:
                targets = labels[idx]
            else:
                values = torch.sigmoid(logits.detach()) * m
                targets = compute_td_targets(td, values, m, outcome[idx], gamma=gamma, n=nstep, lam=lam)
            loss = prm_bce_loss(logits, targets, m)
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0

    @torch.no_grad()
    def values_of(split: str) -> list[list[float]]:
        if not feats.get(split):
            return []
        xs, ms = _pad_features(feats[split])
        v = torch.sigmoid(head(xs).squeeze(-1))
        return [v[i, : int(ms[i].sum())].tolist() for i in range(len(v))]

    def metrics(split: str, values: list[list[float]]) -> dict[str, float]:
        K = max(len(v) for v in values)
        vt, mt = torch.zeros(len(values), K), torch.zeros(len(values), K)
        for i, v in enumerate(values):
            vt[i, : len(v)] = torch.tensor(v)
            mt[i, : len(v)] = 1
        last = torch.tensor([v[-1] for v in values])
        correct = torch.tensor([float(r["correct"]) for r in rows[split]])
        out = {
            "prm/smoothness": smoothness(vt, mt).item(),
            "prm/v_last_acc": float(((last > 0.5) == (correct > 0.5)).float().mean()),
            "prm/v_last_mean": float(last.mean()),
        }
        if 0 < float(correct.sum()) < len(correct):
            out["prm/auroc"] = auroc(last, correct)
        return out

    ev, va = values_of("eval"), values_of("val")
    result = {
        "td": td,
        "backbone": "frozen",
        "train_seconds": round(train_s, 1),
        "train": metrics("train", values_of("train")),
        "heldout": metrics("eval", ev),
        "best_of_n": best_of_n(rows["eval"], [v[-1] for v in ev]),
        "path": None,
    }
    if step_labels is not None:
        result["labels"] = "given"
    if rows["eval"] and "first_error" in rows["eval"][0]:
        result["localisation"] = localisation_report(rows["eval"], ev, rows.get("val") or [], va)
        result["_values"] = ev
    return result


def best_of_n(rows: list[dict], scores: list[float], ns: tuple[int, ...] = BON_N) -> dict[str, float]:
    """Accuracy of picking, per prompt, the highest-scored of its first N samples (ties: the first).

    Also majority vote over the first N answers and pass@N (any of them correct), the ceiling of any
    selection. Prompts with fewer than N samples are left out of that N.
    """
    from rlloop.search.aggregate import majority_vote
    from rlloop.search.bon import extract_answer

    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.get("group", r["uid"]), []).append(i)  # rollouts of one prompt share `group`
    out: dict[str, float] = {}
    for n in ns:
        picked, voted, any_ok, count = 0.0, 0.0, 0.0, 0
        for idx in groups.values():
            if len(idx) < n:
                continue
            first = idx[:n]
            best = max(first, key=lambda i: (scores[i], -i))
            picked += rows[best]["correct"]
            answers = [extract_answer(rows[i]["text"]) for i in first]
            vote = majority_vote(answers)
            voted += rows[first[vote]]["correct"] if vote is not None else 0.0
            any_ok += float(any(rows[i]["correct"] for i in first))
            count += 1
        if count:
            out[f"bon@{n}"] = picked / count
            out[f"vote@{n}"] = voted / count
            out[f"pass@{n}"] = any_ok / count
            out[f"prompts@{n}"] = float(count)
    return out


def arm_key(kind: str, label: str) -> str:
    """`td0` for the outcome label (the keys `arith` always had), `td0@mc_soft` otherwise."""
    return kind if label == "outcome" else f"{kind}@{label}"


def _setup(task: str, model_name: str | None, task_overrides: Sequence[str], model_overrides: dict | None):
    """(task config, model folder, default max_new_tokens or None). `arith` without overrides keeps the
    plain TaskConfig() this experiment always used (its numbers in docs/results.md §3 stay comparable)."""
    from rlloop.config import ModelConfig, TaskConfig
    from rlloop.models import resolve_model

    if task == "arith" and not task_overrides:
        task_cfg = TaskConfig()
        name = model_name or "arith-small"
        return task_cfg, resolve_model(ModelConfig(name=name, **(model_overrides or {})), task_cfg), None
    from omegaconf import OmegaConf

    from rlloop.train import compose_config

    overrides = [f"task={task}", *task_overrides]
    if model_name:
        overrides.append(f"model={model_name}")
    cfg = compose_config(overrides)
    if model_name is None:
        cfg.model = compose_config([f"model={DEFAULT_MODEL.get(cfg.task.name, 'arith-small')}"]).model
    if model_overrides:
        cfg.model = OmegaConf.merge(cfg.model, model_overrides)
    return cfg.task, resolve_model(cfg.model, cfg.task), int(cfg.rollout.max_new_tokens)


def _load_or_sample(path: Path, reuse: bool, sample: Callable[[], list[dict]]) -> list[dict]:
    if reuse and path.exists():
        logger.info("reusing %s", path)
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = sample()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run(
    *,
    out: str,
    train_prompts: int,
    eval_prompts: int,
    n: int,
    max_new_tokens: int | None,
    temperature: float,
    epochs: int,
    lr: float,
    batch_size: int,
    gamma: float,
    seed: int,
    model_name: str | None = "arith-small",
    eval_n: int = 16,
    kinds: tuple[str, ...] = KINDS,
    model_overrides: dict | None = None,
    task: str = "arith",
    task_overrides: Sequence[str] = (),
    labels: tuple[str, ...] = ("outcome",),
    prm_seeds: Sequence[int] | None = None,
    val_prompts: int = 0,
    mc_samples: int = 4,
    nstep: int = 2,
    lam: float = 0.7,
    reuse_rollouts: bool = False,
    backbone: str = "full",
    rollouts: str = "policy",
    label_budget_ms: Sequence[int] = (),
    prompt_value: bool = False,
    threads: int = 2,
) -> dict:
    """Sample, label, train every arm (kind × label) with every PRM seed, evaluate; see the module
    docstring. `seed` seeds the sampling; `prm_seeds` (default [seed]) the PRM trainings. Writes
    `<out>/prm_quality.json` and `.md`; returns the result dict (arm keys as `arm_key`)."""
    for label in labels:
        if label not in LABELS:
            raise ValueError(f"unknown label source {label!r}; expected one of {list(LABELS)}")
    if prompt_value and backbone == "frozen":
        raise ValueError("--prompt-value needs --backbone full (the frozen head reads step ends only)")
    torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    task_cfg, model_path, task_max_new = _setup(task, model_name, task_overrides, model_overrides)
    max_new_tokens = max_new_tokens or task_max_new or 96
    from rlloop.tasks import BUILTIN

    train_samples, test_samples = BUILTIN[str(task_cfg.name)].make_splits(task_cfg)
    t0 = time.perf_counter()
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, task_cfg=task_cfg)
    if rollouts == "teacher":

        def sample_rollouts(model_path, samples, *, n, seed, **_):  # noqa: F811 (the teacher writes them)
            return teacher_rollouts(model_path, samples, n=n, seed=seed, task_cfg=task_cfg)

    else:
        sample_rollouts = globals()["sample_rollouts"]
    train_rows = _load_or_sample(
        out_dir / "train_rollouts.jsonl",
        reuse_rollouts,
        lambda: sample_rollouts(model_path, train_samples[:train_prompts], n=n, seed=seed, **opts),
    )
    eval_rows = _load_or_sample(
        out_dir / "heldout_rollouts.jsonl",
        reuse_rollouts,
        lambda: sample_rollouts(
            model_path, test_samples[:eval_prompts], n=eval_n, seed=seed + 10_000, **opts
        ),
    )
    val_rows: list[dict] = []
    if val_prompts:
        val_samples = train_samples[train_prompts : train_prompts + val_prompts]  # never trained on
        val_rows = _load_or_sample(
            out_dir / "val_rollouts.jsonl",
            reuse_rollouts,
            lambda: sample_rollouts(model_path, val_samples, n=n, seed=seed + 20_000, **opts),
        )
    sample_s = time.perf_counter() - t0
    settings = {
        "train_prompts": train_prompts,
        "eval_prompts": eval_prompts,
        "n": n,
        "eval_n": eval_n,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "gamma": gamma,
        "seed": seed,
    }
    if task != "arith" or task_overrides:
        settings.update(
            task=task, task_overrides=list(task_overrides), labels=list(labels), val_prompts=val_prompts,
            mc_samples=mc_samples, nstep=nstep, lam=lam, prm_seeds=list(prm_seeds or [seed]),
        )  # fmt: skip
    result: dict[str, Any] = {
        "model": model_name or DEFAULT_MODEL.get(str(task_cfg.name)),
        "settings": settings,
        "rollouts": {
            "train": len(train_rows),
            "heldout": len(eval_rows),
            "train_accuracy": sum(r["correct"] for r in train_rows) / len(train_rows),
            "heldout_accuracy": sum(r["correct"] for r in eval_rows) / len(eval_rows),
            "mean_steps": sum(len(r["step_char_ends"]) for r in train_rows) / len(train_rows),
            "sample_seconds": round(sample_s, 1),
        },
    }
    if eval_rows and "first_error" in eval_rows[0]:
        fe = [r["first_error"] for r in eval_rows]
        result["rollouts"].update(
            heldout_all_steps_right=sum(e == -1 for e in fe) / len(fe),
            heldout_unlocalisable=sum(e >= len(r["step_char_ends"]) for e, r in zip(fe, eval_rows)) / len(fe),
            heldout_outcome_vs_steps_disagree=sum((e == -1) != (r["correct"] > 0.5) for e, r in zip(fe, eval_rows)) / len(fe),
            val=len(val_rows),
        )  # fmt: skip
    result["model_path"] = model_path
    mc_outcomes = None
    if any(label.startswith("mc_") for label in labels):
        path = out_dir / "mc_outcomes.json"
        t1 = time.perf_counter()
        if reuse_rollouts and path.exists():
            mc_outcomes = json.loads(path.read_text())
        else:
            if rollouts == "teacher":
                mc_outcomes = teacher_mc_counts(train_rows, m=mc_samples, seed=seed, task_cfg=task_cfg)
            else:
                mc_outcomes = mc_step_outcomes(
                    model_path, train_rows, m=mc_samples, max_new_tokens=max_new_tokens,
                    temperature=temperature, seed=seed + 30_000,
                )  # fmt: skip
            path.write_text(json.dumps(mc_outcomes))
        if prompt_value:  # the empty prefix's samples, one list per row
            ppath = out_dir / "mc_prompt_outcomes.json"
            if reuse_rollouts and ppath.exists():
                prompt_outcomes = json.loads(ppath.read_text())
            elif rollouts == "teacher":
                prompt_outcomes = teacher_prompt_outcomes(train_rows, m=mc_samples, seed=seed, task_cfg=task_cfg)
            else:
                prompt_outcomes = group_prompt_outcomes(train_rows)
            ppath.write_text(json.dumps(prompt_outcomes))
            mc_outcomes = [[po, *o] for po, o in zip(prompt_outcomes, mc_outcomes, strict=True)]
        result["rollouts"]["mc_label_seconds"] = round(time.perf_counter() - t1, 1)
        if "first_error" in train_rows[0]:  # how well the labels themselves localise (label noise)
            fe = [r["first_error"] for r in train_rows]
            first = 1 if prompt_value else 0
            lab = {kind: [mc_labels(r, o, hard=kind == "hard") for r, o in zip(train_rows, mc_outcomes)] for kind in ("soft", "hard")}  # fmt: skip
            result["label_quality"] = {f"mc_{kind}": localisation([x[first:] for x in v], fe) for kind, v in lab.items()}
            backed = [mc_labels(r, o, hard=True, backup=True)[first:] for r, o in zip(train_rows, mc_outcomes)]
            result["label_quality"]["mc_hard_max"] = localisation(backed, fe)
            if prompt_value:  # the drop rule from the prompt's label; τ chosen on these same rows (labels, not a model)
                for kind, v in lab.items():
                    steps, starts = [x[1:] for x in v], [x[0] for x in v]
                    t = best_threshold(steps, fe, "drop", starts)
                    result["label_quality"][f"mc_{kind}_dropp"] = localisation(steps, fe, t, "drop", starts)
    if label_budget_ms:
        if rollouts != "teacher":
            raise ValueError("--label-budget needs --rollouts teacher (teacher continuations are free)")
        result["label_budget"] = label_budget(train_rows, label_budget_ms, seed=seed, task_cfg=task_cfg)
    heldout_values: dict[str, list[list[float]]] = {}
    feats = None
    if backbone == "frozen" and kinds:
        path = out_dir / "features.pt"
        if reuse_rollouts and path.exists():
            feats = torch.load(path, weights_only=True)  # a dict of tensor lists, saved above
        else:
            t1 = time.perf_counter()
            feats = {
                "train": step_features(model_path, train_rows),
                "eval": step_features(model_path, eval_rows),
            }
            feats["val"] = step_features(model_path, val_rows) if val_rows else []
            torch.save(feats, path)
            result["rollouts"]["feature_seconds"] = round(time.perf_counter() - t1, 1)
        settings["backbone"] = "frozen"
    if rollouts != "policy":
        settings["rollouts"] = rollouts
    for label in labels:
        for td in kinds:
            key = arm_key(td, label)
            if td == "reach" and label not in ("mc_hard", "mc_hard_max"):
                logger.info("skipping %s: reach backs up hard labels only", key)
                continue
            step_labels = None
            if label != "outcome":
                step_labels = [
                    label_targets(
                        td,
                        mc_labels(r, o, hard=label != "mc_soft", backup=label == "mc_hard_max"),
                        r["correct"],
                        gamma=gamma,
                        n=nstep,
                        lam=lam,
                    )
                    for r, o in zip(train_rows, mc_outcomes, strict=True)
                ]
            by_seed = {}
            for s in prm_seeds or [seed]:
                if feats is not None:
                    res = train_head_and_eval(
                        feats, {"train": train_rows, "eval": eval_rows, "val": val_rows}, td=td, lr=lr,
                        epochs=epochs, batch_size=batch_size, gamma=gamma, seed=s, step_labels=step_labels,
                        nstep=nstep, lam=lam,
                    )  # fmt: skip
                else:
                    res = train_and_eval(
                        model_path, train_rows, eval_rows, td=td, lr=lr, epochs=epochs, batch_size=batch_size,
                        gamma=gamma, seed=s, save_dir=out_dir / "prms" / key if not by_seed else None,
                        step_labels=step_labels, val_rows=val_rows, nstep=nstep, lam=lam,
                        prompt_value=prompt_value,
                    )  # fmt: skip
                values = res.pop("_values", None)
                res.pop("_prompt_values", None)
                if values is not None and not by_seed:
                    heldout_values[key] = values
                by_seed[s] = res
                logger.info("%s seed %d: %s", key, s, _brief(res))
            result[key] = next(iter(by_seed.values()))
            if len(by_seed) > 1:
                result[key]["seeds"] = {
                    str(s): {k: v for k, v in r.items() if k != "path"} for s, r in by_seed.items()
                }
            (out_dir / "prm_quality.json").write_text(json.dumps(result, indent=2))  # partial results survive
    (out_dir / "prm_quality.json").write_text(json.dumps(result, indent=2))
    (out_dir / "prm_quality.md").write_text(markdown(result) + label_budget_markdown(result) + "\n")
    if heldout_values:
        (out_dir / "heldout_values.json").write_text(json.dumps(heldout_values))
        try:
            plot_localisation(eval_rows, heldout_values, out_dir / "localisation.png")
        except ImportError as e:  # matplotlib is optional
            logger.warning("no localisation plot: %s", e)
    return result


def label_budget_markdown(result: dict) -> str:
    """The MC labels' own first-error localisation per completer budget m (`--label-budget`), or ''."""
    if "label_budget" not in result:
        return ""
    lines = [
        "",
        "| MC samples per step | hard: F1 | err acc | correct acc | early | late | soft: F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, q in result["label_budget"].items():
        h = q["hard"]
        lines.append(
            f"| {m} | {h['f1']:.3f} | {h['err_acc']:.3f} | {h['correct_acc']:.3f} | {h['early']:.3f} "
            f"| {h['late']:.3f} | {q['soft']['f1']:.3f} |"
        )
    return "\n".join(lines)


def _brief(res: dict) -> str:
    h = res["heldout"]
    s = f"auroc={h.get('prm/auroc', float('nan')):.3f} smooth={h['prm/smoothness']:.4f}"
    if "localisation" in res:
        loc = res["localisation"]["abs@0.5"]
        s += f" f1@0.5={loc['f1']:.3f} (err {loc['err_acc']:.3f}, ok {loc['correct_acc']:.3f})"
        if "drop@val" in res["localisation"]:
            s += f" f1drop@val={res['localisation']['drop@val']['f1']:.3f}"
        if "dropp@val" in res["localisation"]:
            s += f" f1dropp@val={res['localisation']['dropp@val']['f1']:.3f}"
    return s


NAMES = {
    "td0": "TD(0)",
    "nstep": "n-step (n=2)",
    "td_lambda": "TD(λ=0.7)",
    "mc": "ScalarPRM (outcome labels)",
    "reach": "TD-reach (max backup)",
}
LABEL_NAMES = {
    "outcome": {"td0": "bootstrap on V", "nstep": "bootstrap on V", "td_lambda": "bootstrap on V", "mc": "ℓ"},
    "mc_soft": {k: "MC soft" for k in KINDS},
    "mc_hard": {k: "MC hard" for k in KINDS},
    "mc_hard_max": {k: "MC hard, backed up" for k in KINDS},
}


def markdown(result: dict) -> str:
    """The held-out table: one row per PRM kind (the `arith` table), or for tasks with a step checker the
    localisation table: one row per arm, mean ± sd over PRM seeds."""
    arms = [k for k in result if k.split("@")[0] in KINDS and isinstance(result[k], dict)]
    if not arms:  # kinds=(): rollouts and labels only
        return ""
    if any("localisation" in result[k] for k in arms):
        return localisation_markdown(result, arms)
    ns = [n for n in BON_N if f"bon@{n}" in next(iter(result[k] for k in KINDS if k in result))["best_of_n"]]
    head = "| PRM | AUROC(V_last) | V_last acc | smoothness | " + " | ".join(f"BoN@{n}" for n in ns) + " |"
    lines = [head, "|" + "---|" * (4 + len(ns))]
    for k in KINDS:
        if k not in result:
            continue
        h, b = result[k]["heldout"], result[k]["best_of_n"]
        lines.append(
            f"| {NAMES[k]} | {h.get('prm/auroc', float('nan')):.3f} | {h['prm/v_last_acc']:.3f} | "
            f"{h['prm/smoothness']:.4f} | " + " | ".join(f"{b[f'bon@{n}']:.3f}" for n in ns) + " |"
        )
    any_b = next(result[k]["best_of_n"] for k in KINDS if k in result)
    lines.append(
        "| majority vote (no PRM) | | | | " + " | ".join(f"{any_b[f'vote@{n}']:.3f}" for n in ns) + " |"
    )
    lines.append("| pass@N (ceiling) | | | | " + " | ".join(f"{any_b[f'pass@{n}']:.3f}" for n in ns) + " |")
    return "\n".join(lines)


def _seed_values(entry: dict, get: Callable[[dict], float]) -> list[float]:
    runs = list(entry["seeds"].values()) if "seeds" in entry else [entry]
    return [x for x in (get(r) for r in runs) if x is not None and not math.isnan(x)]


def _fmt(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def localisation_markdown(result: dict, arms: list[str]) -> str:
    """Localisation table (chain tasks): F1 at V < 0.5 with its accuracies, F1 with the validation-chosen
    threshold and drop rule, AUROC, smoothness and Best-of-4/16; mean ± sd over PRM seeds."""
    ns = [n for n in (4, 16) if f"bon@{n}" in result[arms[0]]["best_of_n"]]
    dropp = any("dropp@val" in result[k].get("localisation", {}) for k in arms)
    head = (
        "| PRM | target | F1 (V<0.5) | err acc | correct acc | F1 (τ from val) | F1 (drop, τ from val) | "
        + ("F1 (drop from V(prompt), τ from val) | " if dropp else "")
        + "AUROC(V_last) | smoothness | " + " | ".join(f"BoN@{n}" for n in ns) + " |"
    )
    lines = [head, "|" + "---|" * (9 + dropp + len(ns))]
    for key in arms:
        kind, _, label = key.partition("@")
        e = result[key]
        loc = lambda rule: lambda r: r.get("localisation", {}).get(rule, {}).get("f1")  # noqa: E731
        cells = [
            NAMES[kind].replace(" (outcome labels)", ""),
            LABEL_NAMES[label or "outcome"][kind],
            _fmt(_seed_values(e, loc("abs@0.5"))),
            _fmt(_seed_values(e, lambda r: r["localisation"]["abs@0.5"]["err_acc"])),
            _fmt(_seed_values(e, lambda r: r["localisation"]["abs@0.5"]["correct_acc"])),
            _fmt(_seed_values(e, loc("abs@val"))),
            _fmt(_seed_values(e, loc("drop@val"))),
            *([_fmt(_seed_values(e, loc("dropp@val")))] if dropp else []),
            _fmt(_seed_values(e, lambda r: r["heldout"].get("prm/auroc"))),
            _fmt(_seed_values(e, lambda r: r["heldout"]["prm/smoothness"]), 4),
            *(_fmt(_seed_values(e, lambda r, n=n: r["best_of_n"][f"bon@{n}"])) for n in ns),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    b = result[arms[0]]["best_of_n"]
    blank = "| " * (9 + dropp)
    lines.append(f"| majority vote (no PRM) {blank}" + " | ".join(f"{b[f'vote@{n}']:.3f}" for n in ns) + " |")
    lines.append(f"| pass@N (ceiling) {blank}" + " | ".join(f"{b[f'pass@{n}']:.3f}" for n in ns) + " |")
    return "\n".join(lines)


def plot_localisation(
    eval_rows: list[dict], values: dict[str, list[list[float]]], path: Path, names: dict[str, str] | None = None
) -> None:
    """Mean V_k against k - e on erroneous held-out solutions (aligned at the exact first error e), and
    mean V_k against k on all-correct ones; one line per arm (`names`: legend labels by key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for key, rows in values.items():
        rel: dict[int, list[float]] = {}
        pos: dict[int, list[float]] = {}
        for r, v in zip(eval_rows, rows, strict=True):
            e = r["first_error"]
            if e == -1:
                for k, x in enumerate(v):
                    pos.setdefault(k, []).append(x)
            elif e < len(v):
                for k, x in enumerate(v):
                    if -6 <= k - e <= 3:
                        rel.setdefault(k - e, []).append(x)
        style = "--" if "@" in key else "-"
        label = (names or {}).get(key) or (
            f"{NAMES[key.split('@')[0]].replace(' (outcome labels)', '')} "
            f"[{LABEL_NAMES[key.partition('@')[2] or 'outcome'][key.split('@')[0]]}]"
        )
        xs = sorted(rel)
        ax1.plot(xs, [statistics.mean(rel[x]) for x in xs], style, marker="o", ms=3, label=label)
        xs = sorted(k for k in pos if len(pos[k]) >= 10)
        ax2.plot(xs, [statistics.mean(pos[x]) for x in xs], style, marker="o", ms=3, label=label)
    for ax in (ax1, ax2):
        ax.axhline(THRESHOLD, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 1)
    ax1.axvline(0, color="red", lw=0.8)
    ax1.set_xlabel("step k − first error e (erroneous solutions)")
    ax1.set_ylabel("mean V_k (held out)")
    ax2.set_xlabel("step k (all-correct solutions)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def combine_plots(specs: Sequence[str], path: Path) -> None:
    """One localisation plot of the first arm of several runs on the same held-out rollouts: specs are
    `NAME=DIR` (DIR holds `heldout_rollouts.jsonl` and `heldout_values.json` of a `--out`)."""
    rows, values, names = None, {}, {}
    for spec in specs:
        name, _, d = spec.rpartition("=")
        if not d:
            raise ValueError(f"--combine {spec!r}: expected NAME=DIR")
        here = [json.loads(x) for x in (Path(d) / "heldout_rollouts.jsonl").read_text().splitlines() if x.strip()]
        if rows is not None and [r["uid"] for r in here] != [r["uid"] for r in rows]:
            raise ValueError(f"--combine: {d} has other held-out rollouts than the first run")
        rows = here
        arm, v = next(iter(json.loads((Path(d) / "heldout_values.json").read_text()).items()))
        values[f"{name}|{arm}"], names[f"{name}|{arm}"] = v, name
    plot_localisation(rows or [], values, path, names)


# ----- seed ensembles --------------------------------------------------------------------------------------


def prm_folder(path: str | Path) -> Path:
    """A PRM folder (`rlloop_prm.json` in it), or a `--out` of this experiment whose `prms/` holds exactly one."""
    p = Path(path)
    if (p / "rlloop_prm.json").exists():
        return p
    arms = sorted(q for q in (p / "prms").glob("*") if (q / "rlloop_prm.json").exists())
    if len(arms) != 1:
        found = ", ".join(a.name for a in arms) or "none"
        raise ValueError(f"{p}: not a PRM folder, and its prms/ holds {found} (need exactly one)")
    return arms[0]


@torch.inference_mode()
def score_prm(path: Path, rows: list[dict], *, batch_size: int = 64) -> list[list[float]]:
    """V_k of every step of `rows` under the saved PRM at `path` (encoded as its trainer encodes)."""
    from transformers import AutoTokenizer

    from rlloop.rewards.prm.model import ValueHeadModel
    from rlloop.rewards.prm.td_trainer import TDPRMTrainer

    model = ValueHeadModel.from_pretrained(str(path), dtype="float32").eval()
    scorer = TDPRMTrainer(model, AutoTokenizer.from_pretrained(str(path)), lr=0.0, micro_batch_size=batch_size)
    return scorer.step_values(
        [r["prompt_text"] for r in rows], [r["text"] for r in rows], [r["step_char_ends"] for r in rows]
    )


def _cached_scores(path: Path, split: str, rows: list[dict], cache: Path) -> list[list[float]]:
    """`score_prm`, kept in `cache` per PRM folder and split (checked against the rows' uids)."""
    f = cache / f"{str(path.resolve()).strip('/').replace('/', '__')}.{split}.json"
    uids = [r["uid"] for r in rows]
    weights = max(w.stat().st_mtime_ns for w in path.glob("*.safetensors"))  # a retrained PRM is rescored
    if f.exists():
        saved = json.loads(f.read_text())
        if saved["uids"] == uids and saved.get("weights") == weights:
            return saved["values"]
    t0 = time.perf_counter()
    values = score_prm(path, rows)
    logger.info("scored %d %s rows with %s in %.1f s", len(rows), split, path, time.perf_counter() - t0)
    cache.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"uids": uids, "weights": weights, "values": values}))
    return values


def mean_values(members: Sequence[list[list[float]]]) -> list[list[float]]:
    """The ensemble's V_k: the members' values averaged step by step (all members score the same rows)."""
    out = []
    for per_row in zip(*members, strict=True):
        lengths = {len(v) for v in per_row}
        if len(lengths) != 1:
            raise ValueError(f"ensemble members disagree on a row's step count: {sorted(lengths)}")
        out.append([statistics.fmean(xs) for xs in zip(*per_row)])
    return out


def _quality(eval_rows: list[dict], values: list[list[float]], val_rows: list[dict], val_values) -> dict:
    from rlloop.algos.td import auroc

    res = {"localisation": localisation_report(eval_rows, values, val_rows, val_values)}
    res["auroc"] = auroc(torch.tensor([v[-1] for v in values]), torch.tensor([float(r["correct"]) for r in eval_rows]))
    res["best_of_n"] = best_of_n(eval_rows, [v[-1] for v in values])
    return res


def ensemble_eval(
    groups: dict[str, list[str]], *, rollouts: Path, out: Path, size: int | None = None
) -> dict[str, Any]:
    """Seed ensembles of saved PRMs on the rollouts of one `prm_quality` run (`rollouts`: the folder with
    its `heldout_rollouts.jsonl` and `val_rollouts.jsonl`). For each group (name -> PRM folders, e.g. one
    recipe trained with several seeds): every member alone, the ensemble of all members (step values
    averaged), and every ensemble of `size` members (mean, sd, min and max of their F1), each scored like
    the trained arms (`localisation_report`: thresholds chosen on the validation rollouts). Writes
    `<out>/ensembles.json`, `.md` and `localisation_ensembles.png`."""
    import itertools

    def read(name: str) -> list[dict]:
        f = rollouts / name
        if not f.exists():
            raise FileNotFoundError(f"{f}: ensembles are scored on a prm_quality run's rollouts")
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]

    eval_rows, val_rows = read("heldout_rollouts.jsonl"), read("val_rollouts.jsonl")
    eval_fe, val_fe = [r["first_error"] for r in eval_rows], [r["first_error"] for r in val_rows]
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"rollouts": str(rollouts), "heldout": len(eval_rows), "val": len(val_rows)}
    plotted: dict[str, list[list[float]]] = {}
    for name, dirs in groups.items():
        paths = [prm_folder(d) for d in dirs]
        scores = [
            (_cached_scores(p, "heldout", eval_rows, out / "scores"), _cached_scores(p, "val", val_rows, out / "scores"))
            for p in paths
        ]  # fmt: skip
        k = size or len(paths)
        if not 1 <= k <= len(paths):
            raise ValueError(f"--ensemble-size {k}: group {name!r} has {len(paths)} members")
        members = [_quality(eval_rows, h, val_rows, v) for h, v in scores]
        ens_h, ens_v = mean_values([h for h, _ in scores]), mean_values([v for _, v in scores])
        subsets = []
        for combo in itertools.combinations(range(len(paths)), k):
            h = mean_values([scores[i][0] for i in combo])
            v = mean_values([scores[i][1] for i in combo])
            # localisation_report's drop@val alone (no bootstrap: only the F1s are kept)
            t = best_threshold(v, val_fe, "drop")
            f1, val_f1 = localisation(h, eval_fe, t, "drop")["f1"], localisation(v, val_fe, t, "drop")["f1"]
            subsets.append({"members": list(combo), "f1": f1, "val_f1": val_f1})
        result[name] = {
            "members": [{"path": str(p), **m} for p, m in zip(paths, members)],
            "ensemble": _quality(eval_rows, ens_h, val_rows, ens_v),
            "size": k,
            "subsets": subsets,
        }
        plotted[name] = ens_h
        logger.info("%s: ensemble of %d %s", name, len(paths), _ensemble_brief(result[name]))
    (out / "ensembles.json").write_text(json.dumps(result, indent=2))
    (out / "ensembles.md").write_text(ensemble_markdown(result) + "\n")
    try:
        names = {k: f"{k} (mean of {len(result[k]['members'])})" for k in plotted}
        plot_localisation(eval_rows, plotted, out / "localisation_ensembles.png", names)
    except ImportError as e:  # matplotlib is optional
        logger.warning("no localisation plot: %s", e)
    return result


def _ensemble_brief(entry: dict) -> str:
    loc = entry["ensemble"]["localisation"]["drop@val"]
    return f"f1drop@val={loc['f1']:.3f} (err {loc['err_acc']:.3f}, ok {loc['correct_acc']:.3f}, val {loc['val_f1']:.3f})"


def ensemble_markdown(result: dict) -> str:
    """One row per group: its members' F1 (drop rule, τ from validation), the F1 of every ensemble of
    `size` members, and the ensemble of all members with its accuracies, AUROC and Best-of-4/16."""
    head = (
        "| group | members | members' F1 (drop, τ from val) | F1 of the ensembles of k (mean ± sd, min–max) "
        "| **ensemble of all: F1 (drop, τ from val)** | err acc / correct acc | val F1 | F1 (V<0.5) "
        "| AUROC(V_last) | BoN@4 | BoN@16 |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, e in result.items():
        if not isinstance(e, dict) or "ensemble" not in e:
            continue
        f1s = [m["localisation"]["drop@val"]["f1"] for m in e["members"]]
        sub = [s["f1"] for s in e["subsets"]]
        loc = e["ensemble"]["localisation"]
        d, b = loc["drop@val"], e["ensemble"]["best_of_n"]
        lines.append(
            f"| {name} | {len(f1s)} | {_fmt(f1s)} ({', '.join(f'{x:.3f}' for x in f1s)}) "
            f"| k = {e['size']}: {_fmt(sub)}, {min(sub):.3f}–{max(sub):.3f} ({len(sub)}) "
            f"| **{d['f1']:.3f} ± {d['f1_se']:.3f}** | {d['err_acc']:.3f} / {d['correct_acc']:.3f} "
            f"| {d['val_f1']:.3f} | {loc['abs@0.5']['f1']:.3f} | {e['ensemble']['auroc']:.3f} "
            f"| {b.get('bon@4', math.nan):.3f} | {b.get('bon@16', math.nan):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/experiments/prm_quality")
    ap.add_argument("--task", default="arith", help="task preset (conf/task): arith | chain | chain-credit")
    ap.add_argument(
        "--task-override", action="append", default=[], help="Hydra override, e.g. task.max_ops=4"
    )
    ap.add_argument(
        "--model", default=None, help="built-in model name (default: the task's: arith-small | chain-small)"
    )
    ap.add_argument("--eval-n", type=int, default=16, help="samples per held-out prompt (Best-of-N up to it)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="PRM kinds to train, comma-separated")
    ap.add_argument("--labels", default="outcome", help=f"label sources, comma-separated: {','.join(LABELS)}")
    ap.add_argument("--train-prompts", type=int, default=128)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--val-prompts", type=int, default=0, help="train-split prompts for choosing thresholds")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--mc-samples", type=int, default=4, help="completions per prefix for MC step labels")
    ap.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the task's rollout setting, or 96"
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gamma", type=float, default=0.8)
    ap.add_argument("--lam", type=float, default=0.7)
    ap.add_argument("--nstep", type=int, default=2)
    ap.add_argument(
        "--seed", type=int, default=0, help="sampling seed (and the PRM seed without --prm-seeds)"
    )
    ap.add_argument("--prm-seeds", default=None, help="PRM training seeds, comma-separated, e.g. 0,1,2")
    ap.add_argument(
        "--reuse-rollouts", action="store_true", help="reuse <out>/*_rollouts.jsonl and MC labels"
    )
    ap.add_argument(
        "--backbone",
        default="full",
        choices=("full", "frozen"),
        help="full: fine-tune the policy backbone with the head (TDPRMTrainer); frozen: an MLP head on the "
        "policy's step features, computed once (much cheaper on CPU)",
    )
    ap.add_argument(
        "--rollouts",
        default="policy",
        choices=("policy", "teacher"),
        help="policy: sampled from the model; teacher: written by the chain task's misconception teacher",
    )
    ap.add_argument(
        "--label-budget",
        default="",
        help="comma-separated MC sample counts, e.g. 4,16,64,256: the first-error F1 of the MC labels "
        "themselves at each (teacher rollouts; add --kinds '' to train nothing)",
    )
    ap.add_argument(
        "--prompt-value",
        action="store_true",
        help="also train V of the prompt (the empty prefix, step -1; MC labels: its own samples) and add "
        "the drop rule from it, V_{-1} = V(prompt), to the localisation",
    )
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 to run two arms side by side on 2 cores)"
    )
    ap.add_argument(
        "--combine",
        action="append",
        default=[],
        help="NAME=DIR (repeat): plot these runs' localisation together into --out (a .png) and stop",
    )
    ap.add_argument(
        "--ensemble",
        action="append",
        default=[],
        help="NAME=DIR,DIR,... (repeat): score these saved PRMs (PRM folders, or --out folders of one arm) "
        "alone and averaged, on the rollouts in --rollouts-from, into --out, and stop",
    )
    ap.add_argument("--rollouts-from", default=None, help="with --ensemble: the run whose rollouts to score")
    ap.add_argument(
        "--ensemble-size", type=int, default=None, help="with --ensemble: also every ensemble of this many"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.combine:
        combine_plots(args.combine, Path(args.out))
        return
    if (args.rollouts_from or args.ensemble_size) and not args.ensemble:
        raise SystemExit("--rollouts-from and --ensemble-size go with --ensemble NAME=DIR,DIR,...")
    if args.ensemble:
        groups = {}
        for spec in args.ensemble:
            name, _, dirs = spec.rpartition("=")  # a name may hold "=", a folder not
            if not name or not dirs:
                raise SystemExit(f"--ensemble {spec!r}: expected NAME=DIR,DIR,...")
            groups[name] = [d for d in dirs.split(",") if d]
        if not args.rollouts_from:
            raise SystemExit("--ensemble needs --rollouts-from (the run whose held-out and val rollouts to score)")
        torch.set_num_threads(args.threads)
        res = ensemble_eval(groups, rollouts=Path(args.rollouts_from), out=Path(args.out), size=args.ensemble_size)
        print(ensemble_markdown(res))
        return
    # every flag is a run() keyword of the same name; these few are renamed or parsed further
    options = dict(vars(args))
    options.update(
        model_name=options.pop("model"),
        task_overrides=options.pop("task_override"),
        max_new_tokens=args.max_new_tokens if args.max_new_tokens or args.task != "arith" else 96,
        kinds=tuple(k for k in args.kinds.split(",") if k),
        labels=tuple(x for x in args.labels.split(",") if x),
        prm_seeds=[int(s) for s in args.prm_seeds.split(",")] if args.prm_seeds else None,
        label_budget_ms=[int(m) for m in options.pop("label_budget").split(",") if m],
    )
    for key in ("combine", "ensemble", "rollouts_from", "ensemble_size"):
        options.pop(key)
    res = run(**options)
    print(json.dumps({k: res[k] for k in ("rollouts",)}, indent=2))
    print(markdown(res))


if __name__ == "__main__":
    main()
