"""Dynamic sampling and length shaping (DAPO, arXiv 2503.14476).

A group whose rewards all tie has zero group-relative advantage: it costs a forward/backward pass and
teaches nothing, and it shrinks the effective batch. DAPO drops such groups and refills the batch by
sampling more prompts; `filter_tied_groups` finds them and `select_groups` trims the accumulated
survivors of several sampling rounds to the target number of groups (the controller does the
sampling). `overlong_penalty` is DAPO's soft length penalty.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_finite, check_group_ids, check_range, check_tensor


def filter_tied_groups(
    rewards: Tensor, group_ids: Tensor, *, keep_singletons: bool = True, atol: float = 0.0
) -> tuple[Tensor, float]:
    """Keep mask [B] (bool) dropping every group whose rewards all tie, and the fraction of groups dropped.

    rewards: per-sample scalar [B]; ties are max - min <= atol within the group. A group of one sample
    ties trivially; it is kept by default (as verl), because estimators without a group baseline
    (reinforce_pp, gae) still learn from it -- pass keep_singletons=False to drop it too.
    """
    rewards = check_tensor("rewards", rewards, ndim=1, float_dtype=True)
    check_finite("rewards", rewards)
    group_ids = check_group_ids(group_ids, rewards.shape[0])
    check_range("atol", atol, 0.0, float("inf"))
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device), 0.0
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    hi = torch.full((num_groups,), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    lo = torch.full((num_groups,), torch.inf, dtype=rewards.dtype, device=rewards.device)
    hi = hi.scatter_reduce(0, inv, rewards, reduce="amax")
    lo = lo.scatter_reduce(0, inv, rewards, reduce="amin")
    keep_group = (hi - lo) > atol
    if keep_singletons:
        keep_group = keep_group | (counts == 1)
    return keep_group[inv], float((~keep_group).sum()) / num_groups


def select_groups(keep: Tensor, group_ids: Tensor, max_groups: int) -> Tensor:
    """Row indices (long, ascending) of the kept rows of the first `max_groups` kept groups, in order
    of first appearance -- how DAPO trims an over-full refilled batch to its target size."""
    keep = check_tensor("keep", keep, ndim=1)
    group_ids = check_group_ids(group_ids, keep.shape[0])
    check_range("max_groups", max_groups, 0, float("inf"))
    keep = keep.bool()
    chosen: set[int] = set()
    rows: list[int] = []
    for i, (k, g) in enumerate(zip(keep.tolist(), group_ids.tolist(), strict=True)):
        if not k:
            continue
        if g not in chosen:
            if len(chosen) >= max_groups:
                continue
            chosen.add(g)
        rows.append(i)
    return torch.tensor(rows, dtype=torch.long, device=keep.device)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward: lengths [B] -> [B] in [-penalty, 0].

    0 for length <= max_len - buffer, then falling linearly to -penalty at max_len, and -penalty beyond.
    buffer = 0 disables it (all zeros).
    """
    lengths = check_tensor("lengths", lengths, ndim=1)
    check_range("max_len", max_len, 1, float("inf"))
    check_range("buffer", buffer, 0, max_len)
    check_range("penalty", penalty, 0.0, float("inf"))
    out_dtype = lengths.dtype if lengths.is_floating_point() else torch.get_default_dtype()
    if buffer == 0:
        return torch.zeros(lengths.shape, dtype=out_dtype, device=lengths.device)
    excess = lengths.to(out_dtype) - (max_len - buffer)
    return (-excess / buffer * penalty).clamp(min=-penalty, max=0.0)
