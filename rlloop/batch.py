"""Rollouts -> the learner's tensors and the fusion's inputs; per-batch metrics of rollouts. Pure: no Ray.

`build_batch` lays rollouts out as right-padded [B, T] arrays (`rlloop.types.Batch`); `group_index` gives
their prompt groups as integers; `step_tensors` pads the PRM's per-step outputs to [B, K] with the token
column of each step's end and the answer step (the step holding the verifier's `\\boxed` answer).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from rlloop.algos.fusion import answer_step as _step_holding
from rlloop.errors import ConfigError, RlloopError
from rlloop.types import Batch, Rollout


def build_batch(rollouts: list[Rollout], pad_id: int) -> Batch:
    """Right-padded [B, T] arrays of prompt+response tokens; logprob arrays aligned with input_ids."""
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    B, T = len(rollouts), max(lengths)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    response_mask = np.zeros((B, T), dtype=np.float32)
    rollout_logprobs = np.zeros((B, T), dtype=np.float32)
    for b, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.response_ids)
        input_ids[b, :p] = r.prompt_ids
        input_ids[b, p : p + n] = r.response_ids
        attention_mask[b, : p + n] = 1
        response_mask[b, p : p + n] = 1.0
        rollout_logprobs[b, p : p + n] = r.rollout_logprobs
    zeros = np.zeros((B, T), dtype=np.float32)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=zeros,
        returns=zeros.copy(),
        rollout_logprobs=rollout_logprobs,
    )


def group_index(groups: list[str]) -> torch.Tensor:
    """Integer group ids [B] (in order of first appearance) for prompt uids."""
    index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    return torch.tensor([index[g] for g in groups], dtype=torch.long)


def outcomes(rollouts: list[Rollout]) -> torch.Tensor:
    """The verifier's `correct` score of each rollout [B] (float32)."""
    return torch.tensor([ro.outcome["correct"] for ro in rollouts], dtype=torch.float32)


def answer_step(rollout: Rollout) -> int:
    """Index of the first step holding a `\\boxed` answer (TDRM's answer step, found with the math
    verifier's own parser), or -1 when there is none."""
    from rlloop.rewards.verifiers.math import boxed_starts

    starts = boxed_starts(rollout.text)
    return _step_holding(rollout.step_char_ends, starts[0] if starts else None)


def step_tensors(rollouts: list[Rollout], prm_out: list[dict]) -> dict[str, torch.Tensor]:
    """Padded [B, K] step values/ends/mask, prompt values [B] and the answer step [B] (-1: none)."""
    B, K = len(rollouts), max(1, max(len(o["step_values"]) for o in prm_out))
    values = torch.zeros(B, K)
    ends = torch.zeros(B, K, dtype=torch.long)
    step_mask = torch.zeros(B, K)
    answer_steps = torch.full((B,), -1, dtype=torch.long)
    for b, (ro, out) in enumerate(zip(rollouts, prm_out)):
        v = out["step_values"]
        if len(v) != len(ro.step_ends):
            raise RuntimeError(
                f"rollout {ro.uid}: PRM returned {len(v)} step values for {len(ro.step_ends)} steps"
            )
        values[b, : len(v)] = torch.tensor(v, dtype=torch.float32)
        ends[b, : len(v)] = torch.tensor(ro.step_ends, dtype=torch.long)
        step_mask[b, : len(v)] = 1.0
        answer_steps[b] = answer_step(ro)
    prompt_value = torch.tensor([float(o["prompt_value"]) for o in prm_out])
    return {
        "values": values,
        "ends": ends,
        "mask": step_mask,
        "answer_step": answer_steps,
        "prompt_value": prompt_value,
    }


