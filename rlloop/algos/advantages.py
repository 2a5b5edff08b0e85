"""Advantage estimators, one registered function each (config: `algo.advantage=NAME`).

Every estimator takes token-level rewards [B, T] (an outcome reward sits on the row's last response
token, see `rlloop.algos.fusion.place_on_last_token`), the response mask [B, T] and the prompt group
of each row [B], and returns (advantages, returns), both [B, T] and 0 outside the mask.

Notation: s_b = sum_t r_{b,t} (the row's score), G = a prompt's group of rows, mu_G / sigma_G the
group's mean / unbiased std (as torch.std and verl), eps the stabiliser. A group of one row has no
baseline, so every group-relative estimator gives it advantage 0 (it carries no comparative signal).
Rows with no response token take no part in any statistic (they are padding, not samples).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .checks import check_finite, check_group_ids, check_mask, check_range, check_shape, check_tensor
from .masked import discounted_returns, group_mean_std, masked_mean_std, masked_sum, masked_whiten

AdvantageFn = Callable[..., tuple[Tensor, Tensor]]
ADVANTAGES: dict[str, AdvantageFn] = {}
# estimators whose baseline is the prompt's group: they need rollout.n >= 2 samples per prompt
GROUP_RELATIVE: set[str] = set()

# Arguments every estimator may receive; each takes only those it declares.
_COMMON = ("values", "gamma", "lam", "eps")


def register_advantage(name: str, *, group_relative: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: `@register_advantage("grpo")` makes the function selectable by `algo.advantage`;
    `group_relative=True` marks an estimator that compares the samples of one prompt (GROUP_RELATIVE)."""

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES:
            raise ValueError(
                f"advantage estimator {name!r} is already registered ({ADVANTAGES[name].__name__})"
            )
        ADVANTAGES[name] = fn
        if group_relative:
            GROUP_RELATIVE.add(name)
        return fn

    return decorator


def get_advantage_fn(name: str) -> AdvantageFn:
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator algo.advantage={name!r}; known: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name]


