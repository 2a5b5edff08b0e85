"""PRM-guided step beam search (TDRM's greedy step search when top_k = 1).

Per problem, at every depth each active beam is extended by `num_branch` sampled next steps (the root,
before any step, counts as `top_k` beams so every depth samples `top_k * num_branch` steps); every new
partial solution is scored by the PRM (one pass over the whole prefix) and ranked by the value of its last
step, V_last. Extensions that finish (EOS, a `\\boxed{}` answer in the new step, or the token budget) are
set aside as leaves; the best `top_k` unfinished ones become the next depth's beams. The search stops at
`max_depth` or when no beam is left, and returns the finished leaf with the highest V_last (the best
unfinished beam when nothing finished). Ties go to the earliest sampled extension.

Generation and scoring are functions (`StepFn`, `ScoreFn`), so the search runs on rollout workers, on
Ray actors or on scripted stubs alike; each depth makes one `step_fn` and one `score_fn` call for all
problems together.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from rlloop.rollout.steps import split_steps
from rlloop.search.aggregate import argmax_first
from rlloop.search.bon import Candidate, ScoreFn

logger = logging.getLogger(__name__)


@dataclass
class StepRequest:
    """Continue `prompt` (a prompt dict) after the partial response `response_ids` / `response_text`."""

    prompt: dict
    response_ids: list[int]
    response_text: str


@dataclass
class StepOutput:
    """One sampled next step.

    text: the step as generated, with its trailing delimiter when it ended on one;
    response_ids: the whole response so far (request's + this step), ready to be continued;
    num_tokens: tokens generated for it (including any cut off after the delimiter);
    finish_reason: "step" (ended on the delimiter: more may follow) | "stop" (EOS) | "length".
    """

    text: str
    response_ids: list[int]
    num_tokens: int
    finish_reason: str


StepFn = Callable[[list[StepRequest], int], list[list[StepOutput]]]


@dataclass
class _Beam:
    response_ids: list[int]
    text: str
    value: float
    finished: bool
    finish_reason: str
    step_values: list[float] = field(default_factory=list)


@dataclass
class BeamResult:
    """The chosen solution of one problem and what the search spent on it."""

    best: Candidate
    value: float  # V_last of the chosen solution
    finished: bool
    num_tokens: int  # tokens generated for the whole search of this problem
    depth: int  # depths expanded
    num_leaves: int


class StepBeamSearch:
    """Beam search over reasoning steps, ranked by the PRM's value of the last step."""

    def __init__(
        self,
        step_fn: StepFn,
        score_fn: ScoreFn,
        *,
        top_k: int,
        num_branch: int,
        max_depth: int,
        max_new_tokens: Optional[int] = None,
        step_delimiter: str = "\n\n",
        step_regex: Optional[str] = None,
    ):
        if top_k < 1 or num_branch < 1 or max_depth < 1:
            raise ValueError(
                f"StepBeamSearch: top_k, num_branch and max_depth must be >= 1, got {top_k}, {num_branch}, {max_depth}"
            )
        self.step_fn = step_fn
        self.score_fn = score_fn
        self.top_k = top_k
        self.num_branch = num_branch
        self.max_depth = max_depth
        self.max_new_tokens = max_new_tokens
        self.step_delimiter = step_delimiter
        self.step_regex = step_regex
        self.timing = {"generate_s": 0.0, "score_s": 0.0}

    def _steps(self, text: str) -> list[int]:
        return [e for _, e in split_steps(text, self.step_delimiter, self.step_regex)]

    def run(self, prompts: Sequence[dict]) -> list[BeamResult]:
        """One `BeamResult` per prompt (prompt dicts as for the rollout worker)."""
        from rlloop.rewards.verifiers.math import last_boxed

        beams: list[list[_Beam]] = [[_Beam([], "", float("-inf"), False, "")] for _ in prompts]
        leaves: list[list[_Beam]] = [[] for _ in prompts]
        tokens = [0] * len(prompts)
        depths = [0] * len(prompts)
        for depth in range(self.max_depth):
            # one request per (problem, beam); the root stands for top_k beams
            requests, owners = [], []
            for i, bs in enumerate(beams):
                for b in bs:
                    copies = self.top_k if depth == 0 else 1
                    for _ in range(copies):
                        requests.append(StepRequest(prompts[i], b.response_ids, b.text))
                        owners.append((i, b))
            if not requests:
                break
            t0 = time.perf_counter()
            outputs = self.step_fn(requests, self.num_branch)
            t1 = time.perf_counter()
            if len(outputs) != len(requests) or any(len(o) != self.num_branch for o in outputs):
                raise RuntimeError(
                    f"step_fn returned {[len(o) for o in outputs]} steps for {len(requests)} requests x "
                    f"{self.num_branch}"
                )
            children: list[tuple[int, _Beam, list[int]]] = []
            for (i, parent), outs in zip(owners, outputs, strict=True):
                depths[i] = depth + 1
                for out in outs:
                    tokens[i] += out.num_tokens
                    text = parent.text + out.text
                    finished = out.finish_reason != "step" or last_boxed(out.text) is not None
                    reason = out.finish_reason if out.finish_reason != "step" else "stop"
                    total = len(out.response_ids)
                    if not finished and self.max_new_tokens is not None and total >= self.max_new_tokens:
                        finished, reason = True, "length"
                    child = _Beam(list(out.response_ids), text, float("-inf"), finished, reason)
                    children.append((i, child, self._steps(text)))
            scored = [c for c in children if c[2]]  # a child with no visible step yet cannot be scored
            if scored:
                values = self.score_fn(
                    [prompts[i].get("prompt_text", "") for i, _, _ in scored],
                    [b.text for _, b, _ in scored],
                    [ends for _, _, ends in scored],
                )
                for (_, b, ends), v in zip(scored, values, strict=True):
                    if len(v) != len(ends):
                        raise RuntimeError(f"score_fn returned {len(v)} values for {len(ends)} steps")
                    b.step_values = [float(x) for x in v]
                    b.value = b.step_values[-1]
            self.timing["generate_s"] += t1 - t0
            self.timing["score_s"] += time.perf_counter() - t1
            new_beams: list[list[_Beam]] = [[] for _ in prompts]
            for i, b, _ in children:
                (leaves[i] if b.finished else new_beams[i]).append(b)
            for i, bs in enumerate(new_beams):
                # stable sort: ties keep the order in which extensions were sampled
                beams[i] = sorted(bs, key=lambda b: -b.value)[: self.top_k]
            logger.info(
                "beam depth %d: %d steps sampled, %d active beams, %d leaves",
                depth + 1,
                len(children),
                sum(len(bs) for bs in beams),
                sum(len(ls) for ls in leaves),
            )
        results = []
        for i in range(len(prompts)):
            pool = leaves[i] or beams[i]
            if not pool:  # nothing was ever sampled (cannot happen with max_depth >= 1)
                pool = [_Beam([], "", float("-inf"), False, "length")]
            best = pool[argmax_first([b.value for b in pool])]
            cand = Candidate(
                text=best.text,
                step_char_ends=self._steps(best.text),
                num_tokens=tokens[i],
                finish_reason=best.finish_reason if best.finished else "length",
                step_values=best.step_values,
            )
            results.append(BeamResult(cand, best.value, best.finished, tokens[i], depths[i], len(leaves[i])))
        return results