def oracle_step_values(task_name: str, samples: dict[str, Any], rollouts: list[Rollout]) -> list[dict]:
    """reward.prm.oracle: a perfect PRM's outputs from the built-in task's exact step checker (V_k = 1
    before the first wrong step, 0 from it on; the prompt's value 1), in the PRM service's format.
    samples: the prompts by uid."""
    from rlloop.tasks import BUILTIN

    task = BUILTIN[task_name]
    out = []
    for ro in rollouts:
        values = task.oracle_step_values(samples[ro.group], ro.text)
        if len(values) != len(ro.step_ends):
            raise RlloopError(
                f"rollout {ro.uid}: the step checker found {len(values)} steps, the rollout "
                f"{len(ro.step_ends)}; reward.prm.oracle needs rollout.step_delimiter={task.STEP_DELIMITER!r}"
            )
        out.append({"step_values": values, "prompt_value": 1.0})
    return out


def format_scores(rollouts: list[Rollout]) -> list[float]:
    """The verifier's `format` score of each rollout (1 when it found an answer where it looks).

    A rollout the verifier could not score (timeout, crash) has none and gets 0. A batch in which no
    rollout has one means the verifier never reports it (code, a custom function): reward.w_format needs
    one that does, so that is an error naming a sample rather than a silent 0.
    """
    if rollouts and not any("format" in ro.outcome for ro in rollouts):
        raise ConfigError(
            f"reward.w_format > 0 but the verifier reports no `format` score (sample {rollouts[0].uid} "
            f"has {sorted(rollouts[0].outcome)}); use the math or format verifier, or set reward.w_format=0"
        )
    return [float(ro.outcome.get("format", 0.0)) for ro in rollouts]


def implicit_prm_labels(rollouts: list[Rollout]) -> np.ndarray:
    """The verified outcome of each rollout as the implicit PRM's CE target, which must lie in [0, 1]."""
    labels = np.array([ro.outcome["correct"] for ro in rollouts], dtype=np.float32)
    bad = np.flatnonzero(~((labels >= 0) & (labels <= 1)))
    if bad.size:
        ro = rollouts[int(bad[0])]
        raise RlloopError(
            f"rollout {ro.uid}: verifier score {ro.outcome['correct']} is outside [0, 1]; the implicit "
            "PRM learns from σ(β Σ r_t) against the outcome, so its verifier must score in [0, 1]"
        )
    return labels


def verifier_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """verifier/unscored_frac: samples the verifier could not judge (infrastructure or data: worth an
    alert); verifier/rejected_frac: samples judged 0 for a reason of their own (no answer, ...)."""
    kinds = [ro.outcome_info.get("kind") for ro in rollouts]
    return {
        "verifier/unscored_frac": float(np.mean([k == "unscored" for k in kinds])),
        "verifier/rejected_frac": float(np.mean([k == "rejected" for k in kinds])),
    }


def rollout_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """The step's rollouts: rule reward, accuracy, lengths, the oldest policy version, verifier health
    and the mean of every named verifier score besides `correct` (`reward/<name>`)."""
    lengths = np.array([len(ro.response_ids) for ro in rollouts], dtype=np.float32)
    keys = sorted({k for ro in rollouts for k in ro.outcome if k != "correct"})
    return {
        "reward/rule": float(np.mean([ro.outcome["correct"] for ro in rollouts])),
        "accuracy": float(np.mean([ro.outcome["correct"] >= 1.0 for ro in rollouts])),
        "response_length/mean": float(lengths.mean()),
        "response_length/clip_frac": float(np.mean([ro.finish_reason == "length" for ro in rollouts])),
        "rollout/policy_version": float(min(ro.policy_version for ro in rollouts)),
        **verifier_metrics(rollouts),
        **{f"reward/{k}": float(np.mean([ro.outcome.get(k, math.nan) for ro in rollouts])) for k in keys},
    }


def format_step_values(ro: Rollout, width: int = 72) -> str:
    """A rollout's steps, one per line, each with the PRM's value V_k after it (for the console)."""
    verdict = "right" if ro.outcome.get("correct") else "wrong"
    lines = [f"PRM step values of {ro.uid} ({verdict}, gold {ro.ground_truth}):"]
    start = 0
    for end, value in zip(ro.step_char_ends, ro.step_values or [], strict=False):
        text = " ".join(ro.text[start:end].split())
        text = text if len(text) <= width else text[: width - 3] + "..."
        lines.append(f"  V={value:.3f} | {text}")
        start = end
    return "\n".join(lines)
