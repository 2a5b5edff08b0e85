"""TD-PRM targets and losses (DESIGN.md "TD-PRM"; TDRM, arXiv 2509.15110).

Layout: step tensors are padded [B, K]; `step_mask[b, k] = 1` iff step k of row b is real. Real steps
of a row must come first (right padding); row b has L_b = sum_k step_mask[b, k] steps, its terminal
step is k = L_b - 1. `values[b, k]` = V_k = sigmoid(PRM logit) after step k; `outcome[b]` = ℓ ∈ [0, 1]
(the verified outcome). Optional `rewards[b, k]` = r_k (shaped intermediate rewards; 0 by default).

Targets (per row; every row uses ITS OWN length — a batch mixing lengths gives each row the targets it
would get alone, unlike the TDRM release's 2/3-step collator that applied one row's mask to all):

    TD(0):    y_k = clamp(r_k + γ·V_{k+1}, 0, 1)                         k < L-1;   y_{L-1} = ℓ
    n-step:   y_k = clamp(Σ_{i<m} γ^i r_{k+i} + γ^m V_{k+m}, 0, 1),  m = min(n, L-1-k);   y_{L-1} = ℓ
              (the window is truncated at the terminal step; n = 1 is TD(0))
    TD(λ):    G_{L-1} = ℓ;  G_k = r_k + γ((1-λ)V_{k+1} + λ G_{k+1});   y_k = clamp(G_k, 0, 1)
              (G is accumulated unclamped and clamped once at the end; λ = 0 is TD(0), and λ = 1 is the
              discounted Monte-Carlo return G_k = Σ_{i<L-1-k} γ^i r_{k+i} + γ^{L-1-k} ℓ)
    mc:       y_k = ℓ for every step (ScalarPRM with outcome labels; = TD(λ) at λ = 1, γ = 1, r = 0)
    reach:    G_{L-1} = ℓ;  G_k = max(h_k, γ((1-λ)V_{k+1} + λG_{k+1}));   y_k = clamp(G_k, 0, 1)
              (needs hard step labels h_k ∈ {0, 1}: 1 when some sampled continuation of the prefix ending
              at step k succeeded, Math-Shepherd's hard estimate. The value is whether SOME continuation
              can still succeed, whose Bellman backup is a max, not a sum: a prefix is reachable if a later
              prefix of the same solution is, or if one of its own samples succeeded. λ = 0 bootstraps on
              the next value alone; λ = 1 is the labels backed up along the solution, no values.)

The terminal step's reward r_{L-1} is unused (its target is the outcome itself). Bootstrapped values are
detached (semi-gradient TD): `values` is `.detach()`ed inside every target function. Targets are 0 on
padded steps. All functions are pure torch (no I/O), vectorised over B; loops run over K only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_choice, check_finite, check_mask, check_range, check_shape, check_tensor

TD_KINDS = ("td0", "nstep", "td_lambda", "mc")


def _check_steps(
    values: Tensor, step_mask: Tensor, outcome: Tensor, rewards: Tensor | None, gamma: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Validate the common inputs -> (values detached, bool mask, outcome, rewards, lengths [B])."""
    values = check_tensor("values", values, ndim=2, float_dtype=True).detach()
    check_finite("values", values)
    mask = check_mask("step_mask", step_mask, values.shape, like="values").to(torch.bool)
    outcome = check_tensor("outcome", outcome, ndim=1)
    check_shape("outcome", outcome, values.shape[:1], like="values[:, 0]")
    outcome = outcome.to(values.dtype)
    check_finite("outcome", outcome)
    if bool(((outcome < 0) | (outcome > 1)).any()):
        bad = int(((outcome < 0) | (outcome > 1)).nonzero()[0])
        raise ValueError(f"outcome must lie in [0, 1]; row {bad} has {outcome[bad].item()}")
    if rewards is None:
        rewards = torch.zeros_like(values)
    else:
        rewards = check_tensor("rewards", rewards, ndim=2, float_dtype=True).detach()
        check_shape("rewards", rewards, values.shape, like="values")
        check_finite("rewards", rewards)
    check_range("gamma", float(gamma), 0.0, 1.0)
    lengths = mask.sum(dim=1)
    steps = torch.arange(values.shape[1], device=values.device)
    prefix = steps[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask):
        bad = int((prefix != mask).any(dim=1).nonzero()[0])
        raise ValueError(
            f"step_mask row {bad} is not right-padded (real steps must come first): {mask[bad].int().tolist()}"
        )
    return values, mask, outcome, rewards, lengths


