"""LoRA through peft, for the policy learner, the critic, the HF rollout engine and export.

One `learner.lora` config (rlloop.config.LoraConfig) becomes one `peft.LoraConfig`, applied the same way
everywhere, so a tensor's name on the learner (`...q_proj.lora_A.default.weight`) is its name in a rollout
worker's model too: weight sync sends the adapter's tensors under those names and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from rlloop.errors import ConfigError

# written beside a LoRA learner's DeepSpeed checkpoint (peft's own file name and format)
ADAPTER_CONFIG = "adapter_config.json"


def lora_enabled(lora: dict | None) -> bool:
    """Whether a `learner.lora` dict (or None) asks for an adapter."""
    return bool(lora) and int(lora.get("rank") or 0) > 0


def check_lora(lora: Any, key: str = "learner.lora") -> None:
    """Raise ConfigError naming the bad `learner.lora.*` value (rank, alpha, target_modules, dropout)."""
    rank, alpha, targets, dropout = lora["rank"], lora["alpha"], lora["target_modules"], lora["dropout"]
    if int(rank) < 0:
        raise ConfigError(f"config {key}.rank={rank!r}: must be >= 0 (0 = full fine-tuning)")
    if int(rank) == 0:
        return
    if not float(alpha) > 0:
        raise ConfigError(f"config {key}.alpha={alpha!r}: must be > 0 (the update is scaled by alpha / rank)")
    if not 0 <= float(dropout) < 1:
        raise ConfigError(f"config {key}.dropout={dropout!r}: must be in [0, 1)")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"config {key}.target_modules={targets!r}: must be 'all-linear' or a non-empty list of module names"
        )


def peft_config(lora: dict, *, causal_lm: bool = True) -> Any:
    """The `peft.LoraConfig` of a `learner.lora` dict (task CAUSAL_LM for a policy, none for a backbone)."""
    import peft

    check_lora(lora)
    targets = lora["target_modules"]
    return peft.LoraConfig(
        r=int(lora["rank"]),
        lora_alpha=float(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type="CAUSAL_LM" if causal_lm else None,
    )


def apply_lora(model: torch.nn.Module, lora: dict, *, causal_lm: bool = True) -> torch.nn.Module:
    """`model` wrapped by peft with a fresh adapter (B = 0: the same function as `model`); only the
    adapter's parameters require grad. A target that matches no module is an error naming the key."""
    import peft

    try:
        return peft.get_peft_model(model, peft_config(lora, causal_lm=causal_lm))
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(
            f"config learner.lora.target_modules={lora['target_modules']!r}: {err}"
        ) from err


def adapter_dropouts(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The adapter's dropout modules (peft's `lora_dropout` ModuleDicts hold one per adapter)."""
    for name, module in model.named_modules():
        if ".lora_dropout." in f".{name}." and isinstance(module, torch.nn.Dropout):
            yield module


def save_adapter_config(model: torch.nn.Module, path: str) -> None:
    """peft's adapter_config.json of `model`'s adapter (`model` may be a DeepSpeed engine) into `path`."""
    base = getattr(model, "module", model)
    peft_model = next(m for m in base.modules() if hasattr(m, "peft_config"))
    os.makedirs(path, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(path)


def lora_from_adapter_config(path: str) -> dict:
    """The `learner.lora` dict of an adapter_config.json in folder `path`."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        saved = json.load(f)
    targets = saved["target_modules"]
    return {
        "rank": int(saved["r"]),
        "alpha": float(saved["lora_alpha"]),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "dropout": float(saved.get("lora_dropout", 0.0)),
    }


def model_from_state(
    build: Callable[[], torch.nn.Module], wrap: Callable[[torch.nn.Module], torch.nn.Module], state: dict[str, Any]
) -> torch.nn.Module:
    """`wrap(build())` holding `state` (the learner's names, base and adapter): built on the meta device and
    every tensor assigned from `state`, so nothing is initialised twice. `wrap` puts the adapter where the
    learner put it (the whole policy, or a critic's backbone)."""
    with torch.device("meta"):
        model = wrap(build())
    tensors = {
        k: v.detach() if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
        for k, v in state.items()
    }
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    tied = [k for k in missing if k.endswith("lm_head.weight")]
    if [k for k in missing if k not in tied] or unexpected:
        raise RuntimeError(f"LoRA state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for module in model.modules():
        if tied and hasattr(module, "tie_weights") and hasattr(module, "get_output_embeddings"):
            module.tie_weights()
            break
    return model


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its peft adapter merged into the base weights (W + (alpha / r) B A, peft's
    `merge_and_unload`) and the peft wrapper gone: the model itself, or a child (a critic's backbone)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    for name, child in model.named_children():
        if hasattr(child, "merge_and_unload"):
            setattr(model, name, child.merge_and_unload())
    return model


def save_adapter(model: torch.nn.Module, path: str) -> None:
    """The adapter of `model` (or of its peft child) as a peft folder: adapter_config.json and
    adapter_model.safetensors, which `peft.PeftModel.from_pretrained(base, path)` loads."""
    peft_model = next(m for m in model.modules() if hasattr(m, "peft_config") and hasattr(m, "save_pretrained"))
    peft_model.save_pretrained(path)


def adapter_off(engine: Any, lora: dict | None, off: bool) -> Any:
    """Context in which a LoRA policy (`engine.module`, a peft model) is its frozen base, when `off`:
    the reference policy without a second model."""
    import contextlib

    return engine.module.disable_adapter() if off and lora is not None else contextlib.nullcontext()


@contextlib.contextmanager
def adapter_dropout(engine: Any, lora: dict | None) -> Iterator[None]:
    """learner.lora.dropout acts only inside this block (the update's forward): the learner runs in eval
    mode, so old/ref logprobs and rollouts see the adapter without dropout."""
    modules = list(adapter_dropouts(engine.module)) if lora is not None and float(lora["dropout"]) > 0 else []
    for module in modules:
        module.train(True)
    try:
        yield
    finally:
        for module in modules:
            module.train(False)
