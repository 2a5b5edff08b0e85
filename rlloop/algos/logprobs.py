"""Log-probabilities and entropies of sampled tokens, chunked over rows so that no [B, T, V] temporary
but the logits themselves (and, in backward, their gradient) is ever allocated.

The plain way, `log_softmax(logits / T).gather(...)`, holds three vocabulary-sized tensors at once in
forward (the logits, the scaled copy, the log-softmax that autograd keeps for backward), and the entropy
metric two or three more; on SmolLM2 (V = 49152) a 32 x 128 response micro-batch is 0.8 GB per tensor.
Here forward keeps only the logits and a [B, T] log-sum-exp; backward recomputes the softmax chunk by
chunk: d logp(y) / d z = (onehot(y) - softmax(z / T)) / T.

`token_logprobs` is what the policy learner, the critic and the implicit PRM read from a causal LM's
logits; it lives here, below `learner/` and `rewards/`, so neither imports the other for it.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 64 * 2**20  # float32 working set per chunk of rows


def _rows_per_chunk(logits: torch.Tensor) -> int:
    per_row = max(1, logits.shape[1] * logits.shape[2] * 4)
    return max(1, CHUNK_BYTES // per_row)


class _SampledLogprobs(torch.autograd.Function):
    """logits [B, L, V] (any float dtype), targets [B, L'] long (L' = L - 1: the last position scores
    nothing; L' = L: every position scores one) -> (logprobs, entropy) [B, L'], float32 (float64 for
    float64 logits): position t of the logits scores targets[:, t]. Only the logprobs carry a gradient;
    the entropy is a metric (zeros unless with_entropy)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy):
        rows = logits.shape[0]
        length = targets.shape[1] + 1
        work = torch.promote_types(logits.dtype, torch.float32)  # bf16 is upcast, float64 kept
        logprobs = logits.new_empty((rows, length - 1), dtype=work)
        entropy = torch.zeros_like(logprobs)
        lse = torch.empty_like(logprobs)
        step = _rows_per_chunk(logits)
        for r in range(0, rows, step):
            z = logits[r : r + step, : length - 1].to(work) / temperature
            lse[r : r + step] = torch.logsumexp(z, dim=-1)
            logprobs[r : r + step] = z.gather(-1, targets[r : r + step, :, None]).squeeze(-1) - lse[r : r + step]
            if with_entropy:
                p = torch.exp(z - lse[r : r + step, :, None])
                entropy[r : r + step] = lse[r : r + step] - (p * z).sum(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        logits, targets, lse = ctx.saved_tensors
        temperature = ctx.temperature
        scored = targets.shape[1]
        grad = torch.zeros_like(logits)
        step = _rows_per_chunk(logits)
        for r in range(0, logits.shape[0], step):
            g = grad_logprobs[r : r + step, :, None].to(lse.dtype)
            z = logits[r : r + step, :scored].to(lse.dtype) / temperature
            chunk = torch.exp(z - lse[r : r + step, :, None]).mul_(-g)
            chunk.scatter_add_(-1, targets[r : r + step, :, None], g)
            grad[r : r + step, :scored] = chunk.div_(temperature)
        return grad, None, None, None


def sampled_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    start: int = 0,
    *,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(input_ids[:, t] | input_ids[:, :t]), entropy of that distribution), each [B, T], float32
    (float64 for float64 logits).

    logits [B, T - start, V] are a causal LM's logits at positions start..T-1 (all of them when start is
    0), divided by the sampling temperature before the softmax, as the rollout engine samples. Column t
    of the results is the distribution that predicts token t; columns 0..start are 0 (no logits predict
    them). The logprobs are differentiable; the entropy is not (for a metric; an entropy bonus needs
    `rlloop.algos.losses.entropy_from_logits`) and is all 0 when not `with_entropy` (saves an exp per
    logit).
    """
    if logits.dim() != 3 or input_ids.dim() != 2:
        raise ValueError(f"sampled_logprobs: logits [B, L, V] and input_ids [B, T], got "
                         f"{tuple(logits.shape)} and {tuple(input_ids.shape)}")  # fmt: skip
    if logits.shape[1] + start != input_ids.shape[1] or logits.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"sampled_logprobs: logits {tuple(logits.shape)} from column {start} do not cover input_ids "
            f"{tuple(input_ids.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"sampled_logprobs: temperature must be > 0, got {temperature}")
    targets = input_ids[:, start + 1 :].contiguous()
    logprobs, entropy = _SampledLogprobs.apply(logits, targets, float(temperature), bool(with_entropy))
    pad = (start + 1, 0)
    return torch.nn.functional.pad(logprobs, pad), torch.nn.functional.pad(entropy, pad)


def position_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets[i] | the context of logits[i]), entropy), each [N]: `sampled_logprobs` for logits
    [N, V] gathered at the N positions that predict a trained token (a packed micro-batch's), each
    scoring its own target [N]. Same chunked forward and backward; only the logprobs carry a gradient."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"position_logprobs: logits [N, V] and targets [N], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")  # fmt: skip
    if not temperature > 0:
        raise ValueError(f"position_logprobs: temperature must be > 0, got {temperature}")
    # [N, 1, V]: each position a row of its own, so the chunks stay within CHUNK_BYTES
    logprobs, entropy = _SampledLogprobs.apply(
        logits[:, None], targets[:, None].contiguous(), float(temperature), bool(with_entropy)
    )
    return logprobs[:, 0], entropy[:, 0]


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0, start: int = 0
) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) from the logits of a causal LM.

    logits [B, T - start, V] are those of positions start..T-1 (all of them when start = 0), input_ids
    [B, T] -> [B, T] float32 with columns 0..start set to 0 (no logits predict them).
    Logits are divided by the sampling temperature first, as the rollout engine samples from them.
    """
    return sampled_logprobs(logits, input_ids, temperature, start, with_entropy=False)[0]


def used_length(attention_mask) -> int:
    """Columns up to and including the last attended token of any row (right padding is cut off).

    attention_mask: [B, T], a tensor or a numpy array.
    """
    # any() over rows first: on a read-only numpy array (Ray's zero-copy objects) torch.as_tensor warns
    # on every call; the row-reduced copy is writable and tiny
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) else attention_mask.any(axis=0)
    cols = torch.as_tensor(mask).reshape(-1, mask.shape[-1]).any(dim=0).nonzero()
    return int(cols[-1]) + 1 if cols.numel() else 1
