"""Best-of-N with a PRM, and the voting baselines, over solutions sampled once per problem.

`sample_and_score` draws `n_max` solutions per problem (any `SampleFn`, e.g. a rollout worker) and scores
every step with any `ScoreFn` (e.g. the PRM); `evaluate_selection` then picks, for each N <= n_max, among
the FIRST N solutions of each problem (nested subsets: N = 4 sees the N = 1 solution plus 3 more), with:
- bon_<agg>: argmax of the aggregated step values (aggregate.AGGREGATIONS: last, min, mean, prod)
- majority: the most frequent `\\boxed{}` answer
- weighted_majority: answers weighted by the aggregated PRM score (`weight_aggregation`)
- sample: the mean correctness of the N solutions (the expected accuracy of one random pick)
- oracle: 1 if any of the N is correct (pass@N, an upper bound for every selector)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from rlloop.search.aggregate import (
    aggregate,
    argmax_first,
    majority_vote,
    normalize_answer,
    weighted_majority_vote,
)

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One solution of a problem: its text, steps, cost and (once scored) step values and correctness."""

    text: str
    step_char_ends: list[int]
    num_tokens: int  # tokens generated for it (its share of the budget)
    finish_reason: str = "stop"  # stop (EOS / answer) | length
    step_values: list[float] = field(default_factory=list)
    answer: Optional[str] = None  # normalised content of the last \boxed{}
    correct: float = 0.0


# prompts (dicts with uid, prompt_ids, prompt_text, ground_truth, data_source), n -> [prompt][sample]
SampleFn = Callable[[list[dict], int], list[list[Candidate]]]
# (prompt_texts, response_texts, step_char_ends) -> step values per response
ScoreFn = Callable[[list[str], list[str], list[list[int]]], list[list[float]]]
# (response_text, ground_truth, data_source) -> 1.0 correct / 0.0 wrong
CorrectFn = Callable[[str, str, str], float]


def extract_answer(text: str) -> Optional[str]:
    """Normalised content of the last `\\boxed{}` of `text` (None when there is none)."""
    from rlloop.rewards.verifiers.math import last_boxed

    return normalize_answer(last_boxed(text))


def score_candidates(
    prompts: Sequence[dict], candidates: Sequence[Sequence[Candidate]], score_fn: ScoreFn
) -> None:
    """Fill `step_values` of every candidate in place with one `score_fn` call over all of them."""
    flat = [(p, c) for p, cs in zip(prompts, candidates, strict=True) for c in cs]
    if not flat:
        return
    values = score_fn(
        [p.get("prompt_text", "") for p, _ in flat],
        [c.text for _, c in flat],
        [list(c.step_char_ends) for _, c in flat],
    )
    if len(values) != len(flat):
        raise RuntimeError(f"score_fn returned {len(values)} results for {len(flat)} solutions")
    for (_, c), v in zip(flat, values, strict=True):
        if len(v) != len(c.step_char_ends):
            raise RuntimeError(
                f"score_fn returned {len(v)} step values for a solution with {len(c.step_char_ends)} steps"
            )
        c.step_values = [float(x) for x in v]


def grade_candidates(
    prompts: Sequence[dict], candidates: Sequence[Sequence[Candidate]], correct_fn: CorrectFn
) -> None:
    """Fill `answer` and `correct` of every candidate in place."""
    for p, cs in zip(prompts, candidates, strict=True):
        for c in cs:
            c.answer = extract_answer(c.text)
            c.correct = float(
                correct_fn(c.text, str(p.get("ground_truth", "")), str(p.get("data_source", "")))
            )


def sample_and_score(
    prompts: Sequence[dict],
    n_max: int,
    sample_fn: SampleFn,
    score_fn: Optional[ScoreFn],
    correct_fn: CorrectFn,
) -> tuple[list[list[Candidate]], dict[str, float]]:
    """`n_max` graded (and, with a `score_fn`, scored) candidates per prompt, and the seconds each phase took."""
    t0 = time.perf_counter()
    candidates = sample_fn(list(prompts), n_max)
    if len(candidates) != len(prompts) or any(len(cs) != n_max for cs in candidates):
        raise RuntimeError(
            f"sample_fn returned {[len(cs) for cs in candidates]} samples for {len(prompts)} prompts x {n_max}"
        )
    t1 = time.perf_counter()
    if score_fn is not None:
        score_candidates(prompts, candidates, score_fn)
    t2 = time.perf_counter()
    grade_candidates(prompts, candidates, correct_fn)
    timing = {"generate_s": t1 - t0, "score_s": t2 - t1, "grade_s": time.perf_counter() - t2}
    logger.info(
        "sampled %d x %d solutions in %.1fs, scored in %.1fs",
        len(prompts),
        n_max,
        timing["generate_s"],
        timing["score_s"],
    )
    return candidates, timing


def select(candidates: Sequence[Candidate], method: str, weight_aggregation: str = "last") -> Optional[int]:
    """Index of the candidate `method` picks (None: nothing to pick, e.g. no answer to vote for).

    method: bon_<aggregation> | majority | weighted_majority.
    """
    if not candidates:
        return None
    if method.startswith("bon_"):
        how = method[len("bon_") :]
        return argmax_first([aggregate(c.step_values, how) for c in candidates])
    answers = [c.answer for c in candidates]
    if method == "majority":
        return majority_vote(answers)
    if method == "weighted_majority":
        return weighted_majority_vote(
            answers, [aggregate(c.step_values, weight_aggregation) for c in candidates]
        )
    raise ValueError(f"selection method {method!r} is unknown; use bon_<agg> | majority | weighted_majority")


def evaluate_selection(
    candidates: Sequence[Sequence[Candidate]],
    ns: Sequence[int],
    methods: Sequence[str],
    weight_aggregation: str = "last",
) -> dict[str, dict[int, dict[str, float]]]:
    """`{method: {N: {"accuracy", "tokens_per_problem"}}}` over problems, each using its first N candidates.

    methods: bon_<agg> | majority | weighted_majority | sample | oracle. Tokens count all N solutions of a
    problem (every method pays for all N samples).
    """
    out: dict[str, dict[int, dict[str, float]]] = {m: {} for m in methods}
    num = len(candidates)
    for n in ns:
        if any(len(cs) < n for cs in candidates):
            raise ValueError(f"evaluate_selection: N={n} but some problem has fewer candidates")
        tokens = sum(c.num_tokens for cs in candidates for c in cs[:n]) / max(num, 1)
        for m in methods:
            total = 0.0
            for cs in candidates:
                first = cs[:n]
                if m == "sample":
                    total += sum(c.correct for c in first) / n
                elif m == "oracle":
                    total += max(c.correct for c in first)
                else:
                    i = select(first, m, weight_aggregation)
                    total += first[i].correct if i is not None else 0.0
            out[m][n] = {"accuracy": total / max(num, 1), "tokens_per_problem": tokens}
    return out