def _shift_left(x: Tensor, by: int) -> Tensor:
    """x[:, k + by] at column k, 0 past the end. [B, K] -> [B, K]."""
    if by == 0:
        return x
    out = torch.zeros_like(x)
    if by < x.shape[1]:
        out[:, : x.shape[1] - by] = x[:, by:]
    return out


def td0_targets(
    values: Tensor, step_mask: Tensor, outcome: Tensor, *, gamma: float = 0.8, rewards: Tensor | None = None
) -> Tensor:
    """TD(0) targets y [B, K]: clamp(r_k + γ V_{k+1}, 0, 1); the terminal step gets ℓ; 0 on padding."""
    values, mask, outcome, rewards, lengths = _check_steps(values, step_mask, outcome, rewards, gamma)
    y = (rewards + gamma * _shift_left(values, 1)).clamp(0.0, 1.0)
    is_last = torch.arange(values.shape[1], device=values.device)[None, :] == (lengths[:, None] - 1)
    y = torch.where(is_last, outcome[:, None].expand_as(y), y)
    return y * mask


def nstep_targets(
    values: Tensor,
    step_mask: Tensor,
    outcome: Tensor,
    *,
    n: int = 2,
    gamma: float = 0.8,
    rewards: Tensor | None = None,
) -> Tensor:
    """n-step targets y [B, K]: clamp(Σ_{i<m} γ^i r_{k+i} + γ^m V_{k+m}, 0, 1) with m = min(n, L-1-k).

    The window stops at the terminal step L-1 (whose own target is ℓ); it bootstraps on V_{L-1}
    there, as TD(0) does, so `n=1` equals `td0_targets`.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (TD steps) must be a positive int, got {n!r}")
    values, mask, outcome, rewards, lengths = _check_steps(values, step_mask, outcome, rewards, gamma)
    K = values.shape[1]
    k = torch.arange(K, device=values.device)[None, :]
    to_terminal = (lengths[:, None] - 1 - k).clamp(min=0)  # L-1-k: steps left to the terminal state
    m = to_terminal.clamp(max=n)  # [B, K] window length actually used
    y = torch.zeros_like(values)
    for i in range(min(n, K)):
        y = y + torch.where(i < m, (gamma**i) * _shift_left(rewards, i), torch.zeros_like(y))
    boot_index = (k + m).clamp(max=K - 1)
    y = y + torch.pow(torch.full_like(values, gamma), m.to(values.dtype)) * values.gather(1, boot_index)
    y = y.clamp(0.0, 1.0)
    y = torch.where(to_terminal == 0, outcome[:, None].expand_as(y), y)
    return y * mask


def td_lambda_targets(
    values: Tensor,
    step_mask: Tensor,
    outcome: Tensor,
    *,
    lam: float = 0.7,
    gamma: float = 0.8,
    rewards: Tensor | None = None,
) -> Tensor:
    """TD(λ) targets y [B, K] = clamp(G_k, 0, 1), G_{L-1} = ℓ, G_k = r_k + γ((1-λ)V_{k+1} + λG_{k+1}).

    G is computed unclamped (the λ-return is a convex mix of n-step returns, so clamping inside the
    recursion would change it) and clamped to [0, 1] at the end, as BCE needs.
    """
    check_range("lam", float(lam), 0.0, 1.0)
    values, mask, outcome, rewards, lengths = _check_steps(values, step_mask, outcome, rewards, gamma)
    return _lambda_return(values, mask, outcome, lengths, rewards, torch.add, gamma=gamma, lam=lam)


def _lambda_return(values, mask, outcome, lengths, step_terms, combine, *, gamma: float, lam: float) -> Tensor:
    """G_{L-1} = ℓ, G_k = combine(step_terms_k, γ((1-λ)V_{k+1} + λG_{k+1})), accumulated unclamped and
    clamped to [0, 1] once; 0 on padding. combine: torch.add (TD(λ)), torch.maximum (reach)."""
    K = values.shape[1]
    G = torch.zeros_like(values)
    next_G = torch.zeros_like(outcome)
    for k in range(K - 1, -1, -1):
        next_v = values[:, k + 1] if k + 1 < K else torch.zeros_like(outcome)
        g = combine(step_terms[:, k], gamma * ((1.0 - lam) * next_v + lam * next_G))
        g = torch.where(lengths - 1 == k, outcome, g)
        g = torch.where(k < lengths, g, torch.zeros_like(g))
        G[:, k] = g
        next_G = g
    return G.clamp(0.0, 1.0) * mask


def reach_targets(
    values: Tensor,
    step_mask: Tensor,
    outcome: Tensor,
    labels: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.0,
) -> Tensor:
    """Reachability targets y [B, K] (module docstring): G_{L-1} = ℓ, G_k = max(h_k, γ((1-λ)V_{k+1} + λG_{k+1})),
    y = clamp(G, 0, 1); 0 on padding. `labels` [B, K] are hard MC step labels h_k (1: a sampled continuation
    of the prefix ending at step k succeeded). λ = 0 is the one-step backup max(h_k, γV_{k+1}); λ = 1 needs
    no values: max(h_k, γh_{k+1}, γ²h_{k+2}, ..., γ^{L-1-k}ℓ), the labels themselves backed up."""
    check_range("lam", float(lam), 0.0, 1.0)
    values, mask, outcome, _, lengths = _check_steps(values, step_mask, outcome, None, gamma)
    labels = check_tensor("labels", labels, ndim=2, float_dtype=True).detach()
    check_shape("labels", labels, values.shape, like="values")
    check_finite("labels", labels)
    real = mask & ((labels < 0) | (labels > 1))
    if bool(real.any()):
        b, k = (int(i) for i in real.nonzero()[0])
        raise ValueError(f"reach labels must lie in [0, 1]; row {b} step {k} has {labels[b, k].item()}")
    return _lambda_return(values, mask, outcome, lengths, labels.to(values.dtype), torch.maximum, gamma=gamma, lam=lam)


def mc_targets(values: Tensor, step_mask: Tensor, outcome: Tensor) -> Tensor:
    """ScalarPRM targets [B, K]: every real step's target is the outcome ℓ (0 on padding)."""
    values, mask, outcome, _, _ = _check_steps(values, step_mask, outcome, None, 1.0)
    return outcome[:, None].expand_as(values) * mask


