"""The PRM: an HF causal-LM backbone with a scalar value head on every token.

V(s) = sigmoid(head(h_t)), read at the token that ends a step. The backbone is causal, so one forward
pass over a whole trajectory gives the value of every prefix at once (TDRM's release re-encodes each
prefix: k passes for k steps); `one_pass_step_logits` reads them.

A saved PRM is an HF folder: the backbone's own files (loadable with `AutoModel`), the head in
`value_head.safetensors`, and `rlloop_prm.json` describing it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

HEAD_FILE = "value_head.safetensors"
META_FILE = "rlloop_prm.json"


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (use float32 | bfloat16 | float16)")
    return getattr(torch, name)


def has_value_head(path: str) -> bool:
    """Whether `path` is a saved PRM folder (backbone + value head), not a plain LM."""
    return os.path.isfile(os.path.join(path, HEAD_FILE)) and os.path.isfile(os.path.join(path, META_FILE))


class ValueHeadModel(nn.Module):
    """Backbone (`AutoModel`, the causal LM without its LM head) + `Linear(H, 1)` value head.

    The head is kept in float32 and applied to float32 hidden states, so values are not quantised by a
    bf16 backbone.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if head is None:  # untrained default: logit 0 everywhere, V = 0.5
            head = nn.Linear(hidden, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        if head.in_features != hidden or head.out_features != 1:
            raise ValueError(f"value head shape {tuple(head.weight.shape)} does not fit hidden size {hidden}")
        self.head = head.float()

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_backbone(cls, path: str, dtype: str | torch.dtype = "float32", **kwargs: Any) -> ValueHeadModel:
        """A fresh zero head (V = 0.5 everywhere) on the backbone of the HF model at `path`."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, dtype=_dtype(dtype), **kwargs)
        return cls(backbone)

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: str | torch.dtype | None = None, **kwargs: Any
    ) -> ValueHeadModel:
        """Load a PRM folder written by `save_pretrained`; a folder without a value head is an error."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        if not has_value_head(path):
            raise FileNotFoundError(
                f"{path} is not a PRM folder: it has no {HEAD_FILE} / {META_FILE}. To start from a plain "
                f"causal LM use ValueHeadModel.from_backbone({path!r}) (fresh head, V = 0.5)."
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
            "format": "rlloop-prm",
            "format_version": 1,
            "head": "linear",
            "hidden_size": self.head.in_features,
            "dtype": str(next(self.backbone.parameters()).dtype).removeprefix("torch."),
            "value": "sigmoid(logit) read at step-end tokens",
        }
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Value logits at every token: input_ids `[B, T]` -> `[B, T]` float32 (V = sigmoid)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        # float32 head (see the class doc) unless an engine cast it (DeepSpeed bf16 casts every parameter)
        return self.head(hidden.to(self.head.weight.dtype)).float().squeeze(-1)


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
