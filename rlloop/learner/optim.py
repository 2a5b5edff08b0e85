"""The learner's optimizer side: LR schedule, ZeRO-Offload and the user's DeepSpeed overrides.

Schedules come from transformers' `get_scheduler` (a LambdaLR); DeepSpeed steps it once per optimizer
step and saves/loads its state with the engine's checkpoint, so a resumed run continues the same curve.
`learner.deepspeed_overrides` is merged last into the config rlloop generates and checked here before any
actor starts: a key DeepSpeed does not read, or one rlloop must own, is an error naming it.
"""

from __future__ import annotations

import copy
from typing import Any

from rlloop.errors import ConfigError

LR_SCHEDULERS = ("constant", "linear", "cosine")

# Keys of the generated config the learner relies on: its micro-batch loop, loss scaling and optimizer
# assume these values, so an override would silently change the update. Each maps to the rlloop key.
OWNED_KEYS = {
    "train_batch_size": "rollout.prompts_per_step x rollout.n",
    "train_micro_batch_size_per_gpu": "learner.micro_batch_size",
    "gradient_accumulation_steps": "learner.micro_batch_size (one optimizer step per batch)",
    "optimizer": "learner.lr / betas / weight_decay (rlloop passes its own AdamW)",
    "scheduler": "learner.lr_scheduler / lr_warmup_steps / lr_min_ratio",
}
# Top-level sections DeepSpeed reads outside `DeepSpeedConfig` (engine, profiler, aio, autotuning).
_EXTRA_DS_KEYS = {"aio", "activation_checkpointing", "flops_profiler", "autotuning", "optimizer", "scheduler"}


def build_scheduler(optimizer: Any, cfg: dict, num_training_steps: int) -> Any:
    """transformers LambdaLR over `num_training_steps` optimizer steps for `cfg` (a LearnerConfig dict).

    constant: lr after a linear warm-up of lr_warmup_steps (from 0); linear: warm-up, then linear to 0 at
    num_training_steps; cosine: warm-up, then half a cosine to lr_min_ratio * lr.
    """
    from transformers import get_scheduler

    name, warmup = cfg["lr_scheduler"], int(cfg["lr_warmup_steps"])
    if name not in LR_SCHEDULERS:
        raise ConfigError(f"config learner.lr_scheduler={name!r}: unknown; choose {', '.join(LR_SCHEDULERS)}")
    kwargs: dict[str, Any] = {}
    if name == "constant":
        hf_name = "constant_with_warmup" if warmup else "constant"
    elif name == "cosine" and float(cfg["lr_min_ratio"]) > 0:
        hf_name, kwargs = "cosine_with_min_lr", {"min_lr_rate": float(cfg["lr_min_ratio"])}
    else:
        hf_name = name
    return get_scheduler(
        hf_name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=max(1, int(num_training_steps)),
        scheduler_specific_kwargs=kwargs or None,
    )


