"""Masked and grouped statistics: the few reductions every estimator, loss and fusion mode shares.

Conventions (all functions): masks are 0/1 (any dtype) and only positions with mask 1 count;
standard deviations are unbiased (Bessel-corrected), as `torch.std` and verl's `masked_whiten`;
a set whose values all tie has exactly that value as mean (so it centres to exact zeros);
a set of fewer than two elements, or whose values all tie, has no spread: its std is taken as 1 (its
centred values are exactly 0 anyway, and a scale-only normalisation then leaves the values as they are
instead of dividing them by eps).
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over mask-1 entries; 0 where there are none (so empty rows give 0, not NaN)."""
    mask = mask.to(x.dtype)
    total = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / total.clamp(min=1)


def _snap_tied(mean: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """Where all values tie (max == min) the mean is that value exactly: a float mean like
    (0.7 + 0.7 + 0.7) / 3 is off by 1e-16, which (x - mean) / (std + eps) would blow up to 1e-10 and a
    later normalisation (GDPO's batch step) to O(1e-4) noise."""
    return torch.where(hi == lo, hi, mean)


def masked_mean_std(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std of the mask-1 entries of `x` (any shape) -> two scalars."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    hi, lo = x.masked_fill(mask == 0, -torch.inf).max(), x.masked_fill(mask == 0, torch.inf).min()
    mean = _snap_tied(masked_sum(x, mask) / n.clamp(min=1), hi, lo)
    var = masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1)
    std = torch.where((n >= 2) & (hi != lo), var.sqrt(), torch.ones_like(var))
    return mean, std


def masked_whiten(x: Tensor, mask: Tensor, eps: float) -> Tensor:
    """(x - mean) / (std + eps) over the mask-1 entries of the whole tensor; 0 where mask is 0."""
    mean, std = masked_mean_std(x, mask)
    return (x - mean) / (std + eps) * mask.to(x.dtype)


def group_mean_std(x: Tensor, mask: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group mean, unbiased std and count of the mask-1 entries of `x`, pooled over a group's rows.

    x, mask: [B] or [B, K] (all K entries of a row belong to the row's group); group_ids: [B] int.
    Returns mean, std, count broadcast back to x's shape. Groups with count < 2 get std 1.
    """
    mask = mask.to(x.dtype)
    gid = group_ids if x.dim() == 1 else group_ids[:, None].expand_as(x)
    _, inv = torch.unique(gid.reshape(-1), return_inverse=True)
    num_groups = int(inv.max()) + 1 if inv.numel() else 0
    flat_x, flat_m = x.reshape(-1), mask.reshape(-1)
    zeros = torch.zeros(num_groups, dtype=x.dtype, device=x.device)
    count = zeros.index_add(0, inv, flat_m)
    mean = zeros.index_add(0, inv, flat_x * flat_m) / count.clamp(min=1)
    hi = torch.full_like(zeros, -torch.inf).scatter_reduce(
        0, inv, flat_x.masked_fill(flat_m == 0, -torch.inf), "amax"
    )
    lo = torch.full_like(zeros, torch.inf).scatter_reduce(
        0, inv, flat_x.masked_fill(flat_m == 0, torch.inf), "amin"
    )
    mean = _snap_tied(mean, hi, lo)
    dev2 = zeros.index_add(0, inv, (flat_x - mean[inv]) ** 2 * flat_m)
    std = torch.where(
        (count >= 2) & (hi != lo), (dev2 / (count - 1).clamp(min=1)).sqrt(), torch.ones_like(count)
    )
    return (t[inv].reshape(x.shape) for t in (mean, std, count))  # type: ignore[return-value]


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last mask-1 position of each row [B, T] -> [B] long; -1 for rows with none."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def discounted_returns(
    rewards: Tensor, mask: Tensor, gamma: float, discount_at: Tensor | None = None
) -> Tensor:
    """G_t = r_t + g_t * G_{t+1} over the mask-1 tokens of each row [B, T]; 0 where mask is 0.

    g_t = gamma at every response token, or (with `discount_at` [B, T] 0/1) gamma only at tokens where
    discount_at is 1 and 1 elsewhere -- used by step fusion, which discounts once per reasoning step.
    Masked tokens are skipped (neither add reward nor discount), so holes in the mask (e.g. tool output
    in a multi-turn response) pass future rewards through, as verl's GAE does.
    """
    mask = mask.to(rewards.dtype)
    if discount_at is None:
        discount = torch.full_like(rewards, gamma)
    else:
        discount = torch.where(discount_at.bool(), torch.full_like(rewards, gamma), torch.ones_like(rewards))
    running = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        running = m * (rewards[:, t] + discount[:, t] * running) + (1 - m) * running
        out[:, t] = running * m
    return out
