"""The Q-RM model: an HF causal-LM backbone with a per-token linear head WITHOUT bias.

s_t = w · h_t at every position t, where h_t is the backbone's last hidden state after reading token t;
so s_t scores token t given tokens <= t — the same alignment as `rlloop.types.Batch` (entry t belongs to
token t). A bias would add the same constant to every token of every sequence and cancel in the pairwise
loss, which is why the Q-RM release has none.

A saved Q-RM is an HF folder: the backbone's own files (loadable with `AutoModel`), the head in
`qrm_head.safetensors` and `rlloop_qrm.json` describing it (`rlloop.rewards.heads`, as the PRM).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rlloop.rewards.heads import HeadModel
from rlloop.rewards.prm.model import ValueHeadModel

logger = logging.getLogger(__name__)

HEAD_FILE = "qrm_head.safetensors"
META_FILE = "rlloop_qrm.json"


class TokenQModel(HeadModel):
    """Backbone (`AutoModel`, the causal LM without its LM head) + `Linear(H, 1, bias=False)` token head.

    The head is kept in float32 and applied to float32 hidden states (as the PRM's value head), so token
    scores are not quantised by a bf16 backbone. A fresh head has nn.Linear's default (small random) init,
    not zero: a zero head is a saddle point (no gradient reaches the backbone until the head grows).
    """

    HEAD_FILE = HEAD_FILE
    META_FILE = META_FILE
    KIND = "Q-RM"
    META = {
        "format": "rlloop-qrm",
        "format_version": 1,
        "head": "linear-no-bias",
        "score": "s_t = head(h_t) at every token t (token t given tokens <= t)",
    }

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        if head is None:
            head = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        if head.bias is not None:
            raise ValueError("Q-RM token head must have no bias (it cancels in the pairwise loss)")
        super().__init__(backbone, head)

    @classmethod
    def missing_head_hint(cls, path: str) -> str:
        return (
            f"To start from a plain causal LM use TokenQModel.from_backbone({path!r}) (fresh head), or train "
            "one with `python -m rlloop.qrm_train`."
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token scores s: input_ids `[B, T]` -> `[B, T]` float32."""
        return self.head(self.hidden_states(input_ids, attention_mask).float()).squeeze(-1)

    def to_value_head_model(self) -> ValueHeadModel:
        """A `ValueHeadModel` (the PRM/critic class) holding these weights: the PPO critic's initialisation.

        The critic's head gets this head's weight and a zero bias, so its logits equal s_t at start.
        The backbone is shared, not copied: deep-copy the result if the Q-RM must stay untouched.
        """
        head = nn.Linear(self.head.in_features, 1)
        with torch.no_grad():
            head.weight.copy_(self.head.weight)
            head.bias.zero_()
        return ValueHeadModel(self.backbone, head)


has_qrm_head = TokenQModel.has_head
