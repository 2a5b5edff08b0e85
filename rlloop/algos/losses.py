"""Policy losses (one registered function each; config `algo.policy_loss=NAME`), loss aggregation,
entropy and the clipped value loss.

All tensors are [B, T] and aligned with input_ids; only response_mask = 1 positions count.
Notation: rho_t = pi(y_t)/pi_old(y_t) = exp(logprobs - old_logprobs), A_t the advantage,
eps_low / eps_high the clip range (`clip_low`, `clip_high`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from rlloop.registry import registrar

from .checks import check_choice, check_finite, check_mask, check_range, check_shape, check_tensor
from .masked import masked_mean

# (logprobs, old_logprobs, advantages, mask, **clip args) -> a per-token loss [B, T] and a dict of per-token
# 0/1 indicators to report as fractions
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
register_policy_loss = registrar(POLICY_LOSSES, "policy loss")

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(loss_mat: Tensor, mask: Tensor, mode: str, *, norm_len: int | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar over the mask-1 tokens.

    token-mean               sum_{b,t} l m / sum_{b,t} m                  (every token weighs the same)
    seq-mean-token-sum       mean_b sum_t l m                              (rows with >= 1 token)
    seq-mean-token-mean      mean_b (sum_t l m / sum_t m)                  (rows with >= 1 token)
    seq-mean-token-sum-norm  sum_{b,t} l m / (B * L), L = norm_len or T   (Dr. GRPO: a constant
                             denominator, so no length bias)
    With no response token at all the result is 0 (still differentiable).
    """
    check_choice("algo.loss_agg", mode, LOSS_AGG_MODES)
    loss_mat = check_tensor("loss_mat", loss_mat, ndim=2, float_dtype=True)
    mask = check_mask("mask", mask, loss_mat.shape, like="loss_mat").to(loss_mat.dtype)
    seq_sum = (loss_mat * mask).sum(-1)
    tokens = mask.sum(-1)
    rows = tokens > 0
    num_rows = rows.sum().clamp(min=1)
    if mode == "token-mean":
        return seq_sum.sum() / tokens.sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return (seq_sum * rows).sum() / num_rows
    if mode == "seq-mean-token-mean":
        return (seq_sum / tokens.clamp(min=1) * rows).sum() / num_rows
    length = loss_mat.shape[1] if norm_len is None else norm_len
    check_range("norm_len", length, 1, float("inf"))
    return seq_sum.sum() / (loss_mat.shape[0] * length)


def _ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    # Clamp the log-ratio as verl: a stale or mismatched token must not overflow exp().
    return torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))


def _clip_objective(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic bound: max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)), and where the clip binds."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(ratio.dtype)


@register_policy_loss("ppo")
def ppo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clip: L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))."""
    loss, clipped = _clip_objective(_ratio(logprobs, old_logprobs), advantages, clip_low, clip_high)
    return loss, {"pg_clipfrac": clipped}


@register_policy_loss("clip_higher")
def clip_higher(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO's asymmetric clip: PPO with eps_high > eps_low (e.g. 0.2 / 0.28), so low-probability tokens
    with A > 0 can grow further before the clip stops them -- against entropy collapse."""
    if clip_high < clip_low:
        raise ValueError(
            f"clip_higher needs clip_high >= clip_low, got clip_high={clip_high}, clip_low={clip_low}"
        )
    return ppo(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high)


