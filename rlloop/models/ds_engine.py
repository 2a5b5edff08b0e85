"""Wrap a torch model in a DeepSpeed ZeRO engine (CPU/gloo or GPU/nccl), shared by SFT and the learner.

On CPU we pass a `torch.optim.AdamW` instance (with `zero_allow_untested_optimizer`) instead of a
DeepSpeed optimizer config: that avoids JIT-compiling DeepSpeed's fused Adam (~65 s the first time,
ENVIRONMENT.md §2).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def extensions_root() -> Path:
    """Where torch JIT-builds extensions (DeepSpeed's ops) for this Python environment: $TORCH_EXTENSIONS_DIR
    when set, else one folder per environment (`sys.prefix`) under torch's default root, set into
    TORCH_EXTENSIONS_DIR. Two environments sharing torch's folder (`.venv`, `.venv-vllm`) rebuild an op in
    turn, each rewriting the other's build files, and every rebuild is a window for a killed build."""
    import hashlib
    import sys

    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        from torch.utils.cpp_extension import get_default_build_root

        tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        env = f"py{sys.version_info.major}{sys.version_info.minor}_{'cu' if torch.version.cuda else 'cpu'}"
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(get_default_build_root(), f"rlloop-{env}-{tag}")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def clear_stale_build_locks(root: Path) -> list[Path]:
    """Remove torch's build locks (`<root>/<op>/lock`) left by dead builds; the caller holds
    `build_guard(root)`. torch's lock is a plain file: a build killed while holding it (OOM, a timeout)
    leaves it, and every later build of that op waits on it forever. rlloop builds under its own flock,
    which the kernel releases when a process dies, so a lock file found while holding it is stale."""
    stale = sorted(root.glob("*/lock"))
    for lock in stale:
        logger.warning("removing a stale torch extension build lock %s (left by a build that died)", lock)
        lock.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def build_guard(root: Path):
    """An exclusive flock on `<root>/.rlloop-build.lock` for the body: one rlloop JIT build at a time."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".rlloop-build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_cpu_ops() -> None:
    """On the CPU accelerator, build (or load) DeepSpeed's shared-memory allreduce op, which
    `deepspeed.init_distributed` JIT-builds, before the rank's rendezvous: in this environment's own
    folder (`extensions_root`), one rlloop build at a time, stale locks cleared (`clear_stale_build_locks`).
    Without it a learner killed mid-build left a lock on which every later learner hung in set-up."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        return
    builder = accel.create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    root = extensions_root()
    with build_guard(root):
        clear_stale_build_locks(root)
        import deepspeed.ops

        if deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            builder.load(verbose=False)


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

    prepare_cpu_ops()
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