def compute_td_targets(
    kind: str,
    values: Tensor,
    step_mask: Tensor,
    outcome: Tensor,
    *,
    gamma: float = 0.8,
    n: int = 2,
    lam: float = 0.7,
    rewards: Tensor | None = None,
) -> Tensor:
    """Targets [B, K] of `kind` in td0 | nstep | td_lambda | mc (see the module docstring)."""
    check_choice("td", kind, TD_KINDS)
    if kind == "td0":
        return td0_targets(values, step_mask, outcome, gamma=gamma, rewards=rewards)
    if kind == "nstep":
        return nstep_targets(values, step_mask, outcome, n=n, gamma=gamma, rewards=rewards)
    if kind == "td_lambda":
        return td_lambda_targets(values, step_mask, outcome, lam=lam, gamma=gamma, rewards=rewards)
    return mc_targets(values, step_mask, outcome)


def terminal_mask(step_mask: Tensor) -> Tensor:
    """1 at each row's last real step, else 0. [B, K] bool."""
    mask = step_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    return (torch.arange(mask.shape[1], device=mask.device)[None, :] == (lengths[:, None] - 1)) & mask


def prm_bce_loss(
    logits: Tensor, targets: Tensor, step_mask: Tensor, *, terminal_weight: float = 1.0
) -> Tensor:
    """Soft-label BCE between sigmoid(logits) and targets, averaged over real steps -> scalar.

    loss = Σ_{b,k} w_{b,k} · BCE(σ(logit_{b,k}), y_{b,k}) / Σ_{b,k} mask_{b,k}, with w = mask except
    `terminal_weight` at each row's last step (as TDRM: the weight scales, it does not renormalise).
    Computed from logits (log-sigmoid), so it is finite for any logit. Targets are detached.
    """
    logits = check_tensor("logits", logits, ndim=2, float_dtype=True)
    check_shape("targets", targets, logits.shape, like="logits")
    mask = check_mask("step_mask", step_mask, logits.shape, like="logits").to(logits.dtype)
    if terminal_weight < 0 or not math.isfinite(terminal_weight):
        raise ValueError(f"terminal_weight must be a finite number >= 0, got {terminal_weight!r}")
    targets = targets.detach().to(logits.dtype)
    if bool((((targets < 0) | (targets > 1)) & (mask > 0)).any()):
        raise ValueError("targets must lie in [0, 1] on real steps (clamp TD targets first)")
    weights = mask + (terminal_weight - 1.0) * terminal_mask(mask).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, targets * mask, reduction="none")
    return (bce * weights).sum() / mask.sum().clamp(min=1.0)