def offload_section(offload_optimizer: bool, offload_params: bool, zero_stage: int) -> dict[str, Any]:
    """The `zero_optimization` entries of ZeRO-Offload (CPU memory; pinned on a GPU host)."""
    import torch

    pin = torch.cuda.is_available()
    out: dict[str, Any] = {}
    if offload_optimizer:
        if zero_stage < 1:
            raise ConfigError(
                "config learner.offload_optimizer=true: needs learner.zero_stage >= 1 (ZeRO-Offload moves the "
                f"partitioned optimizer state), got learner.zero_stage={zero_stage}"
            )
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload_params:
        if zero_stage != 3:
            raise ConfigError(
                f"config learner.offload_params=true: needs learner.zero_stage=3 (got {zero_stage}); only "
                "ZeRO-3 partitions, and so can offload, the parameters"
            )
        out["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return out


def build_ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    grad_clip: float,
    bf16: bool,
    zero3_param_persistence_threshold: int | None = None,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """DeepSpeed config for a passed-in optimizer (so no fused_adam JIT on CPU), with ZeRO-Offload when
    asked and `overrides` (learner.deepspeed_overrides, checked by `check_overrides`)
    merged in last."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"learner.zero_stage must be 0..3, got {zero_stage}")
    zero: dict[str, Any] = {"stage": zero_stage, **offload_section(offload_optimizer, offload_params, zero_stage)}
    if zero_stage == 3 and zero3_param_persistence_threshold is not None:
        # DeepSpeed keeps parameters below this size whole on every rank; tests set 0 so that a tiny
        # model is really partitioned.
        zero["stage3_param_persistence_threshold"] = int(zero3_param_persistence_threshold)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "gradient_clipping": float(grad_clip),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return merge_overrides(config, overrides or {})


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in: nested dicts key by key, anything else replaced. Copies."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def known_deepspeed_keys() -> set[str]:
    """The top-level keys DeepSpeed's config reads (recorded from `DeepSpeedConfig` itself, so a new
    DeepSpeed release brings its own list), plus the sections other parts of DeepSpeed read."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recorder(dict):
        def get(self, key: Any, default: Any = None) -> Any:
            seen.add(key)
            return super().get(key, default)

        def __getitem__(self, key: Any) -> Any:
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key: Any) -> bool:
            seen.add(key)
            return super().__contains__(key)

    DeepSpeedConfig(Recorder(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return seen | _EXTRA_DS_KEYS


def check_overrides(overrides: dict[str, Any], base: dict[str, Any], key: str = "learner.deepspeed_overrides") -> None:
    """Raise ConfigError naming the first override rlloop owns, DeepSpeed does not know, or DeepSpeed
    rejects once merged into `base` (e.g. a misspelt `zero_optimization` field)."""
    for name in overrides:
        if name in OWNED_KEYS:
            raise ConfigError(f"config {key}.{name}: set by rlloop; use {OWNED_KEYS[name]} instead")
    if not overrides:
        return
    known = known_deepspeed_keys()
    for name in overrides:
        if name not in known:
            raise ConfigError(f"config {key}.{name}: not a DeepSpeed config key (DeepSpeed would ignore it)")
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(merge_overrides(base, overrides))
    except Exception as err:  # pydantic's ValidationError names the field; DeepSpeed's asserts say why
        raise ConfigError(f"config {key}: DeepSpeed rejects the merged config: {type(err).__name__}: {err}") from err


def learner_settings(cfg: Any) -> dict[str, Any]:
    """`cfg.learner` (a composed Config) as the learner ranks' plain dict, with `lr_decay_steps` filled in:
    the run's optimizer steps, trainer.total_steps x algo.ppo_epochs, unless set."""
    from rlloop.config import to_dict

    out = to_dict(cfg.learner)
    if out["lr_decay_steps"] is None:
        out["lr_decay_steps"] = int(cfg.trainer.total_steps) * int(cfg.algo.ppo_epochs)
    return out


def check_learner(learner: Any, critic_lora_rank: int | None = None) -> None:
    """Start-up checks of learner.lr_* / offload_* / deepspeed_overrides / lora (a LearnerConfig node):
    ConfigError naming the first bad key, before any actor starts."""
    from rlloop.learner.lora import check_lora

    if learner.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(
            f"config learner.lr_scheduler={learner.lr_scheduler!r}: unknown; choose {', '.join(LR_SCHEDULERS)}"
        )
    if learner.lr_warmup_steps < 0:
        raise ConfigError(f"config learner.lr_warmup_steps={learner.lr_warmup_steps!r}: must be >= 0")
    if not 0 <= learner.lr_min_ratio < 1:
        raise ConfigError(f"config learner.lr_min_ratio={learner.lr_min_ratio!r}: must be in [0, 1)")
    if learner.lr_decay_steps is not None and learner.lr_decay_steps < 1:
        raise ConfigError(
            f"config learner.lr_decay_steps={learner.lr_decay_steps!r}: must be >= 1 (or null: the run's steps)"
        )
    check_lora(learner.lora)
    if critic_lora_rank is not None and critic_lora_rank < 0:
        raise ConfigError(f"config algo.critic.lora_rank={critic_lora_rank!r}: must be >= 0 (or null: learner.lora.rank)")
    overrides = dict(learner.deepspeed_overrides)
    base = build_ds_config(  # raises on an offload the ZeRO stage cannot do
        zero_stage=int(learner.zero_stage),
        micro_batch_size=int(learner.micro_batch_size),
        grad_accum=1,
        grad_clip=float(learner.grad_clip or 0.0),
        bf16=bool(learner.bf16),
        offload_optimizer=bool(learner.offload_optimizer),
        offload_params=bool(learner.offload_params),
    )
    check_overrides(overrides, base)
