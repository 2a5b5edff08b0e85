"""The PRM: an HF causal-LM backbone with a scalar value head on every token.

V(s) = sigmoid(head(h_t)), read at the token that ends a step. The backbone is causal, so one forward
pass over a whole trajectory gives the value of every prefix at once (TDRM's release re-encodes each
prefix: k passes for k steps); `one_pass_step_logits` reads them.

A saved PRM is an HF folder: the backbone's own files (loadable with `AutoModel`), the head in
`value_head.safetensors`, and `rlloop_prm.json` describing it.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from rlloop.rewards.heads import HeadModel

logger = logging.getLogger(__name__)

HEAD_FILE = "value_head.safetensors"
META_FILE = "rlloop_prm.json"


class ValueHeadModel(HeadModel):
    """Backbone (`AutoModel`, the causal LM without its LM head) + `Linear(H, 1)` value head.

    The head is kept in float32 and applied to float32 hidden states, so values are not quantised by a
    bf16 backbone. A fresh head is zero: logit 0 everywhere, V = 0.5.
    """

    HEAD_FILE = HEAD_FILE
    META_FILE = META_FILE
    KIND = "PRM"
    META = {
        "format": "rlloop-prm",
        "format_version": 1,
        "head": "linear",
        "value": "sigmoid(logit) read at step-end tokens",
    }

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        if head is None:  # untrained default: logit 0 everywhere, V = 0.5
            head = nn.Linear(backbone.config.hidden_size, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        super().__init__(backbone, head)

    @classmethod
    def missing_head_hint(cls, path: str) -> str:
        return f"To start from a plain causal LM use ValueHeadModel.from_backbone({path!r}) (fresh head, V = 0.5)."

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Value logits at every token: input_ids `[B, T]` -> `[B, T]` float32 (V = sigmoid)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        # float32 head (see the class doc) unless an engine cast it (DeepSpeed bf16 casts every parameter)
        return self.head(hidden.to(self.head.weight.dtype)).float().squeeze(-1)


has_value_head = ValueHeadModel.has_head


def gather_positions(logits: torch.Tensor, positions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Row b's logits at `positions[b]`: logits `[B, T]` -> B tensors `[len(positions[b])]` (keeps grad)."""
    if len(positions) != logits.shape[0]:
        raise ValueError(f"gather_positions: {len(positions)} position lists for {logits.shape[0]} rows")
    out = []
    for b, pos in enumerate(positions):
        index = torch.as_tensor(list(pos), dtype=torch.long, device=logits.device)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= logits.shape[1]):
            raise IndexError(
                f"gather_positions: row {b} positions {list(pos)} outside [0, {logits.shape[1]})"
            )
        out.append(logits[b, index])
    return out


def one_pass_step_logits(
    model: ValueHeadModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: Sequence[Sequence[int]],
) -> list[list[float]]:
    """Value logits at `positions[b]` of each row, from ONE forward pass over the batch (no grad).

    input_ids, attention_mask: `[B, T]`, right padded (so a row's positions are its own token indices).
    """
    with torch.no_grad():
        logits = model(input_ids, attention_mask)
    return [row.tolist() for row in gather_positions(logits, positions)]
