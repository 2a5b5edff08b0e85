"""Input checks shared by the algorithm core.

Every public function in `rlloop.algos` validates its tensors here first, so a bad batch fails with
the argument's name and the offending shape or value instead of a broadcasting surprise ten calls
later. The checks are cheap (one pass over each tensor) next to a forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def check_tensor(name: str, x: object, *, ndim: int | None = None, float_dtype: bool = False) -> Tensor:
    """`x` must be a tensor (of `ndim` dims; floating point if `float_dtype`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if float_dtype and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_shape(name: str, x: Tensor, shape: Iterable[int], *, like: str = "") -> None:
    """`x.shape` must equal `shape`; `like` names the argument the shape came from."""
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape) != shape:
        ref = f" (the shape of {like})" if like else ""
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}{ref}")


def check_finite(name: str, x: Tensor) -> None:
    """No NaN or inf anywhere in `x` (padding included: a NaN there is a bug upstream)."""
    if not x.is_floating_point():
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN/inf); first at index {first}: "
            f"{x[first].item()}"
        )


def check_mask(name: str, mask: object, shape: Iterable[int] | None = None, *, like: str = "") -> Tensor:
    """A 0/1 mask (bool, int or float); returns it unchanged after checking shape and values."""
    mask = check_tensor(name, mask)
    if shape is not None:
        check_shape(name, mask, shape, like=like)
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise ValueError(f"{name} must hold only 0/1, got {mask[first].item()} at index {first}")
    return mask


def check_group_ids(group_ids: object, batch_size: int, *, group_size: int | None = None) -> Tensor:
    """`group_ids` is an integer tensor [B]; with `group_size`, every group has exactly that many rows."""
    group_ids = check_tensor("group_ids", group_ids, ndim=1)
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if group_ids.shape[0] != batch_size:
        raise ValueError(
            f"group_ids has shape {tuple(group_ids.shape)}, expected ({batch_size},) (batch size)"
        )
    if group_size is not None:
        check_group_size(group_size, batch_size)
        _, counts = torch.unique(group_ids, return_counts=True)
        wrong = counts != group_size
        if bool(wrong.any()):
            raise ValueError(
                f"group_size={group_size} but group_ids has groups of sizes {sorted(set(counts.tolist()))}"
            )
    return group_ids


def check_group_size(group_size: int, batch_size: int) -> None:
    """`group_size` (samples per prompt) must be positive and divide the batch."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if batch_size % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the batch size {batch_size}")


def make_group_ids(batch_size: int, group_size: int, device: torch.device | str | None = None) -> Tensor:
    """Group ids [B] for a batch laid out prompt by prompt: rows g*n .. g*n+n-1 share id g."""
    check_group_size(group_size, batch_size)
    return torch.arange(batch_size, device=device) // group_size


def check_choice(arg: str, value: str, choices: Iterable[str]) -> None:
    """`value` must be one of `choices`; the error names the config key `arg`."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {arg}={value!r}; expected one of {choices}")


def check_range(arg: str, value: float, lo: float, hi: float) -> None:
    """lo <= value <= hi, inclusive."""
    if not (lo <= value <= hi):
        raise ValueError(f"{arg} must be in [{lo}, {hi}], got {value!r}")
