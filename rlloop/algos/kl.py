"""KL estimators between the policy and the reference, per token (Schulman, "Approximating KL").

With log-ratio x = log pi(y_t) - log pi_ref(y_t) on tokens sampled from pi:
  k1 = x                       unbiased for KL(pi||ref), high variance, can be negative
  k2 = x^2 / 2                 biased, low variance, >= 0
  k3 = exp(-x) + x - 1         unbiased, low variance, >= 0 (verl's "low_var_kl")
  abs = |x|
Use them in the reward (`apply_kl_in_reward`, coefficient fixed or adaptive) or in the loss (`kl_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from rlloop.registry import registrar

from .checks import check_finite, check_mask, check_range, check_shape, check_tensor
from .losses import aggregate_loss
from .masked import masked_mean

KLFn = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: dict[str, KLFn] = {}
register_kl = registrar(KL_ESTIMATORS, "KL estimator")


@register_kl("k1")
def k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


@register_kl("k2")
def k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register_kl("k3")
def k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # Clamps as verl: exp of a large log-ratio would overflow; |k3| <= 10 keeps one bad token from
    # dominating the loss.
    neg_x = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(neg_x) - neg_x - 1).clamp(-10.0, 10.0)


@register_kl("abs")
def abs_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return (logprobs - ref_logprobs).abs()


def kl_penalty(name: str, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token KL estimate `name` (k1 | k2 | k3 | abs): [B, T], [B, T] -> [B, T]."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator algo.kl_estimator={name!r}; known: {sorted(KL_ESTIMATORS)}")
    logprobs = check_tensor("logprobs", logprobs, float_dtype=True)
    ref_logprobs = check_tensor("ref_logprobs", ref_logprobs, float_dtype=True)
    check_shape("ref_logprobs", ref_logprobs, logprobs.shape, like="logprobs")
    check_finite("logprobs", logprobs)
    check_finite("ref_logprobs", ref_logprobs)
    return KL_ESTIMATORS[name](logprobs, ref_logprobs)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    *,
    estimator: str = "k3",
    loss_agg: str = "token-mean",
) -> Tensor:
    """KL in the loss: aggregate_loss(kl_penalty(estimator), mask, loss_agg) -> differentiable scalar."""
    check_mask("response_mask", response_mask, logprobs.shape, like="logprobs")
    return aggregate_loss(kl_penalty(estimator, logprobs, ref_logprobs), response_mask, loss_agg)


def apply_kl_in_reward(
    token_rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, float]:
    """KL in the reward: r'_t = r_t - beta * kl_t on response tokens -> (r' [B, T], current_kl).

    current_kl is the mean over rows of each row's mean token KL (verl's statistic); feed it to
    `controller.update(current_kl, n_steps=B)` for an adaptive coefficient. No gradient flows (the
    reward is a constant for the policy loss).
    """
    check_tensor("token_rewards", token_rewards, ndim=2, float_dtype=True)
    check_shape("logprobs", logprobs, token_rewards.shape, like="token_rewards")
    mask = check_mask("response_mask", response_mask, token_rewards.shape, like="token_rewards")
    check_finite("token_rewards", token_rewards)
    if not math.isfinite(kl_coef):
        raise ValueError(f"kl_coef must be finite, got {kl_coef!r}")
    with torch.no_grad():
        kl = kl_penalty(estimator, logprobs.detach(), ref_logprobs.detach()).to(token_rewards.dtype)
        m = mask.to(token_rewards.dtype)
        rewards = token_rewards - kl_coef * kl * m
        has_tokens = m.sum(-1) > 0
        row_kl = masked_mean(kl, m, dim=-1)
        current = float(row_kl[has_tokens].mean()) if bool(has_tokens.any()) else 0.0
    return rewards, current


class FixedKLController:
    """A constant KL coefficient (`algo.kl_coef`)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon)."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        check_range("target_kl", target_kl, 1e-12, float("inf"))
        check_range("horizon", horizon, 1, float("inf"))
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(
    kl_coef: float, target_kl: float | None = None, horizon: int = 10000
) -> FixedKLController | AdaptiveKLController:
    """Adaptive when `target_kl` is set (algo.kl_target), fixed otherwise."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
