"""Scores for picking among sampled solutions: step-value aggregation and (weighted) majority vote.

Pure functions, no models: a solution is its step values V_0..V_{K-1} (from the PRM, each in (0, 1)) and
its final answer (the content of its last `\\boxed{}`, normalised by `normalize_answer`).

Aggregations (registry `AGGREGATIONS`, picked by name):
- last: V_{K-1} (TDRM's Best-of-N: the value of the final state)
- min:  min_k V_k (a chain is as good as its weakest step)
- mean: (1/K) sum_k V_k
- prod: prod_k V_k (the chance that every step is right, if the V_k were independent)
A solution with no steps scores -inf under every aggregation, so it is only chosen when nothing else is.

Ties: every selection here breaks ties by the earliest index (the first sampled solution), so results
do not depend on dict or sort order.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence

from rlloop.registry import registrar

Aggregation = Callable[[Sequence[float]], float]
AGGREGATIONS: dict[str, Aggregation] = {}
register_aggregation = registrar(AGGREGATIONS, "aggregation")

NO_STEPS = -math.inf


@register_aggregation("last")
def agg_last(values: Sequence[float]) -> float:
    return float(values[-1])


@register_aggregation("min")
def agg_min(values: Sequence[float]) -> float:
    return float(min(values))


@register_aggregation("mean")
def agg_mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


@register_aggregation("prod")
def agg_prod(values: Sequence[float]) -> float:
    return float(math.prod(values))


def aggregate(values: Sequence[float], how: str) -> float:
    """One score for a solution from its step values `[K]` (NO_STEPS = -inf when K = 0)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation {how!r} is unknown; use one of {sorted(AGGREGATIONS)}")
    if len(values) == 0:
        return NO_STEPS
    return AGGREGATIONS[how](values)


def argmax_first(scores: Sequence[float]) -> int:
    """Index of the largest score; the earliest one on ties. Raises on an empty list."""
    if len(scores) == 0:
        raise ValueError("argmax_first: no scores")
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")


def normalize_answer(answer: Optional[str]) -> Optional[str]:
    """A canonical string for voting: whitespace, `$`, `\\!`, thousands commas and a final period dropped;
    numbers written in canonical form ("042" -> "42", "3.50" -> "3.5", "2.0" -> "2"). None stays None."""
    if answer is None:
        return None
    text = answer.strip().strip("$").replace("\\!", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?", text):
        text = text.replace(",", "")
    if _NUMBER.match(text):
        if "." in text:
            value = float(text)
            text = str(int(value)) if value.is_integer() else repr(value)
        else:
            text = str(int(text))
    return text or None


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[int]:
    """Index of a solution carrying the most frequent answer (answers already normalised).

    None answers do not vote. Ties between answers go to the answer seen first; the returned index is that
    answer's first occurrence. None when no solution has an answer.
    """
    return weighted_majority_vote(answers, [1.0] * len(answers))


def weighted_majority_vote(answers: Sequence[Optional[str]], weights: Sequence[float]) -> Optional[int]:
    """Index of a solution carrying the answer with the largest total weight (e.g. PRM scores).

    answers `[N]`, weights `[N]` (non-finite weights count 0). None answers do not vote. Ties between
    answers go to the answer seen first; the returned index is that answer's first occurrence.
    """
    if len(answers) != len(weights):
        raise ValueError(f"weighted_majority_vote: {len(answers)} answers but {len(weights)} weights")
    totals: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, (a, w) in enumerate(zip(answers, weights, strict=True)):
        if a is None:
            continue
        totals[a] = totals.get(a, 0.0) + (float(w) if math.isfinite(w) else 0.0)
        first.setdefault(a, i)
    if not totals:
        return None
    best = None
    for a in first:  # insertion order = order of first appearance, so ties go to the earliest answer
        if best is None or totals[a] > totals[best]:
            best = a
    return first[best]