def compute_advantages(
    name: str,
    token_rewards: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    *,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
    group_size: int | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Validate the inputs and run estimator `name` -> (advantages [B, T], returns [B, T]).

    token_rewards: float [B, T]; response_mask: 0/1 [B, T]; group_ids: int [B]; values: float [B, T]
    (critic, `gae` only). `group_size`, if given, must divide B and match every group. Extra keyword
    arguments go to the estimator (e.g. `reward_components` for `gdpo`); unknown ones are an error.
    """
    fn = get_advantage_fn(name)
    token_rewards = check_tensor("token_rewards", token_rewards, ndim=2, float_dtype=True)
    shape = token_rewards.shape
    response_mask = check_mask("response_mask", response_mask, shape, like="token_rewards")
    check_finite("token_rewards", token_rewards)
    group_ids = check_group_ids(group_ids, shape[0], group_size=group_size)
    if values is not None:
        values = check_tensor("values", values, float_dtype=True)
        check_shape("values", values, shape, like="token_rewards")
        check_finite("values", values)
    check_range("gamma", gamma, 0.0, 1.0)
    check_range("lam", lam, 0.0, 1.0)
    check_range("eps", eps, 0.0, float("inf"))

    params = inspect.signature(fn).parameters
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        raise TypeError(f"advantage estimator {name!r} does not take argument(s) {unknown}")
    common = {"values": values, "gamma": gamma, "lam": lam, "eps": eps}
    call = {k: v for k, v in common.items() if k in params} | kwargs
    mask = response_mask.to(token_rewards.dtype)
    advantages, returns = fn(token_rewards, mask, group_ids, **call)
    return advantages * mask, returns * mask


def _has_tokens(mask: Tensor) -> Tensor:
    """Rows with at least one response token [B] bool. Rows without (e.g. padding rows added to split a
    batch evenly over ranks) are left out of every group and batch statistic."""
    return mask.sum(-1) > 0


def _scores(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """s_b = sum_t r_{b,t} over response tokens -> [B]."""
    return masked_sum(token_rewards, mask, dim=-1)


@register_advantage("grpo", group_relative=True)
def grpo(
    token_rewards: Tensor, mask: Tensor, group_ids: Tensor, *, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """GRPO: A_b = (s_b - mu_G) / (sigma_G + eps), the same on every response token of row b."""
    s = _scores(token_rewards, mask)
    mu, sigma, _ = group_mean_std(s, _has_tokens(mask), group_ids)
    adv = ((s - mu) / (sigma + eps))[:, None] * mask
    return adv, adv


@register_advantage("dr_grpo", group_relative=True)
def dr_grpo(token_rewards: Tensor, mask: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: A_b = s_b - mu_G (no std division, which up-weights near-solved/unsolved prompts)."""
    s = _scores(token_rewards, mask)
    mu, _, _ = group_mean_std(s, _has_tokens(mask), group_ids)
    adv = (s - mu)[:, None] * mask
    return adv, adv


@register_advantage("rloo", group_relative=True)
def rloo(token_rewards: Tensor, mask: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """RLOO: A_b = s_b - mean_{j in G, j != b} s_j = (s_b - mu_G) * n / (n - 1); 0 for n = 1."""
    s = _scores(token_rewards, mask)
    mu, _, n = group_mean_std(s, _has_tokens(mask), group_ids)
    adv = ((s - mu) * n / (n - 1).clamp(min=1))[:, None] * mask
    return adv, adv


@register_advantage("reinforce_pp")
def reinforce_pp(
    token_rewards: Tensor, mask: Tensor, group_ids: Tensor, *, gamma: float = 1.0, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: G_t = sum_{t'>=t} gamma^(t'-t) r_t' per token; A = whiten(G) over the whole batch.

    Whitening uses the mean/unbiased std of all response tokens of the batch (no group baseline).
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    return masked_whiten(returns, mask, eps), returns


@register_advantage("reinforce_pp_baseline", group_relative=True)
def reinforce_pp_baseline(
    token_rewards: Tensor, mask: Tensor, group_ids: Tensor, *, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline: a_b = s_b - mu_G on every response token, then whitened over the batch's
    response tokens (so, as in verl, longer rows weigh more in the batch statistics)."""
    s = _scores(token_rewards, mask)
    mu, _, _ = group_mean_std(s, _has_tokens(mask), group_ids)
    adv = masked_whiten((s - mu)[:, None] * mask, mask, eps)
    return adv, adv


@register_advantage("gdpo", group_relative=True)
def gdpo(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    eps: float = 1e-6,
    reward_components: Tensor | None = None,
    reward_weights: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GDPO (arXiv 2601.05242), for several rewards (verifiers) on one sample.

    reward_components: [B, S], one column per reward source (default: the single source s_b).
    Each source is z-scored within the group on its own, A_b = sum_i w_i (c_bi - mu_Gi)/(sigma_Gi + eps),
    then A is z-scored over the batch's rows that have response tokens, so its scale does not grow
    with S. Normalising the weighted sum jointly (GRPO) would map different reward combinations to the
    same advantage; this keeps them apart. When `reward_components` is given, `token_rewards` is only
    used for its shape.
    """
    B = token_rewards.shape[0]
    if reward_components is None:
        comps = _scores(token_rewards, mask)[:, None]
    else:
        comps = check_tensor("reward_components", reward_components, ndim=2, float_dtype=True)
        if comps.shape[0] != B:
            raise ValueError(
                f"reward_components has shape {tuple(comps.shape)}, expected ({B}, S) (batch of token_rewards)"
            )
        check_finite("reward_components", comps)
        comps = comps.to(token_rewards.dtype)
    S = comps.shape[1]
    if reward_weights is None:
        w = torch.ones(S, dtype=comps.dtype, device=comps.device)
    else:
        w = torch.as_tensor(reward_weights, dtype=comps.dtype, device=comps.device)
        if w.shape != (S,):
            raise ValueError(f"reward_weights has shape {tuple(w.shape)}, expected ({S},) (one per source)")
        check_finite("reward_weights", w)
    has_tokens = _has_tokens(mask)
    summed = torch.zeros(B, dtype=comps.dtype, device=comps.device)
    for i in range(S):
        c = comps[:, i]
        mu, sigma, _ = group_mean_std(c, has_tokens, group_ids)
        summed = summed + w[i] * (c - mu) / (sigma + eps)
    mean, std = masked_mean_std(summed, has_tokens)
    adv = ((summed - mean) / (std + eps))[:, None] * mask
    return adv, adv


@register_advantage("gae")
def gae(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    *,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
    whiten: bool = True,
) -> tuple[Tensor, Tensor]:
    """GAE with a critic: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1},
    returns R_t = A_t + V_t; V after the last response token is 0 (terminal). Masked tokens are
    skipped (as verl). Advantages are then whitened over the batch unless `whiten=False`.
    """
    if values is None:
        raise ValueError("advantage estimator 'gae' needs values [B, T] from a critic (got values=None)")
    values = values.to(token_rewards.dtype)
    next_value = torch.zeros_like(token_rewards[:, 0])
    last_adv = torch.zeros_like(token_rewards[:, 0])
    adv = torch.zeros_like(token_rewards)
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * last_adv
        next_value = m * values[:, t] + (1 - m) * next_value
        last_adv = m * a + (1 - m) * last_adv
        adv[:, t] = last_adv * m
    returns = (adv + values) * mask
    if whiten:
        adv = masked_whiten(adv, mask, eps)
    return adv, returns
