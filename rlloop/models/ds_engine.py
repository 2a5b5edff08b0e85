"""Wrap a torch model in a DeepSpeed ZeRO engine (CPU/gloo or GPU/nccl), shared by SFT and the learner.

On CPU we pass a `torch.optim.AdamW` instance (with `zero_allow_untested_optimizer`) instead of a
DeepSpeed optimizer config: that avoids JIT-compiling DeepSpeed's fused Adam (~65 s the first time,
ENVIRONMENT.md §2).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(backend: str | None = None) -> None:
    """Join (or create) the torch.distributed group DeepSpeed uses; idempotent.

    Ranks started by a launcher or by the learner's Ray actors already have RANK/WORLD_SIZE/
    MASTER_ADDR/MASTER_PORT in their environment; a lone process (SFT) becomes a group of one on a
    free loopback port.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
            }
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.1):
    """LR multiplier: linear warm-up over `warmup_steps`, then cosine down to `min_ratio` at `total_steps`."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def build_ds_engine(
    model: torch.nn.Module,
    *,
    lr: float,
    zero_stage: int = 2,
    micro_batch_size: int = 8,
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    bf16: bool = False,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    total_steps: int | None = None,
    warmup_steps: int = 0,
):
    """A `deepspeed.DeepSpeedEngine` around `model` with AdamW; initialises torch.distributed if needed.

    `micro_batch_size` is sequences per rank per forward/backward; `engine.step()` applies the update
    every `grad_accum` micro-batches. With `total_steps` set, the LR follows warm-up + cosine
    (`warmup_cosine`), stepped by the engine at each optimizer step; otherwise it is constant.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the import: DeepSpeed picks it then
    import deepspeed

    init_distributed()
    config = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "zero_optimization": {"stage": int(zero_stage)},
        "bf16": {"enabled": bool(bf16)},
        "gradient_clipping": float(grad_clip),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # progress is ours to show
        "wall_clock_breakdown": False,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    scheduler = None
    if total_steps:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def destroy_distributed() -> None:
    """Leave the process without a process group (for callers that go on to start Ray actors)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    # DeepSpeed keeps its clone of the world group across engines; a later engine in this process (a
    # second pretraining, say) would broadcast over the destroyed group
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