def smoothness(values: Tensor, step_mask: Tensor) -> Tensor:
    """TDRM's smoothness: mean |V_{k+1} - V_k| over transitions between real steps -> scalar (0 if none).

    Lower is smoother. values, step_mask: [B, K].
    """
    values = check_tensor("values", values, ndim=2, float_dtype=True).detach()
    mask = check_mask("step_mask", step_mask, values.shape, like="values").to(values.dtype)
    pair = mask[:, 1:] * mask[:, :-1]
    diffs = (values[:, 1:] - values[:, :-1]).abs() * pair
    return diffs.sum() / pair.sum().clamp(min=1.0)


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of `scores` [N] for binary `labels` [N] (> 0.5 = positive).

    Mann-Whitney U with average ranks, so tied scores count 1/2. Raises ValueError unless both
    classes are present.
    """
    scores = check_tensor("scores", scores, ndim=1).detach().to(torch.float64)
    labels = check_tensor("labels", labels, ndim=1).detach()
    check_shape("labels", labels, scores.shape, like="scores")
    pos = labels.to(torch.float64) > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes; got {n_pos} positive and {n_neg} negative labels")
    uniq, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # rank of a tied block = mean of the 1-based ranks it occupies
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2
    rank_sum = avg_rank[inverse][pos].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def ema_state(target: dict[str, Tensor], online: dict[str, Tensor], *, decay: float) -> dict[str, Tensor]:
    """New EMA target-network state: decay·target + (1-decay)·online per floating tensor (others copied).

    Pure: returns new tensors, leaves both inputs untouched. Keys must match.
    """
    check_range("decay", float(decay), 0.0, 1.0)
    if target.keys() != online.keys():
        missing = sorted(set(online) ^ set(target))
        raise KeyError(f"ema_state: target and online state dicts differ in keys {missing[:5]}")
    out = {}
    for name, t in target.items():
        o = online[name].detach()
        out[name] = (decay * t + (1.0 - decay) * o.to(t.dtype)) if t.is_floating_point() else o.clone()
    return out


__all__ = [
    "TD_KINDS",
    "auroc",
    "compute_td_targets",
    "ema_state",
    "mc_targets",
    "nstep_targets",
    "prm_bce_loss",
    "reach_targets",
    "smoothness",
    "td0_targets",
    "td_lambda_targets",
    "terminal_mask",
]
