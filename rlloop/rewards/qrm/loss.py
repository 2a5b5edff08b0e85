"""Q-RM math (pure: tensors in, tensors out).

Pairwise loss (Q-RM release, arXiv 2505.23363):

    L = -log σ( β · (mean_t s_t^chosen − mean_t s_t^rejected) − γ ),   β = 0.2, γ = 2.0

with the means over each completion's tokens only (never the prompt). Token rewards for RL (Q-RM's PPO
recipe): r_t = s_t / std(s over the batch's action tokens), no mean subtraction — the same as
`rlloop.algos.fusion.token_fusion(..., token_norm="std")`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlloop.algos.masked import masked_mean_std

QRM_BETA = 0.2  # released defaults
QRM_GAMMA = 2.0


def _check_pair(name: str, s: Tensor, mask: Tensor) -> Tensor:
    if s.dim() != 2 or mask.shape != s.shape:
        raise ValueError(f"{name}: scores {tuple(s.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    mask = mask.to(s.dtype)
    empty = (mask.sum(-1) == 0).nonzero()
    if empty.numel():
        raise ValueError(f"{name}: row {int(empty[0])} has no completion tokens (empty completion)")
    return mask


def sequence_mean(s: Tensor, mask: Tensor) -> Tensor:
    """mean_t s_t over each row's mask-1 tokens: s, mask `[B, T]` -> `[B]`."""
    mask = mask.to(s.dtype)
    return (s * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def qrm_pair_margin(
    s_chosen: Tensor, mask_chosen: Tensor, s_rejected: Tensor, mask_rejected: Tensor
) -> Tensor:
    """Δ_b = mean_t s_t^chosen − mean_t s_t^rejected -> `[B]`. The two sides may have different T."""
    mc = _check_pair("chosen", s_chosen, mask_chosen)
    mr = _check_pair("rejected", s_rejected, mask_rejected)
    if s_chosen.shape[0] != s_rejected.shape[0]:
        raise ValueError(f"{s_chosen.shape[0]} chosen rows but {s_rejected.shape[0]} rejected rows")
    return sequence_mean(s_chosen, mc) - sequence_mean(s_rejected, mr)


def qrm_pair_loss(
    s_chosen: Tensor,
    mask_chosen: Tensor,
    s_rejected: Tensor,
    mask_rejected: Tensor,
    *,
    beta: float = QRM_BETA,
    gamma: float = QRM_GAMMA,
) -> tuple[Tensor, Tensor]:
    """(mean over pairs of −log σ(β·Δ_b − γ), Δ `[B]`); s/mask `[B, T]`, masks 1 on completion tokens.

    −log σ(x) is computed as softplus(−x), which stays finite for any x.
    """
    margin = qrm_pair_margin(s_chosen, mask_chosen, s_rejected, mask_rejected)
    return F.softplus(-(beta * margin - gamma)).mean(), margin


def pair_accuracy(margin: Tensor) -> float:
    """Share of pairs whose chosen completion scores higher on average (Δ_b > 0)."""
    return float((margin > 0).double().mean()) if margin.numel() else float("nan")


def qrm_token_rewards(s: Tensor, action_mask: Tensor) -> Tensor:
    """r_t = s_t / std(s over all action tokens of the batch); 0 off the mask. s, mask `[B, T]` -> `[B, T]`.

    The std is the unbiased std of the mask-1 entries (1 when they all tie or there are fewer than two,
    so nothing blows up), exactly what `token_fusion(token_norm="std")` divides by.
    """
    mask = action_mask.to(s.dtype)
    _, std = masked_mean_std(s * mask, mask)
    return s * mask / std


def eos_reward_to_mean(r: Tensor, action_mask: Tensor) -> Tensor:
    """Q-RM's REINFORCE variant: each row's last action token gets the row's mean token reward instead.

    r, mask `[B, T]` -> `[B, T]` (rows without action tokens unchanged).
    """
    mask = action_mask.to(r.dtype)
    out = r * mask
    n = mask.sum(-1)
    positions = torch.arange(r.shape[-1], device=r.device).expand_as(r)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values
    rows = (n > 0).nonzero().squeeze(-1)
    out[rows, last[rows]] = sequence_mean(r, mask)[rows]
    return out
