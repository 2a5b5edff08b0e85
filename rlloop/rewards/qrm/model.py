"""The Q-RM model: an HF causal-LM backbone with a per-token linear head WITHOUT bias.

s_t = w · h_t at every position t, where h_t is the backbone's last hidden state after reading token t;
so s_t scores token t given tokens <= t — the same alignment as `rlloop.types.Batch` (entry t belongs to
token t). A bias would add the same constant to every token of every sequence and cancel in the pairwise
loss, which is why the Q-RM release has none.

A saved Q-RM is an HF folder: the backbone's own files (loadable with `AutoModel`), the head in
`qrm_head.safetensors` and `rlloop_qrm.json` describing it (the PRM's layout, `rlloop.rewards.prm.model`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from rlloop.rewards.prm.model import ValueHeadModel, _dtype

logger = logging.getLogger(__name__)

HEAD_FILE = "qrm_head.safetensors"
META_FILE = "rlloop_qrm.json"


def has_qrm_head(path: str) -> bool:
    """Whether `path` is a saved Q-RM folder (backbone + token head), not a plain LM."""
    return os.path.isfile(os.path.join(path, HEAD_FILE)) and os.path.isfile(os.path.join(path, META_FILE))


class TokenQModel(nn.Module):
    """Backbone (`AutoModel`, the causal LM without its LM head) + `Linear(H, 1, bias=False)` token head.

    The head is kept in float32 and applied to float32 hidden states (as the PRM's value head), so token
    scores are not quantised by a bf16 backbone. A fresh head has nn.Linear's default (small random) init,
    not zero: a zero head is a saddle point (no gradient reaches the backbone until the head grows).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if head is None:
            head = nn.Linear(hidden, 1, bias=False)
        if head.bias is not None:
            raise ValueError("Q-RM token head must have no bias (it cancels in the pairwise loss)")
        if head.in_features != hidden or head.out_features != 1:
            raise ValueError(f"Q-RM head shape {tuple(head.weight.shape)} does not fit hidden size {hidden}")
        self.head = head.float()

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_backbone(cls, path: str, dtype: str | torch.dtype = "float32", **kwargs: Any) -> TokenQModel:
        """A fresh (random) head on the backbone of the HF model at `path`."""
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(path, dtype=_dtype(dtype), **kwargs))

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | torch.dtype | None = None, **kwargs: Any) -> TokenQModel:
        """Load a Q-RM folder written by `save_pretrained`; a folder without a token head is an error."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        if not has_qrm_head(path):
            raise FileNotFoundError(
                f"{path} is not a Q-RM folder: it has no {HEAD_FILE} / {META_FILE}. To start from a plain "
                f"causal LM use TokenQModel.from_backbone({path!r}) (fresh head), or train one with "
                "`python -m rlloop.qrm_train`."
            )
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
        backbone = AutoModel.from_pretrained(
            path, dtype=_dtype(dtype or meta.get("dtype", "float32")), **kwargs
        )
        model = cls(backbone)
        state = load_file(os.path.join(path, HEAD_FILE))
        try:
            model.head.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as e:
            raise ValueError(f"{os.path.join(path, HEAD_FILE)} does not fit the backbone: {e}") from e
        return model

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.backbone.save_pretrained(path)
        save_file(
            {k: v.detach().contiguous().float() for k, v in self.head.state_dict().items()},
            os.path.join(path, HEAD_FILE),
        )
        meta = {
            "format": "rlloop-qrm",
            "format_version": 1,
            "head": "linear-no-bias",
            "hidden_size": self.head.in_features,
            "dtype": str(next(self.backbone.parameters()).dtype).removeprefix("torch."),
            "score": "s_t = head(h_t) at every token t (token t given tokens <= t)",
        }
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token scores s: input_ids `[B, T]` -> `[B, T]` float32."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(hidden.float()).squeeze(-1)

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
