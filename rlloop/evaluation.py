"""Evaluation on named eval sets: per `data_source` accuracy, pass@k, maj@k and PRM Best-of-k from ONE set
of samples per prompt. Used by the trainer's periodic eval (`Trainer.evaluate`, every trainer.eval_every
steps) and by `rlloop eval` (rlloop/evaluate.py) on any model folder.

Eval sets: the task's held-out split as `test` (task.num_test caps it), plus `eval.sets` (name -> a
jsonl/parquet path, list or glob, read like task.test_path; each row keeps its own `data_source`).

Metrics, as `eval/<set>/<data_source>/<metric>` and over the whole set as `eval/<set>/<metric>`:
- `accuracy`: one greedy answer per prompt (rollout.eval_temperature), the share correct.
- `format`: the share of those greedy answers whose final answer the verifier could read (its `format`
  score; only for verifiers that report one, e.g. `math`).
- `mean`: the mean correctness of n = trainer.eval_samples samples per prompt at rollout.temperature.
- `pass@k`: the unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al. 2021 (c of the n correct).
- `maj@k`: the majority vote over the final answers (last `\\boxed{}`, else `####`, normalised) of k
  samples is right.
- `bon@k`: the sample with the highest PRM score among k is right (step values aggregated by
  eval.bon_aggregation: last | min | mean | prod); only when a PRM scores: in training the PRM service
  (reward.prm.enabled), in `rlloop eval` the folder in reward.prm.path (any adapter, reward.prm.adapter).
  maj@k and bon@k cut the n samples into n // k disjoint groups of k and average over the groups (each
  group is an independent draw of k samples, so the mean is an unbiased estimate; k = n is one group).
A sample counts as correct when its verifier's `correct` score is 1 (as the training accuracy does).
Every metric is a mean over prompts; `num_prompts` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, List, Optional

from rlloop.types import Rollout, Sample

# ----- the estimators (pure) --------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct):
    1 - C(n-c, k) / C(n, k), the unbiased pass@k estimator (Chen et al. 2021, "Evaluating LLMs trained on
    code"). Needs 1 <= k <= n and 0 <= c <= n."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass_at_k: need 1 <= k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _chunks(n: int, k: int) -> list[range]:
    return [range(i * k, (i + 1) * k) for i in range(n // k)]


def maj_at_k(correct: Sequence[float], answers: Sequence[Optional[str]], k: int) -> float:
    """Mean over the n // k disjoint groups of k samples: is the group's most frequent answer right?

    correct, answers `[n]` (answers normalised; None does not vote). A group's vote is its most frequent
    answer (ties: the one seen first); it is right when a sample carrying it is correct. A group where no
    sample has an answer scores 0.
    """
    from rlloop.search.aggregate import majority_vote

    groups = _chunks(len(correct), k)
    if not groups:
        raise ValueError(f"maj_at_k: k={k} but only {len(correct)} samples")
    total = 0.0
    for g in groups:
        pick = majority_vote([answers[i] for i in g])
        total += float(correct[g[pick]]) if pick is not None else 0.0
    return total / len(groups)


def bon_at_k(correct: Sequence[float], scores: Sequence[float], k: int) -> float:
    """Mean over the n // k disjoint groups of k samples: is the group's highest-scored sample right?
    (ties: the first; a sample without steps scores -inf)."""
    from rlloop.search.aggregate import argmax_first

    groups = _chunks(len(correct), k)
    if not groups:
        raise ValueError(f"bon_at_k: k={k} but only {len(correct)} samples")
    return sum(float(correct[g[argmax_first([scores[i] for i in g])]]) for g in groups) / len(groups)


def final_answer(text: str) -> Optional[str]:
    """The answer a vote counts: the last `\\boxed{}` (else the `####` value) of `text`, normalised."""
    from rlloop.rewards.verifiers.math import gsm8k_answer, last_boxed
    from rlloop.search.aggregate import normalize_answer

    found = last_boxed(text)
    return normalize_answer(found if found is not None else gsm8k_answer(text))


# ----- per prompt, then per set and data source ---------------------------------------------------------


@dataclass
class PromptResult:
    """One prompt's eval: its greedy answer's correctness and its n samples'."""

    uid: str
    data_source: str
    greedy_correct: Optional[float] = None
    greedy_length: Optional[int] = None  # response tokens of the greedy answer
    correct: List[float] = field(default_factory=list)
    answers: List[Optional[str]] = field(default_factory=list)
    prm_scores: Optional[List[float]] = None  # aggregated step values per sample (None: no PRM)
    greedy_format: Optional[float] = None  # the verifier's `format` score of the greedy answer, if it has one

    def metrics(self, ks: Sequence[int]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.greedy_correct is not None:
            out["accuracy"] = self.greedy_correct
        if self.greedy_format is not None:
            out["format"] = self.greedy_format
        n = len(self.correct)
        if n:
            out["mean"] = sum(self.correct) / n
            c = sum(1 for x in self.correct if x >= 1.0)
            for k in ks:
                out[f"pass@{k}"] = pass_at_k(n, c, k)
                out[f"maj@{k}"] = maj_at_k(self.correct, self.answers, k)
                if self.prm_scores is not None:
                    out[f"bon@{k}"] = bon_at_k(self.correct, self.prm_scores, k)
        return out


def _correct(ro: Rollout) -> float:
    return 1.0 if ro.outcome.get("correct", 0.0) >= 1.0 else 0.0


def prompt_results(
    samples: Sequence[Sample],
    greedy: Sequence[Rollout] | None,
    sampled: Sequence[Rollout] | None,
    *,
    prm_aggregation: Optional[str] = None,
) -> list[PromptResult]:
    """One `PromptResult` per sample from its verified rollouts (`outcome` filled; `step_values` filled
    on the sampled ones when `prm_aggregation` names how to score them)."""
    from rlloop.search.aggregate import aggregate

    results = {s.uid: PromptResult(s.uid, s.data_source) for s in samples}
    for ro in greedy or []:
        results[ro.group].greedy_correct = _correct(ro)
        results[ro.group].greedy_length = len(ro.response_ids)
        if "format" in ro.outcome:
            results[ro.group].greedy_format = float(ro.outcome["format"])
    for ro in sampled or []:
        r = results[ro.group]
        r.correct.append(_correct(ro))
        r.answers.append(final_answer(ro.text))
        if prm_aggregation is not None:
            r.prm_scores = r.prm_scores or []
            r.prm_scores.append(aggregate(ro.step_values or [], prm_aggregation))
    return list(results.values())


def set_metrics(name: str, results: Sequence[PromptResult], ks: Sequence[int]) -> dict[str, float]:
    """`eval/<name>/<data_source>/<metric>` and `eval/<name>/<metric>`: means over prompts, with
    `num_prompts`."""
    out: dict[str, float] = {}
    groups: dict[str, list[PromptResult]] = {"": list(results)}
    for r in results:
        groups.setdefault(r.data_source, []).append(r)
    for source, rs in groups.items():
        prefix = f"eval/{name}/{source}/" if source else f"eval/{name}/"
        per_prompt = [r.metrics(ks) for r in rs]
        # a metric's mean over the prompts that have it: `format` is missing where the verifier gave no
        # format score (e.g. its check timed out)
        for key in dict.fromkeys(k for m in per_prompt for k in m):
            values = [m[key] for m in per_prompt if key in m]
            out[prefix + key] = sum(values) / len(values)
        out[prefix + "num_prompts"] = float(len(rs))
    return out


def resolve_ks(ks: Sequence[int], n: int) -> list[int]:
    """The k of eval.ks (checked by rlloop.validate.check_eval), sorted; empty eval.ks: 1 and n; none
    when n = 0 (greedy only)."""
    if n <= 0:
        return []
    return sorted({int(k) for k in ks}) if ks else sorted({1, n})


# ----- the eval sets ------------------------------------------------------------------------------------


def load_eval_sets(
    cfg: Any, test_set: Sequence[Sample] | None = None, taken: Sequence[Sample] = ()
) -> dict[str, list[Sample]]:
    """`{"test": the task's held-out split (when it has one), **eval.sets}`, each a list of Samples.

    test_set: the held-out split already built (the trainer's); None builds it from cfg.task (a file
    task needs only task.test_path here). taken: samples already known by uid (the training set): an
    eval row under the uid of another prompt is a DataError (uids key the prompt cache and the verifier's
    row lookup)."""
    from rlloop.data import build_datasets, load_samples
    from rlloop.data.loader import DataError, _apply_template

    task = cfg.task
    if test_set is None:
        if task.name == "file" and not task.train_path:
            test_set = []
            if task.test_path:
                test_set = load_samples(
                    task.test_path, data_source=task.data_source, split="test", task_cfg=task
                )
                test_set = [_apply_template(s, task) for s in test_set]
        else:
            test_set = build_datasets(task)[1]
        if task.num_test and task.num_test > 0:
            test_set = list(test_set)[: task.num_test]
    sets = {"test": list(test_set)} if test_set else {}
    for name, spec in (cfg.eval.sets or {}).items():  # names checked by rlloop.validate.check_eval
        samples = load_samples(spec, data_source=task.data_source, split=str(name), task_cfg=task)
        sets[str(name)] = [_apply_template(s, task) for s in samples]
    seen = {s.uid: ("the training data", s.prompt) for s in taken}
    for name, samples in sets.items():
        for s in samples:
            where, prompt = seen.setdefault(s.uid, (f"eval set {name!r}", s.prompt))
            if prompt != s.prompt:
                raise DataError(
                    f"eval set {name!r}: uid {s.uid!r} is also in {where} with another prompt; a uid must "
                    "name one prompt across the task's data and eval.sets"
                )
    return sets


# ----- one evaluation pass ------------------------------------------------------------------------------

# (samples, n, temperature) -> verified rollouts in prompt order
GenerateFn = Callable[[list[Sample], int, float], list[Rollout]]
# rollouts -> their step values filled in place (the PRM)
ScoreFn = Callable[[list[Rollout]], None]


def evaluate_sets(
    sets: dict[str, list[Sample]],
    generate: GenerateFn,
    *,
    n: int,
    ks: Sequence[int],
    greedy_temperature: float,
    temperature: float,
    score: Optional[ScoreFn] = None,
    bon_aggregation: str = "last",
) -> tuple[dict[str, float], dict[str, list[PromptResult]]]:
    """Every set: one greedy answer per prompt, and (n > 0) n samples scored by `score` (the PRM) when
    given; returns the metrics (`set_metrics`) and each set's `PromptResult`s."""
    ks = resolve_ks(ks, n)
    metrics: dict[str, float] = {}
    per_set: dict[str, list[PromptResult]] = {}
    for name, samples in sets.items():
        if not samples:
            continue
        greedy = generate(samples, 1, greedy_temperature)
        sampled = generate(samples, n, temperature) if n > 0 else None
        if sampled and score is not None:
            score(sampled)
        results = prompt_results(
            samples, greedy, sampled, prm_aggregation=bon_aggregation if sampled and score else None
        )
        per_set[name] = results
        metrics |= set_metrics(name, results, ks)
    return metrics, per_set
