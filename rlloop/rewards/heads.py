"""A causal-LM backbone with a linear head of one output: what the PRM (`ValueHeadModel`) and the Q-RM
(`TokenQModel`) are, and how either is saved and loaded.

A saved model is an HF folder: the backbone's own files (loadable with `AutoModel`), the head in
`<HEAD_FILE>` (float32 safetensors) and `<META_FILE>` describing it. A subclass names those two files
and the `meta` it writes, and says how a fresh head starts.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import torch
from torch import nn


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` -> torch.bfloat16; raises ValueError naming an unknown dtype."""
    if isinstance(name, torch.dtype):
        return name
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (use float32 | bfloat16 | float16)")
    return getattr(torch, name)


class HeadModel(nn.Module):
    """Backbone (`AutoModel`, the causal LM without its LM head) + `head`, a `Linear(H, 1)` kept in float32
    (so a bf16 backbone does not quantise the scores). `forward` gives the head's output at every token."""

    HEAD_FILE: ClassVar[str]
    META_FILE: ClassVar[str]
    KIND: ClassVar[str]  # "PRM" | "Q-RM": names the folder in error messages
    META: ClassVar[dict[str, Any]]  # written to META_FILE beside hidden_size and dtype

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if head.in_features != hidden or head.out_features != 1:
            raise ValueError(
                f"{self.KIND} head shape {tuple(head.weight.shape)} does not fit hidden size {hidden}"
            )
        self.head = head.float()

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def has_head(cls, path: str) -> bool:
        """Whether `path` is a folder this class saved (backbone + head), not a plain LM."""
        return os.path.isfile(os.path.join(path, cls.HEAD_FILE)) and os.path.isfile(
            os.path.join(path, cls.META_FILE)
        )

    @classmethod
    def from_backbone(cls, path: str, dtype: str | torch.dtype = "float32", **kwargs: Any):
        """A fresh head (see the subclass) on the backbone of the HF model at `path`."""
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs))

    @classmethod
    def missing_head_hint(cls, path: str) -> str:
        return f"To start from a plain causal LM use {cls.__name__}.from_backbone({path!r}) (fresh head)."

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | torch.dtype | None = None, **kwargs: Any):
        """Load a folder written by `save_pretrained`; a folder without the head is an error."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        if not cls.has_head(path):
            raise FileNotFoundError(
                f"{path} is not a {cls.KIND} folder: it has no {cls.HEAD_FILE} / {cls.META_FILE}. "
                + cls.missing_head_hint(path)
            )
        with open(os.path.join(path, cls.META_FILE)) as f:
            meta = json.load(f)
        backbone = AutoModel.from_pretrained(
            path, dtype=torch_dtype(dtype or meta.get("dtype", "float32")), **kwargs
        )
        model = cls(backbone)
        state = load_file(os.path.join(path, cls.HEAD_FILE))
        try:
            model.head.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as e:
            raise ValueError(f"{os.path.join(path, cls.HEAD_FILE)} does not fit the backbone: {e}") from e
        return model

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.backbone.save_pretrained(path)
        save_file(
            {k: v.detach().contiguous().float() for k, v in self.head.state_dict().items()},
            os.path.join(path, self.HEAD_FILE),
        )
        meta = {
            **self.META,
            "hidden_size": self.head.in_features,
            "dtype": str(next(self.backbone.parameters()).dtype).removeprefix("torch."),
        }
        with open(os.path.join(path, self.META_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The backbone's last hidden state `[B, T, H]`."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
