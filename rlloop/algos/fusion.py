"""Reward fusion (config `reward.fusion=`): the scores of the reward sources -> what the learner trains on.

  outcome  TDRM's released recipe: one scalar per sample, R = w_rule * outcome + w_prm * g(V), V the PRM's
           value of the prefix before the answer step; the caller places R on the last token and runs an
           advantage estimator (grpo in TDRM).
  step     dense: a process reward per reasoning step at the step's last token, the outcome at the last
           token; each source normalised on its own, returns by reverse cumulative sum, weighted sum
           (PRIME-style) -> advantages and returns directly.
  token    a per-token reward (e.g. Q-RM) added with a weight -> token rewards for an estimator.
  first_error  GRPO's outcome advantage with a wrong solution's blame starting at its first doubted step.
  min      PURE's min-form credit (arXiv 2504.15275): softmin-weighted step rewards, leave-one-out
           baselines, plus a verifiable-reward share -> advantages and returns directly.
  prime    PRIME (arXiv 2502.01456): leave-one-out advantages per source (outcome, implicit-PRM token
           rewards), weighted sum, whitened (`prime_advantages`).

`FUSIONS` (the end of this file) is the registry that reward.fusion picks from: each entry a pure function
of one batch's tensors (`FusionInputs`: token mask, step boundaries, outcome, step values, token rewards)
returning token rewards, advantages, returns and metrics (`Fused`). Adding a fusion is one
`@register_fusion` function and a test; rlloop.validate reads the names and needs from the registry.

Every fusion function takes an optional `metrics` dict and fills it with each component's mean, std and
correlation with the outcome (`fusion_stats`), so each source is logged on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rlloop.errors import ConfigError, RlloopError

from .checks import (
    check_choice,
    check_finite,
    check_group_ids,
    check_mask,
    check_range,
    check_shape,
    check_tensor,
)
from .masked import discounted_returns, group_mean_std, last_token_index, masked_mean_std, masked_whiten

# The choices of the fusion keys, the one list of each (rlloop.validate reads them from here; reward.fusion's
# are the names in FUSIONS, the registry at the end of this file).
PRM_TRANSFORMS = ("logit", "sigmoid")  # reward.prm.g
STEP_PROCESSES = ("value", "shaping")  # reward.step_process
STEP_NORMS = ("group", "batch", "none")  # reward.step_norm
TOKEN_NORMS = ("none", "std")  # reward.token_norm

_LOGIT_CLAMP = 1e-6  # V is clamped to [c, 1-c] before the logit: |g| <= 13.8 instead of inf at V in {0, 1}


def _check_rows(name: str, x: object, batch: int | None = None) -> Tensor:
    x = check_tensor(name, x, ndim=1, float_dtype=True)
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected ({batch},) (batch size)")
    check_finite(name, x)
    return x


def fusion_stats(components: dict[str, Tensor], outcome: Tensor) -> dict[str, float]:
    """Mean, std (unbiased) and Pearson correlation with the outcome of each per-sample component [B].

    Keys: f"{name}/mean", f"{name}/std", f"{name}/corr_outcome". The correlation is NaN when either
    side is constant or B < 2 (it is undefined there, and 0 would read as "uncorrelated").
    """
    outcome = _check_rows("outcome", outcome)
    out: dict[str, float] = {}
    o = outcome.double()
    for name, comp in components.items():
        c = _check_rows(f"components[{name!r}]", comp, outcome.shape[0]).double()
        n = c.numel()
        out[f"{name}/mean"] = float(c.mean()) if n else math.nan
        out[f"{name}/std"] = float(c.std()) if n >= 2 else math.nan
        corr = math.nan
        if n >= 2:
            dc, do = c - c.mean(), o - o.mean()
            denom = float(dc.norm() * do.norm())
            if denom > 1e-12:
                corr = float((dc * do).sum()) / denom
        out[f"{name}/corr_outcome"] = corr
    return out


def _record(metrics: dict[str, float] | None, components: dict[str, Tensor], outcome: Tensor) -> None:
    if metrics is not None:
        metrics.update({f"fusion/{k}": v for k, v in fusion_stats(components, outcome).items()})


def place_on_last_token(scores: Tensor, response_mask: Tensor) -> Tensor:
    """Put each row's scalar score on its last response token: [B], [B, T] -> [B, T].

    Rows with no response token get nothing (there is no action to credit).
    """
    scores = _check_rows("scores", scores)
    response_mask = check_mask("response_mask", response_mask)
    if response_mask.dim() != 2 or response_mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"response_mask has shape {tuple(response_mask.shape)}, expected ({scores.shape[0]}, T) (rows of scores)"
        )
    out = torch.zeros(response_mask.shape, dtype=scores.dtype, device=scores.device)
    last = last_token_index(response_mask)
    rows = (last >= 0).nonzero().squeeze(-1)
    out[rows, last[rows]] = scores[rows]
    return out


def place_response_rewards(values: Sequence[Sequence[float]], response_mask: Tensor) -> Tensor:
    """Per-response-token rewards of each row onto its response positions: B lists, [B, T] -> [B, T].

    values[b][i] belongs to row b's i-th response token, i.e. to the i-th position where
    response_mask[b] is 1 (Batch alignment: entry t is token t). A scorer that returned a different
    number of values than the row has response tokens is an error naming the row (the rewards would
    land on the wrong tokens).
    """
    response_mask = check_mask("response_mask", response_mask)
    if response_mask.dim() != 2 or response_mask.shape[0] != len(values):
        raise ValueError(
            f"response_mask has shape {tuple(response_mask.shape)}, expected ({len(values)}, T) (one row per "
            "list of values)"
        )
    out = torch.zeros(response_mask.shape, dtype=torch.float32)
    for b, row in enumerate(values):
        positions = response_mask[b].bool().nonzero().squeeze(-1)
        if len(row) != positions.numel():
            raise ValueError(f"row {b}: {len(row)} token rewards for {positions.numel()} response tokens")
        if positions.numel():
            out[b, positions] = torch.as_tensor(row, dtype=torch.float32)
    check_finite("token_rewards", out)
    return out


def prm_transform(prm_value: Tensor, g: str) -> Tensor:
    """g(V): "logit" = log(V / (1 - V)) (TDRM's release uses the raw logit), "sigmoid" = V itself."""
    check_choice("reward.prm.g", g, PRM_TRANSFORMS)
    bad = (prm_value < 0) | (prm_value > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"prm_value must be a probability in [0, 1], got {prm_value[i].item()} at row {i}")
    if g == "sigmoid":
        return prm_value
    v = prm_value.clamp(_LOGIT_CLAMP, 1 - _LOGIT_CLAMP)
    return torch.log(v) - torch.log1p(-v)


def outcome_fusion(
    outcome: Tensor,
    prm_value: Tensor | None,
    *,
    w_rule: float,
    w_prm: float,
    g: str = "logit",
    metrics: dict[str, float] | None = None,
) -> Tensor:
    """TDRM's recipe: R_b = w_rule * outcome_b + w_prm * g(V_b), one scalar per sample [B] -> [B].

    prm_value: V in [0, 1] of the prefix before the answer step (`value_before_answer_step`), or None
    for outcome only (then w_prm must be 0).
    """
    outcome = _check_rows("outcome", outcome)
    components = {"outcome": outcome}
    fused = w_rule * outcome
    if prm_value is None:
        if w_prm != 0:
            raise ValueError(f"reward.w_prm={w_prm} but prm_value is None (no PRM scores for this batch)")
    else:
        prm_value = _check_rows("prm_value", prm_value, outcome.shape[0])
        g_v = prm_transform(prm_value, g).to(outcome.dtype)
        components["prm"] = g_v
        fused = fused + w_prm * g_v
    components["fused"] = fused
    _record(metrics, components, outcome)
    return fused


def value_before_answer_step(
    step_values: Tensor, step_mask: Tensor, answer_step: Tensor, prompt_value: Tensor | None = None
) -> Tensor:
    """V of the prefix that precedes the answer step (TDRM: the first "\\n\\n" segment holding \\boxed).

    step_values, step_mask: [B, K] (V_k = value after step k); answer_step: [B] long, the answer step's
    index, or -1 when there is none (then the whole completion: the last valid step's V). An answer in
    step 0 means the prefix is empty: prompt_value [B] if given, else 0.5 (logit 0, neutral).
    """
    step_values = check_tensor("step_values", step_values, ndim=2, float_dtype=True)
    B, K = step_values.shape
    step_mask = check_mask("step_mask", step_mask, (B, K), like="step_values").bool()
    answer_step = check_tensor("answer_step", answer_step, ndim=1)
    check_shape("answer_step", answer_step, (B,), like="rows of step_values")
    num_steps = step_mask.sum(-1)
    too_far = answer_step >= num_steps
    if bool(too_far.any()):
        i = int(too_far.nonzero()[0])
        raise ValueError(
            f"answer_step[{i}]={int(answer_step[i])} but row {i} has only {int(num_steps[i])} steps"
        )
    before = torch.where(answer_step < 0, num_steps - 1, answer_step - 1)
    start = torch.full((B,), 0.5, dtype=step_values.dtype, device=step_values.device)
    if prompt_value is not None:
        start = _check_rows("prompt_value", prompt_value, B).to(step_values.dtype)
    picked = step_values.gather(1, before.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(before >= 0, picked, start)


def _normalise(x: Tensor, mask: Tensor, group_ids: Tensor, norm: str, eps: float, *, center: bool) -> Tensor:
    """z-score (or, with center=False, only divide by the std) the mask-1 entries of x [B] / [B, K],
    pooled per group ("group"), over the batch ("batch"), or not at all ("none")."""
    m = mask.to(x.dtype)
    if norm == "none":
        return x * m
    if norm == "group":
        mean, std, _ = group_mean_std(x, m, group_ids)
    else:
        mean, std = masked_mean_std(x, m)
    return ((x - mean) if center else x) / (std + eps) * m


def _process_events(
    outcome: Tensor,
    step_values: Tensor,
    step_positions: Tensor,
    step_mask: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    *,
    gamma: float,
    process: str,
    prompt_value: Tensor | None,
) -> dict:
    """Validate step_fusion's inputs and compute its raw process rewards ("events", step 1 of its
    docstring): values [B, K+1], mask [B, K+1], token positions pos [B, K+1] (the K steps plus the terminal
    shaping transition), and the checked step positions / masks."""
    outcome = _check_rows("outcome", outcome)
    B = outcome.shape[0]
    step_values = check_tensor("step_values", step_values, ndim=2, float_dtype=True)
    if step_values.shape[0] != B:
        raise ValueError(
            f"step_values has shape {tuple(step_values.shape)}, expected ({B}, K) (rows of outcome)"
        )
    check_finite("step_values", step_values)
    K = step_values.shape[1]
    step_positions = check_tensor("step_positions", step_positions, ndim=2)
    check_shape("step_positions", step_positions, (B, K), like="step_values")
    if step_positions.is_floating_point():
        raise TypeError(f"step_positions must be an integer tensor, got dtype {step_positions.dtype}")
    step_mask = check_mask("step_mask", step_mask, (B, K), like="step_values").bool()
    response_mask = check_mask("response_mask", response_mask)
    if response_mask.dim() != 2 or response_mask.shape[0] != B:
        raise ValueError(
            f"response_mask has shape {tuple(response_mask.shape)}, expected ({B}, T) (rows of outcome)"
        )
    T = response_mask.shape[1]
    group_ids = check_group_ids(group_ids, B)
    check_choice("reward.step_process", process, STEP_PROCESSES)
    check_range("gamma", gamma, 0.0, 1.0)
    dtype, device = outcome.dtype, outcome.device
    step_values = step_values.to(dtype)
    rmask = response_mask.to(dtype)

    if K > 1 and bool((step_mask[:, 1:] & ~step_mask[:, :-1]).any()):
        i = int((step_mask[:, 1:] & ~step_mask[:, :-1]).any(-1).nonzero()[0])
        raise ValueError(
            f"step_mask row {i} is not a prefix (a valid step follows a padded one): {step_mask[i].tolist()}"
        )
    pos = torch.where(step_mask, step_positions, torch.zeros_like(step_positions)).long()
    out_of_range = step_mask & ((step_positions < 0) | (step_positions >= T))
    if bool(out_of_range.any()):
        i, k = (int(v) for v in out_of_range.nonzero()[0])
        raise ValueError(f"step_positions[{i}, {k}]={int(step_positions[i, k])} is outside [0, {T})")
    off_response = step_mask & ~response_mask.bool().gather(1, pos)
    if bool(off_response.any()):
        i, k = (int(v) for v in off_response.nonzero()[0])
        raise ValueError(
            f"step_positions[{i}, {k}]={int(pos[i, k])} is not a response token (response_mask is 0)"
        )
    if K > 1:
        not_increasing = step_mask[:, 1:] & (pos[:, 1:] <= pos[:, :-1])
        if bool(not_increasing.any()):
            i = int(not_increasing.any(-1).nonzero()[0])
            raise ValueError(
                f"step_positions row {i} is not strictly increasing: {pos[i][step_mask[i]].tolist()}"
            )
    if process == "shaping" and prompt_value is not None:
        phi_0 = _check_rows("prompt_value", prompt_value, B).to(dtype)
    else:
        phi_0 = torch.zeros(B, dtype=dtype, device=device)

    # Process events [B, K+1]: the K steps plus, for shaping, the terminal transition when the last
    # response token is not a step end.
    last = last_token_index(response_mask)
    has_tokens = last >= 0
    num_steps = step_mask.sum(-1)
    last_step = (num_steps - 1).clamp(min=0)
    last_pos = pos.gather(1, last_step[:, None]).squeeze(1)
    ends_on_step = (num_steps > 0) & (last_pos == last)
    if process == "value":
        rewards = step_values * step_mask
        extra_valid = torch.zeros(B, dtype=torch.bool, device=device)
        extra = torch.zeros(B, dtype=dtype, device=device)
    else:
        phi_next = step_values.clone()
        # Phi = 0 at the terminal state: the last step's V is dropped when that step ends the response.
        terminal_step = torch.zeros_like(step_mask).scatter(1, last_step[:, None], ends_on_step[:, None])
        phi_next = torch.where(terminal_step, torch.zeros_like(phi_next), phi_next)
        phi_prev = torch.cat([phi_0[:, None], step_values[:, :-1]], dim=1)
        rewards = (gamma * phi_next - phi_prev) * step_mask
        extra_valid = has_tokens & ~ends_on_step
        phi_last = torch.where(num_steps > 0, step_values.gather(1, last_step[:, None]).squeeze(1), phi_0)
        extra = torch.where(extra_valid, -phi_last, torch.zeros_like(phi_last))
    event_values = torch.cat([rewards, extra[:, None]], dim=1)
    event_mask = torch.cat([step_mask, extra_valid[:, None]], dim=1)
    event_pos = torch.cat([pos, last.clamp(min=0)[:, None]], dim=1)

    return {
        "values": event_values, "mask": event_mask, "pos": event_pos, "step_pos": pos, "step_mask": step_mask,
        "rmask": rmask, "dtype": dtype, "device": device, "has_tokens": has_tokens, "outcome": outcome,
        "response_mask": response_mask,
    }  # fmt: skip


def step_fusion(
    outcome: Tensor,
    step_values: Tensor,
    step_positions: Tensor,
    step_mask: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    *,
    w_rule: float,
    w_prm: float,
    gamma: float = 1.0,
    process: str = "value",
    norm: str = "group",
    prompt_value: Tensor | None = None,
    eps: float = 1e-6,
    whiten: bool = False,
    metrics: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Dense fusion of per-step PRM values with the outcome -> (advantages [B, T], returns [B, T]).

    outcome [B]; step_values [B, K] (V_k = PRM value after step k); step_positions [B, K] long (index in
    [0, T) of step k's last token; valid ones strictly increasing and on response tokens); step_mask
    [B, K] (valid steps, a prefix of each row); response_mask [B, T]; group_ids [B].

    1. Process reward per step, at the step's last token:
       process="value":   r_k = V_k.
       process="shaping": r_k = gamma * Phi_{k+1} - Phi_k with potential Phi_{k+1} = V_k (state after step
       k), Phi_0 = prompt_value (0 if None) and Phi = 0 at the terminal state (the last response token;
       if it is not a step end, one more shaping reward -Phi_K sits there). Why it matters: these terms
       telescope, so from any token in step j the process return is exactly -Phi_j -- a baseline that
       depends only on the state, never on what the policy does afterwards. Ng et al. (1999): the optimal
       policy is unchanged, and the policy gradient is unbiased, while credit still moves to the steps
       where V rose or fell. Raw values (process="value") are not of that form: every extra step with
       V > 0 adds reward, so the policy can gain by padding its solution with steps (reward hacking).
    2. Outcome at the last response token.
    3. Each source normalised on its own over its valid entries, per group or over the batch (or
       "none"). Outcome and "value" rewards are z-scored; "shaping" rewards are only divided by their
       std (subtracting a mean per step would add -mean * (number of steps), a length bonus or penalty
       that breaks the telescoping above).
    4. Returns per source by reverse cumulative sum, discounted by gamma once per step (at each step's
       last token), and summed: R = w_rule * G_outcome + w_prm * G_process. advantages = R, or R
       whitened over the batch with `whiten=True` (PRIME's final step).
    """
    ev = _process_events(outcome, step_values, step_positions, step_mask, response_mask, group_ids, gamma=gamma,
                         process=process, prompt_value=prompt_value)  # fmt: skip
    event_values, event_mask, event_pos, pos = ev["values"], ev["mask"], ev["pos"], ev["step_pos"]
    step_mask, rmask, dtype, device = ev["step_mask"], ev["rmask"], ev["dtype"], ev["device"]
    outcome, response_mask, has_tokens = ev["outcome"], ev["response_mask"], ev["has_tokens"]
    B, T = outcome.shape[0], response_mask.shape[1]
    check_choice("reward.step_norm", norm, STEP_NORMS)
    event_norm = _normalise(event_values, event_mask, group_ids, norm, eps, center=(process == "value"))
    outcome_norm = _normalise(outcome, has_tokens, group_ids, norm, eps, center=True)

    process_tokens = torch.zeros(B, T, dtype=dtype, device=device).scatter_add(
        1, event_pos, event_norm * event_mask.to(dtype)
    )
    outcome_tokens = place_on_last_token(outcome_norm, response_mask)
    # scatter_add, not scatter: padded steps point at index 0 too and must not overwrite a real step end there
    step_ends = torch.zeros(B, T, dtype=dtype, device=device).scatter_add(1, pos, step_mask.to(dtype)) > 0
    returns = w_rule * discounted_returns(
        outcome_tokens, rmask, gamma, step_ends
    ) + w_prm * discounted_returns(process_tokens, rmask, gamma, step_ends)
    advantages = masked_whiten(returns, rmask, eps) if whiten else returns
    start_return = returns.gather(1, _first_token_index(response_mask)[:, None]).squeeze(1)
    components = {"outcome": outcome, f"prm_{process}_sum": (event_values * event_mask).sum(-1)}
    _record(metrics, components | {"return_at_start": start_return}, outcome)
    return advantages * rmask, returns * rmask


def step_token_rewards(
    outcome: Tensor,
    step_values: Tensor,
    step_positions: Tensor,
    step_mask: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    *,
    w_rule: float,
    w_prm: float,
    gamma: float = 1.0,
    process: str = "shaping",
    prompt_value: Tensor | None = None,
    metrics: dict[str, float] | None = None,
) -> Tensor:
    """reward.fusion=step under a critic (algo.advantage=gae): token rewards [B, T] = w_rule * outcome on
    the last response token + w_prm * the process rewards of `step_fusion` (step 1 of its docstring, raw)
    at each step's last token. Not normalised: the critic learns their scale and GAE whitens the
    advantages. Arguments as `step_fusion`'s."""
    ev = _process_events(outcome, step_values, step_positions, step_mask, response_mask, group_ids, gamma=gamma,
                         process=process, prompt_value=prompt_value)  # fmt: skip
    outcome, rmask = ev["outcome"], ev["rmask"]
    process_tokens = torch.zeros_like(rmask).scatter_add(1, ev["pos"], ev["values"] * ev["mask"].to(rmask.dtype))
    components = {"outcome": outcome, f"prm_{process}_sum": (ev["values"] * ev["mask"]).sum(-1)}
    _record(metrics, components, outcome)
    return (w_rule * place_on_last_token(outcome, ev["response_mask"]) + w_prm * process_tokens) * rmask


def _first_token_index(mask: Tensor) -> Tensor:
    """Index of the first mask-1 position of each row [B, T] -> [B] (0 for rows with none)."""
    return mask.bool().to(torch.int8).argmax(dim=-1)


def token_fusion(
    outcome: Tensor,
    token_rewards: Tensor,
    response_mask: Tensor,
    *,
    w_rule: float,
    w_token: float,
    token_norm: str = "none",
    metrics: dict[str, float] | None = None,
) -> Tensor:
    """Token rewards [B, T] = w_rule * outcome on the last token + w_token * r_t on response tokens.

    token_rewards: a scorer's per-token reward (e.g. Q-RM's s_t). token_norm="std" divides r_t by its
    std over the batch's response tokens without subtracting the mean (Q-RM's PPO recipe).
    """
    outcome = _check_rows("outcome", outcome)
    token_rewards = check_tensor("token_rewards", token_rewards, ndim=2, float_dtype=True)
    if token_rewards.shape[0] != outcome.shape[0]:
        raise ValueError(
            f"token_rewards has shape {tuple(token_rewards.shape)}, expected ({outcome.shape[0]}, T) (rows of outcome)"
        )
    check_finite("token_rewards", token_rewards)
    mask = check_mask("response_mask", response_mask, token_rewards.shape, like="token_rewards").to(
        outcome.dtype
    )
    check_choice("reward.token_norm", token_norm, TOKEN_NORMS)
    r = token_rewards.to(outcome.dtype) * mask
    if token_norm == "std":
        _, std = masked_mean_std(r, mask)
        r = r / std
    _record(metrics, {"outcome": outcome, "token_sum": r.sum(-1)}, outcome)
    return w_rule * place_on_last_token(outcome, mask) + w_token * r


def _leave_one_out_mean(x: Tensor, group_ids: Tensor) -> Tensor:
    """For each row i of x [B]: the mean of x over the OTHER rows of its group (0 for a group of one)."""
    _, g = torch.unique(group_ids, return_inverse=True)
    n_groups = int(g.max()) + 1 if g.numel() else 0
    total = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, g, x)
    count = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, g, torch.ones_like(x))
    others = (count[g] - 1).clamp(min=1)
    return torch.where(count[g] > 1, (total[g] - x) / others, torch.zeros_like(x))


def min_fusion(
    outcome: Tensor,
    step_values: Tensor,
    step_positions: Tensor,
    step_mask: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    *,
    w_rule: float,
    w_prm: float,
    temperature: float = 0.1,
    metrics: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """PURE's min-form credit assignment (arXiv 2504.15275) -> (advantages [B, T], returns [B, T]).

    Arguments as `step_fusion`'s. The paper: a step's return is the minimum of the remaining process
    rewards, not their sum, because summed PRM returns reward padding a solution with steps the PRM
    likes (reward hacking, then collapse). Its released code (OpenRLHF branch, experience_maker.py and
    utils.turn_process_reward_logits_to_reward) realises it as a softmin re-weighting before the usual
    summed return, which these lines follow:

    1. r_k = 2 V_k - 1 in [-1, 1]. PURE's PRM is a two-class head, r_k = p(+) - p(-); for rlloop's
       sigmoid value head V = p(+), so p(+) - p(-) = 2V - 1.
    2. w_k = softmax_k(-r_k / temperature) over the valid steps of a row (temperature 0.1 in PURE);
       r'_k = w_k * r_k. As temperature -> 0 the row's sum of r'_k -> min_k r_k.
    3. Process baseline (PURE's reward_baseline="step", an RLOO baseline): each row's mean weighted reward
       per step, m_i = sum_k r'_ik / K_i; b_i = the mean of m_j over the other rows j of i's group;
       r'_ik -= b_i on every valid step.
    4. Verifiable reward (PURE: solved - 1) minus its leave-one-out group mean, at the last response
       token, times w_rule (PURE's verifiable_reward_coef; it reports ~0.1 relative to the PRM's 1).
    5. Token rewards w_prm * r'_k at each step's last token plus step 4; returns = reverse cumulative sum
       (gamma 1); advantages = returns, not further normalised (PURE's rloo estimator).

    Differences from the release: the verifiable reward takes `outcome` as given (PURE's solved - 1 is
    outcome - 1, whose leave-one-out centring is the same), and the step-end tokens keep their advantage
    (PURE zeroes it because its step separators are tokens the PRM reads, not the policy's own).
    """
    ev = _process_events(outcome, step_values, step_positions, step_mask, response_mask, group_ids, gamma=1.0,
                         process="value", prompt_value=None)  # fmt: skip
    if not temperature > 0:
        raise ValueError(f"reward.min_temperature must be > 0, got {temperature!r}")
    outcome, rmask, step_mask, pos = ev["outcome"], ev["rmask"], ev["step_mask"], ev["step_pos"]
    group_ids = check_group_ids(group_ids, outcome.shape[0])
    dtype = ev["dtype"]
    m = step_mask.to(dtype)
    r = (2.0 * step_values.to(dtype) - 1.0) * m  # 1.
    logits = (-r / temperature).masked_fill(~step_mask, -math.inf)
    w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without steps: all -inf -> 0 weights
    weighted = w * r  # 2.
    num_steps = m.sum(-1)
    per_step = weighted.sum(-1) / num_steps.clamp(min=1)
    weighted = (weighted - _leave_one_out_mean(per_step, group_ids)[:, None]) * m  # 3.
    verifiable = outcome - _leave_one_out_mean(outcome, group_ids)  # 4.
    token_rewards = torch.zeros_like(rmask).scatter_add(1, pos, w_prm * weighted)
    token_rewards = token_rewards + w_rule * place_on_last_token(verifiable, ev["response_mask"])
    returns = discounted_returns(token_rewards * rmask, rmask, 1.0)  # 5.
    components = {"outcome": outcome, "prm_min_weighted_sum": (w * r).sum(-1)}
    _record(metrics, components, outcome)
    return returns * rmask, returns * rmask


def first_error_fusion(
    outcome: Tensor,
    step_values: Tensor,
    step_positions: Tensor,
    step_mask: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    *,
    w_prm: float,
    threshold: float = 0.5,
    eps: float = 1e-6,
    metrics: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Outcome advantages whose blame starts at the first step the PRM doubts -> (advantages, returns) [B, T].

    Arguments as `step_fusion`'s. GRPO's advantage A_i = (o_i - mean_g) / (std_g + eps) of each row's
    outcome within its group, on every response token, except that a row with A_i < 0 keeps only
    (1 - w_prm) of it on the tokens BEFORE its first step with V_k < `threshold` (the first step the PRM
    thinks wrong): with w_prm = 1 a wrong solution's correct prefix is left alone and the tokens from its
    first doubted step on carry all the blame. With the oracle PRM (reward.prm.oracle) this is the credit
    a perfect process reward gives ("tokens from the first wrong step on punished, earlier steps
    neutral"); a row with no doubted step is blamed whole, as outcome-only GRPO does; w_prm = 0 is GRPO.
    """
    ev = _process_events(outcome, step_values, step_positions, step_mask, response_mask, group_ids, gamma=1.0,
                         process="value", prompt_value=None)  # fmt: skip
    check_range("reward.w_prm", w_prm, 0.0, 1.0)
    check_range("reward.first_error_threshold", threshold, 0.0, 1.0)
    outcome, rmask, step_mask, pos = ev["outcome"], ev["rmask"], ev["step_mask"], ev["step_pos"]
    B, T = rmask.shape
    mean, std, _ = group_mean_std(outcome, torch.ones_like(outcome), group_ids)
    adv = (outcome - mean) / (std + eps)
    doubted = step_mask & (step_values.to(outcome.dtype) < threshold)
    has_doubt = doubted.any(-1)
    first = torch.where(has_doubt, doubted.float().argmax(-1), torch.zeros_like(has_doubt, dtype=torch.long))
    # the first doubted step starts right after the previous step's last token (at 0 for step 0)
    prev_end = pos.gather(1, (first - 1).clamp(min=0)[:, None]).squeeze(1)
    start = torch.where(first > 0, prev_end + 1, torch.zeros_like(prev_end))
    before = torch.arange(T, device=rmask.device)[None, :] < start[:, None]
    spared = before & has_doubt[:, None] & (adv < 0)[:, None]
    scale = torch.where(spared, torch.full_like(rmask, 1.0 - w_prm), torch.ones_like(rmask))
    advantages = adv[:, None] * scale * rmask
    spared_frac = (spared.to(rmask.dtype) * rmask).sum() / rmask.sum().clamp(min=1)
    _record(metrics, {"outcome": outcome, "first_doubt_step": torch.where(has_doubt, first, -1).to(outcome.dtype)},
            outcome)  # fmt: skip
    if metrics is not None:
        metrics["fusion/spared_token_frac"] = float(spared_frac)
    return advantages, advantages


# ----- PRIME (arXiv 2502.01456): the implicit PRM's token rewards with the outcome --------------------


def _loo_mean_valid(x: Tensor, valid: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(mean of x over the OTHER valid rows of each row's group, group size) -> both [B]."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    v = valid.to(x.dtype)
    total = torch.zeros(G, dtype=x.dtype, device=x.device).index_add(0, inv, x * v)[inv]
    count = torch.zeros(G, dtype=x.dtype, device=x.device).index_add(0, inv, v)[inv]
    others = (count - v).clamp(min=1)
    return (total - x * v) / others, count


def prime_advantages(
    outcome: Tensor,
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    *,
    w_rule: float = 1.0,
    w_process: float = 1.0,
    process_norm: str = "batch_max",
    whiten: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """PRIME's fusion of the outcome [B] and implicit-PRM token rewards [B, T] -> (advantages, returns) [B, T].

    1. process_norm="batch_max" (PRIME's `prime_norm=batch_norm`): r_t /= max over the batch of
       |Σ_{s>=t} r_s| (+eps), so the process returns lie in [-1, 1]; "none" keeps r_t.
    2. Leave-one-out per source, over the rows of a prompt group (n rows):
         process: r̃_t = r_t − mean_{j≠i} m_j, with m_j = row j's mean token reward;
         outcome: õ_i = o_i − mean_{j≠i} o_j, placed on the row's last response token.
       (PRIME's `masked_rloo` also scales each token's deviation from its own row mean by n/(n−1);
       every row's sum is the same either way.) A group of one has no baseline: both parts are 0 there,
       as in `rlloop.algos.advantages.rloo`.
    3. returns G_t = Σ_{s>=t} (w_rule·õ + w_process·r̃)_s (γ = 1); advantages = whiten(G) over the batch's
       response tokens (PRIME), or G with whiten=False.
    """
    outcome = check_tensor("outcome", torch.as_tensor(outcome), ndim=1, float_dtype=True)
    B = outcome.shape[0]
    token_rewards = check_tensor("token_rewards", torch.as_tensor(token_rewards), ndim=2, float_dtype=True)
    if token_rewards.shape[0] != B:
        raise ValueError(
            f"token_rewards has shape {tuple(token_rewards.shape)}, expected ({B}, T) (rows of outcome)"
        )
    mask = check_mask(
        "response_mask", torch.as_tensor(response_mask), token_rewards.shape, like="token_rewards"
    )
    group_ids = check_group_ids(torch.as_tensor(group_ids), B)
    if process_norm not in ("batch_max", "none"):
        raise ValueError(f"process_norm={process_norm!r}: use batch_max | none")
    dtype = torch.float64 if token_rewards.dtype == torch.float64 else torch.float32
    m = mask.to(dtype)
    r = token_rewards.to(dtype) * m
    if process_norm == "batch_max":
        r = r / (discounted_returns(r, m, 1.0).abs().max() + eps)
    valid = m.sum(-1) > 0
    row_mean = r.sum(-1) / m.sum(-1).clamp(min=1)
    base_r, n = _loo_mean_valid(row_mean, valid, group_ids)
    base_o, _ = _loo_mean_valid(outcome.to(dtype), valid, group_ids)
    has_baseline = (n >= 2) & valid
    process = torch.where(has_baseline[:, None], r - base_r[:, None], torch.zeros_like(r)) * m
    o_tilde = torch.where(has_baseline, outcome.to(dtype) - base_o, torch.zeros_like(base_o))
    last = last_token_index(mask)
    outcome_tokens = torch.zeros_like(r)
    rows = valid.nonzero().squeeze(-1)
    outcome_tokens[rows, last[rows]] = o_tilde[rows]
    returns = discounted_returns(w_rule * outcome_tokens + w_process * process, m, 1.0)
    advantages = masked_whiten(returns, m, eps) if whiten else returns
    return advantages * m, returns * m


def prime_prompt_filter(outcome: Tensor, group_ids: Tensor, low: float = 0.2, high: float = 0.8) -> Tensor:
    """Keep mask [B] bool: rows whose prompt group has mean outcome (accuracy) in [low, high] (PRIME)."""
    outcome = check_tensor("outcome", torch.as_tensor(outcome), ndim=1, float_dtype=True)
    group_ids = check_group_ids(torch.as_tensor(group_ids), outcome.shape[0])
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"prime_prompt_filter: need 0 <= low <= high <= 1, got low={low}, high={high}")
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    o = outcome.double()
    acc = torch.zeros(G, dtype=o.dtype).index_add(0, inv, o) / torch.zeros(G, dtype=o.dtype).index_add(
        0, inv, torch.ones_like(o)
    )
    # a small tolerance so 0.2 / 0.8 written as 1/5, 4/5 of a group of 5 are kept
    return (acc[inv] >= low - 1e-9) & (acc[inv] <= high + 1e-9)


# ----- the registry: reward.fusion=<name> ----------------------------------------------------------------


@dataclass
class FusionInputs:
    """One batch's reward sources as explicit tensors (B rows, T token columns, K steps).

    response_mask [B, T]; group_ids [B] (prompt groups); outcome [B] (the verifier's score plus any
    overlong penalty and format bonus). From the PRM (None without one): step_values [B, K] (V_k after
    step k), step_positions [B, K] long (column of step k's last token, 0 on padding), step_mask [B, K],
    answer_step [B] long (the step holding the answer, -1 if none), prompt_value [B] (V of the empty
    prefix). token_scores [B, T]: a per-token source (Q-RM, implicit PRM). values [B, T]: the critic's
    (algo.advantage=gae). kl_rewards [B, T]: -kl_coef * kl_t (algo.kl_in_reward), added to the token
    rewards before the advantage estimator. components: the outcome's sources [B] with their weight in
    the fused reward (what algo.advantage=gdpo normalises apart), in order.
    """

    response_mask: Tensor
    group_ids: Tensor
    outcome: Tensor
    components: dict[str, tuple[Tensor, float]] = field(default_factory=dict)
    step_values: Tensor | None = None
    step_positions: Tensor | None = None
    step_mask: Tensor | None = None
    answer_step: Tensor | None = None
    prompt_value: Tensor | None = None
    token_scores: Tensor | None = None
    values: Tensor | None = None
    kl_rewards: Tensor | None = None
    kl_coef: float = 0.0


@dataclass
class Fused:
    """What a fusion gives the learner: token_rewards, advantages, returns [B, T] and its metrics."""

    token_rewards: Tensor
    advantages: Tensor
    returns: Tensor
    metrics: dict[str, float]


FusionFn = Callable[[FusionInputs, Any, Any], Fused]


@dataclass(frozen=True)
class Fusion:
    """A registered fusion: `fn(inputs, reward_cfg, algo_cfg) -> Fused`, pure (reads config scalars only).

    needs: "steps" (the PRM's step values), "token_scores" (a per-token source) or None.
    advantages: "estimator" (token rewards through algo.advantage, so a KL penalty in the reward and a
    critic apply), "own" (the fusion computes them itself: no KL in the reward, no critic) or
    "own_unless_critic" (its own, except under algo.advantage=gae).
    """

    name: str
    fn: FusionFn
    needs: str | None = None
    advantages: str = "estimator"

    def __call__(self, x: FusionInputs, reward: Any, algo: Any) -> Fused:
        if self.needs == "steps" and x.step_values is None:
            raise RlloopError(f"reward.fusion={self.name} needs the PRM: set reward.prm.enabled=true")
        if self.needs == "token_scores" and x.token_scores is None:
            raise RlloopError(
                f"reward.fusion={self.name!r} needs a token-reward source, which is not configured"
            )
        out = self.fn(x, reward, algo)
        if x.values is not None:
            out.metrics.update(critic_metrics(x.values, out.returns, x.response_mask))
        return out


FUSIONS: dict[str, Fusion] = {}


def register_fusion(name: str, *, needs: str | None = None, advantages: str = "estimator") -> Callable:
    """Decorator: `FUSIONS[name]` = the function (see `Fusion` for needs / advantages)."""

    def wrap(fn: FusionFn) -> FusionFn:
        FUSIONS[name] = Fusion(name, fn, needs, advantages)
        return fn

    return wrap


def estimate(x: FusionInputs, token_rewards: Tensor, algo: Any, components: dict) -> Fused:
    """Token rewards [B, T] (plus the KL penalty, when given) through the advantage estimator
    algo.advantage; gdpo gets each source in `components` (and the KL) as a column of its own."""
    from .advantages import compute_advantages

    if x.kl_rewards is not None:
        token_rewards = token_rewards + x.kl_rewards
        components = {**components, "kl": (-x.kl_rewards.sum(-1) / x.kl_coef, -x.kl_coef)}  # sum_t kl_t, -beta
    extra = gdpo_components(components) if algo.advantage == "gdpo" else {}
    adv, ret = compute_advantages(
        algo.advantage, token_rewards, x.response_mask, x.group_ids, values=x.values, gamma=algo.gamma,
        lam=algo.lam, eps=algo.adv_eps, **extra,
    )  # fmt: skip
    return Fused(token_rewards, adv, ret, {})


def _own(x: FusionInputs, name: str) -> None:
    if x.kl_rewards is not None:
        raise RlloopError(f"algo.kl_in_reward: reward.fusion={name} takes no token rewards")


def _step_args(x: FusionInputs) -> tuple:
    return (x.outcome, x.step_values, x.step_positions, x.step_mask, x.response_mask, x.group_ids)


def _done(out: Fused, total: Tensor, metrics: dict[str, float]) -> Fused:
    out.metrics = {**metrics, "reward/total": float(total.mean())}  # the fused reward before any KL
    return out


@register_fusion("outcome")
def fuse_outcome(x: FusionInputs, rw: Any, a: Any) -> Fused:
    """TDRM's release: R = w_rule * outcome + w_prm * g(V before the answer step) on the last token."""
    metrics: dict[str, float] = {}
    components = dict(x.components)
    prm_value = None
    if x.step_values is not None:
        prm_value = value_before_answer_step(x.step_values, x.step_mask, x.answer_step, x.prompt_value)
        metrics["reward/prm_value"] = float(prm_value.mean())
        components["prm"] = (prm_transform(prm_value, rw.prm.g), rw.w_prm)
    total = outcome_fusion(x.outcome, prm_value, w_rule=rw.w_rule, w_prm=rw.w_prm, g=rw.prm.g, metrics=metrics)
    out = estimate(x, place_on_last_token(total, x.response_mask), a, components)
    return _done(out, total, metrics)


@register_fusion("step", needs="steps", advantages="own_unless_critic")
def fuse_step(x: FusionInputs, rw: Any, a: Any) -> Fused:
    """Dense step rewards (`step_fusion`); under a critic the raw step rewards go through GAE."""
    metrics: dict[str, float] = {}
    kw = {"w_rule": rw.w_rule, "w_prm": rw.w_prm, "gamma": a.gamma, "process": rw.step_process,
          "prompt_value": x.prompt_value, "metrics": metrics}  # fmt: skip
    if x.values is not None:  # gae: raw step rewards as token rewards, credited through the critic
        token_rewards = step_token_rewards(*_step_args(x), **kw)
        return _done(estimate(x, token_rewards, a, dict(x.components)), token_rewards.sum(-1), metrics)
    _own(x, "step")
    adv, ret = step_fusion(*_step_args(x), norm=rw.step_norm, eps=a.adv_eps, **kw)
    return _done(Fused(place_on_last_token(x.outcome, x.response_mask), adv, ret, {}), x.outcome, metrics)


@register_fusion("token", needs="token_scores")
def fuse_token(x: FusionInputs, rw: Any, a: Any) -> Fused:
    """w_rule * outcome on the last token + w_token * r_t of the token source, then algo.advantage."""
    metrics: dict[str, float] = {}
    components = {**x.components, "token": ((x.token_scores * x.response_mask).sum(-1), rw.w_token)}
    token_rewards = token_fusion(x.outcome, x.token_scores, x.response_mask, w_rule=rw.w_rule, w_token=rw.w_token,
                                 token_norm=rw.token_norm, metrics=metrics)  # fmt: skip
    return _done(estimate(x, token_rewards, a, components), token_rewards.sum(-1), metrics)


@register_fusion("prime", needs="token_scores", advantages="own")
def fuse_prime(x: FusionInputs, rw: Any, a: Any) -> Fused:
    """PRIME: leave-one-out advantages per source (outcome, implicit-PRM r_t), weighted, whitened."""
    _own(x, "prime")
    mask, scores = x.response_mask, x.token_scores
    adv, ret = prime_advantages(x.outcome, scores, mask, x.group_ids, w_rule=rw.w_rule, w_process=rw.w_token,
                                eps=a.adv_eps)  # fmt: skip
    token_sum = (scores * mask).sum(-1)
    stats = fusion_stats({"outcome": x.outcome, "token_sum": token_sum}, x.outcome)
    token_rewards = rw.w_rule * place_on_last_token(x.outcome, mask) + rw.w_token * scores * mask
    total = rw.w_rule * x.outcome + rw.w_token * token_sum
    return _done(Fused(token_rewards, adv, ret, {}), total, {f"fusion/{k}": v for k, v in stats.items()})


@register_fusion("min", needs="steps", advantages="own")
def fuse_min(x: FusionInputs, rw: Any, a: Any) -> Fused:
    """PURE's min-form credit (`min_fusion`)."""
    _own(x, "min")
    metrics: dict[str, float] = {}
    adv, ret = min_fusion(*_step_args(x), w_rule=rw.w_rule, w_prm=rw.w_prm, temperature=rw.min_temperature,
                          metrics=metrics)  # fmt: skip
    return _done(Fused(place_on_last_token(x.outcome, x.response_mask), adv, ret, {}), x.outcome, metrics)


@register_fusion("first_error", needs="steps", advantages="own")
def fuse_first_error(x: FusionInputs, rw: Any, a: Any) -> Fused:
    """GRPO's outcome advantage, a wrong row's blame from its first doubted step (`first_error_fusion`)."""
    _own(x, "first_error")
    metrics: dict[str, float] = {}
    adv, ret = first_error_fusion(*_step_args(x), w_prm=rw.w_prm, threshold=rw.first_error_threshold,
                                  eps=a.adv_eps, metrics=metrics)  # fmt: skip
    return _done(Fused(place_on_last_token(x.outcome, x.response_mask), adv, ret, {}), x.outcome, metrics)


def gdpo_components(components: dict[str, tuple[Tensor, float]]) -> dict[str, Any]:
    """algo.advantage=gdpo's inputs: the reward sources [B] as columns `reward_components` [B, S] and
    their weights in the fused reward `reward_weights` [S]. A source of weight 0 is left out (it adds
    nothing to the sum, and GDPO weights each source after normalising it)."""
    kept = {name: (c, w) for name, (c, w) in components.items() if w != 0}
    if not kept:
        raise ConfigError("algo.advantage=gdpo: every reward source has weight 0 (reward.w_rule, w_prm, ...)")
    return {
        "reward_components": torch.stack([c.to(torch.float32) for c, _ in kept.values()], dim=1),
        "reward_weights": [float(w) for _, w in kept.values()],
    }


def critic_metrics(values: Tensor, returns: Tensor, mask: Tensor) -> dict[str, float]:
    """How well the critic's values (before its update) predict the GAE returns on the response tokens:
    critic/values, critic/returns (means) and critic/explained_var = 1 - Var(R - V) / Var(R) (1 = perfect,
    0 = no better than a constant, as OpenAI baselines / verl log it; NaN when the returns are constant)."""
    m = mask.bool()
    v, r = values[m].double(), returns[m].double()
    if v.numel() == 0:
        return {}
    var_r = float(r.var()) if r.numel() > 1 else 0.0
    explained = 1.0 - float((r - v).var()) / var_r if var_r > 1e-12 else float("nan")
    return {"critic/values": float(v.mean()), "critic/returns": float(r.mean()), "critic/explained_var": explained}


def answer_step(step_char_ends: Sequence[int], answer_start: int | None) -> int:
    """Index of the step whose characters hold `answer_start` (where the answer begins in the text: the
    verifier's `\\boxed`, see rlloop.rewards.verifiers.math.boxed_starts), or -1 when there is none."""
    if answer_start is None:
        return -1
    for k, end in enumerate(step_char_ends):
        if answer_start < end:
            return k
    return -1
