"""Packed learner rows whose identical prompts are stored once (learner.batching=packed).

A GRPO group is n responses to one prompt; padded and sorted micro-batches run the prompt's tokens
through the model n times. A packed micro-batch here holds each distinct prompt once, followed by the
rest of every row that continues it, with the row's own position ids. The attention then needs three
rules a causal or block-diagonal mask cannot express: a prompt token sees its prompt causally; a row's
token sees its whole prompt and its own earlier tokens; and nothing sees another row. `segment_attention`
applies them by gathering each segment's queries, keys and values out of the packed row into padded
[segments, heads, length, dim] blocks (a prompt's keys are shared by its rows) and calling
`scaled_dot_product_attention` once for the prompts and once for the rows: attention costs what the
padded rows' would, without a dense [S, S] mask over the packed row, and every linear layer, where
almost all of the FLOPs are, sees each prompt token once. The logprobs, losses and gradients are the
padded path's to float tolerance (tests/learner/test_batching.py); the gradient of a shared prompt is
the sum of its rows', as with n copies.

It is registered with transformers' attention interface under `ATTENTION` (with sdpa's mask rules), so
a model set to it runs every other forward (padded rows, generation) through sdpa unchanged; a forward
gets segment attention only when it carries `rlloop_segments` (which gradient checkpointing's recompute
keeps, as it keeps every forward argument).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ATTENTION = "rlloop_segments"


@dataclass
class Segments:
    """Where a packed row's prompts and rows lie (positions into the packed row), padded per segment.

    prompt_idx/prompt_valid [G, Pm]: the G distinct prompts' positions; seq_idx/seq_valid [N, Lm]: each
    row's tokens after its prompt; seq_prompt [N]: the prompt (index into G) row n continues; order [S]:
    the inverse of the valid positions listed prompts first then rows, so that outputs computed per
    segment go back to packed order with one gather."""

    prompt_idx: torch.Tensor
    prompt_valid: torch.Tensor
    seq_idx: torch.Tensor
    seq_valid: torch.Tensor
    seq_prompt: torch.Tensor
    order: torch.Tensor

    @classmethod
    def build(
        cls, prompt_pos: list[np.ndarray], seq_pos: list[np.ndarray], seq_prompt: list[int], device: torch.device
    ) -> Segments:
        """From each prompt's and each row's packed positions (every prompt at least one token long)."""

        def padded(parts: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
            width = max(1, max(len(p) for p in parts))
            idx = np.zeros((len(parts), width), dtype=np.int64)
            valid = np.zeros((len(parts), width), dtype=bool)
            for i, p in enumerate(parts):
                idx[i, : len(p)], valid[i, : len(p)] = p, True
            return torch.from_numpy(idx).to(device), torch.from_numpy(valid).to(device)

        if any(len(p) == 0 for p in prompt_pos):
            raise ValueError("Segments: every prompt needs at least one token (its rows' queries attend to it)")
        prompt_idx, prompt_valid = padded(prompt_pos)
        seq_idx, seq_valid = padded(seq_pos)
        listed = torch.cat([prompt_idx[prompt_valid], seq_idx[seq_valid]])
        if not torch.equal(torch.sort(listed).values, torch.arange(len(listed), device=device)):
            raise ValueError("Segments: the prompts' and rows' positions must cover the packed row exactly once")
        return cls(
            prompt_idx=prompt_idx,
            prompt_valid=prompt_valid,
            seq_idx=seq_idx,
            seq_valid=seq_valid,
            seq_prompt=torch.tensor(seq_prompt, dtype=torch.long, device=device),
            order=torch.argsort(listed),
        )

    @property
    def length(self) -> int:
        return int(self.order.numel())


def _blocks(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [heads, S, dim] gathered at idx [A, B] -> [A, heads, B, dim]."""
    return x[:, idx].transpose(0, 1)


def _causal(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _sdpa(module: torch.nn.Module, q, k, v, mask, dropout: float, scaling: float | None) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa

    groups = int(getattr(module, "num_key_value_groups", 1))
    extra = {}
    if groups > 1:
        if use_gqa_in_sdpa(mask, k, v):
            extra["enable_gqa"] = True
        else:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, **extra
    )


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    rlloop_segments: Segments | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: query [1, H, S, d], key/value [1, Hkv, S, d] of one
    packed row, positional embeddings applied; returns [1, S, H, d]. Without `rlloop_segments`, sdpa."""
    if rlloop_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    seg = rlloop_segments
    if query.shape[0] != 1 or query.shape[2] != seg.length:
        raise ValueError(
            f"segment attention: expected one packed row of {seg.length} tokens, got query {tuple(query.shape)}"
        )
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(f"segment attention does not support {name} (set learner.batching=sorted)")
    q, k, v = query[0], key[0], value[0]
    device = q.device
    # prompts: causal within the prompt
    kp, vp = _blocks(k, seg.prompt_idx), _blocks(v, seg.prompt_idx)
    prompt_len = seg.prompt_idx.shape[1]
    mask_p = _causal(prompt_len, device) & seg.prompt_valid[:, None, None, :]
    out_p = _sdpa(module, _blocks(q, seg.prompt_idx), kp, vp, mask_p, dropout, scaling)
    # rows: the whole prompt, then their own tokens causally (a padded query still sees the prompt's
    # first token, so no query row is fully masked)
    seq_len = seg.seq_idx.shape[1]
    ks = torch.cat([kp[seg.seq_prompt], _blocks(k, seg.seq_idx)], dim=2)
    vs = torch.cat([vp[seg.seq_prompt], _blocks(v, seg.seq_idx)], dim=2)
    see_prompt = seg.prompt_valid[seg.seq_prompt][:, None, None, :].expand(-1, 1, seq_len, prompt_len)
    see_own = _causal(seq_len, device) & seg.seq_valid[:, None, None, :]
    mask_s = torch.cat([see_prompt, see_own], dim=-1)
    out_s = _sdpa(module, _blocks(q, seg.seq_idx), ks, vs, mask_s, dropout, scaling)
    listed = torch.cat([out_p.transpose(1, 2)[seg.prompt_valid], out_s.transpose(1, 2)[seg.seq_valid]])
    return listed[seg.order][None], None


def register() -> None:
    """Make `ATTENTION` a name transformers' models accept (idempotent): segment attention, sdpa's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, segment_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def supports_segments(model: torch.nn.Module) -> bool:
    """Whether `model` (an HF PreTrainedModel) dispatches attention through transformers' interface and
    runs sdpa, so that setting it to `ATTENTION` changes nothing but packed forwards."""
    config = getattr(model, "config", None)
    return bool(getattr(type(model), "_supports_attention_backend", False)) and getattr(
        config, "_attn_implementation", None
    ) in ("sdpa", ATTENTION)


def use_segments(model: torch.nn.Module) -> bool:
    """Set `model` to segment attention if it supports it; True if it now runs it."""
    if not supports_segments(model):
        return False
    register()
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)
    return True