@register_policy_loss("dual_clip")
def dual_clip(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dual-clip PPO (Ye et al. 2020): for A_t < 0 the loss is also capped at -A_t c (c > 1), so a token
    whose ratio exploded cannot produce an unbounded update; A_t >= 0 is plain PPO."""
    if clip_ratio_c <= 1.0:
        raise ValueError(f"dual_clip needs clip_ratio_c > 1, got clip_ratio_c={clip_ratio_c}")
    loss, clipped = _clip_objective(_ratio(logprobs, old_logprobs), advantages, clip_low, clip_high)
    cap = -advantages * clip_ratio_c
    negative = advantages < 0
    lower = (negative & (loss > cap)).to(loss.dtype)
    loss = torch.where(negative, torch.minimum(loss, cap), loss)
    return loss, {"pg_clipfrac": clipped, "pg_clipfrac_lower": lower}


@register_policy_loss("gspo")
def gspo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (arXiv 2507.18071): one ratio per sequence, s_b = exp(mean_t (log pi - log pi_old)),
    clipped like PPO (the paper uses tiny ranges, e.g. 3e-4 / 4e-4, and seq-mean-token-mean).

    Token form (as verl): log s_{b,t} = log pi_t - sg(log pi_t) + sg(log s_b) has value log s_b and
    gradient grad log pi_t, so d s_b = s_b * mean_t grad log pi_t exactly as the sequence objective.
    """
    m = mask.to(logprobs.dtype)
    seq_log_ratio = ((logprobs - old_logprobs) * m).sum(-1) / m.sum(-1).clamp(min=1)
    log_s = logprobs - logprobs.detach() + seq_log_ratio.detach()[:, None]
    loss, clipped = _clip_objective(torch.exp(log_s.clamp(max=10.0)), advantages, clip_low, clip_high)
    return loss, {"pg_clipfrac": clipped}


def compute_policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    loss_agg: str = "token-mean",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    rollout_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    norm_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Policy loss `name` aggregated by `loss_agg` -> (differentiable scalar, metrics).

    Truncated importance sampling (TIS): the rollout engine (e.g. vLLM) samples from pi_rollout, not
    exactly pi_old; with `tis_cap` set, each token's loss is weighted by the detached
    w_t = min(pi_old(y_t) / pi_rollout(y_t), tis_cap), which corrects the mismatch at bounded variance.
    Metrics: pg_loss, pg_clipfrac, ppo_kl (mean of old - new logprob), pg_clipfrac_lower (dual clip),
    and with rollout_logprobs: rollout_kl (mean of rollout - old), tis_weight_mean, tis_clipfrac.
    """
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss algo.policy_loss={name!r}; known: {sorted(POLICY_LOSSES)}")
    check_choice("algo.loss_agg", loss_agg, LOSS_AGG_MODES)
    logprobs = check_tensor("logprobs", logprobs, ndim=2, float_dtype=True)
    shape = logprobs.shape
    mask = check_mask("response_mask", response_mask, shape, like="logprobs")
    for arg, t in (("old_logprobs", old_logprobs), ("advantages", advantages)):
        check_tensor(arg, t, float_dtype=True)
        check_shape(arg, t, shape, like="logprobs")
    for arg, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        check_finite(arg, t)
    check_range("clip_low", clip_low, 0.0, 1.0)
    check_range("clip_high", clip_high, 0.0, float("inf"))
    if tis_cap is not None:
        check_range("tis_cap", tis_cap, 1e-12, float("inf"))
        if rollout_logprobs is None:
            raise ValueError(f"tis_cap={tis_cap} needs rollout_logprobs [B, T] (got None)")

    fn = POLICY_LOSSES[name]
    params = inspect.signature(fn).parameters
    clip_args = {"clip_low": clip_low, "clip_high": clip_high, "clip_ratio_c": clip_ratio_c}
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    loss_mat, indicators = fn(
        logprobs, old_logprobs, advantages, mask, **{k: v for k, v in clip_args.items() if k in params}
    )

    metrics: dict[str, float] = {}
    if rollout_logprobs is not None:
        check_tensor("rollout_logprobs", rollout_logprobs, float_dtype=True)
        check_shape("rollout_logprobs", rollout_logprobs, shape, like="logprobs")
        check_finite("rollout_logprobs", rollout_logprobs)
        log_w = (old_logprobs - rollout_logprobs.detach()).clamp(-20.0, 20.0)
        metrics["rollout_kl"] = float(masked_mean(-log_w, mask))
        if tis_cap is not None:
            w = torch.exp(log_w)
            metrics["tis_clipfrac"] = float(masked_mean((w > tis_cap).to(w.dtype), mask))
            w = w.clamp(max=tis_cap)
            metrics["tis_weight_mean"] = float(masked_mean(w, mask))
            loss_mat = loss_mat * w

    loss = aggregate_loss(loss_mat, mask, loss_agg, norm_len=norm_len)
    with torch.no_grad():
        metrics["pg_loss"] = float(loss)
        metrics["ppo_kl"] = float(masked_mean(old_logprobs - logprobs.detach(), mask))
        for key, ind in indicators.items():
            metrics[key] = float(masked_mean(ind, mask))
    return loss, metrics


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels]: logits [B, T, V], labels [B, T] long -> [B, T] (at least float32)."""
    # bf16/fp16 logits are upcast: their log_softmax loses too much precision for a ratio exp(lp - old).
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.log_softmax(x, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): H = logsumexp(z) - sum_v p_v z_v; [B, T, V] -> [B, T].

    For the entropy bonus: loss = pg_loss - entropy_coef * aggregate_loss(H, mask, loss_agg).
    """
    check_tensor("logits", logits, ndim=3, float_dtype=True)
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def compute_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float = 0.2,
    loss_agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss for `gae` (PPO2): V_clip = old + clip(V - old, -c, c),
    L = 1/2 max((V - R)^2, (V_clip - R)^2), aggregated by `loss_agg`. Metrics: vf_loss, vf_clipfrac."""
    values = check_tensor("values", values, ndim=2, float_dtype=True)
    for arg, t in (("old_values", old_values), ("returns", returns)):
        check_tensor(arg, t, float_dtype=True)
        check_shape(arg, t, values.shape, like="values")
    mask = check_mask("mask", mask, values.shape, like="values")
    for arg, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_finite(arg, t)
    check_range("clip", clip, 0.0, float("inf"))
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(loss1, loss2), mask, loss_agg)
    with torch.no_grad():
        metrics = {
            "vf_loss": float(loss),
            "vf_clipfrac": float(masked_mean((loss2 > loss1).to(values.dtype), mask)),
        }
    return loss, metrics
