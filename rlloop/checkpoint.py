"""Atomic, resumable checkpoints of a whole run.

Layout of `<out_dir>/checkpoints/step_000010/`:
  learner/   DeepSpeed checkpoint of every rank (weights, optimizer, ZeRO partitions)
  prm/       the online PRM's folder (when reward.prm.online)
  hf/        the policy's config and tokenizer files, so `python -m rlloop.export` needs nothing else
  state.json controller state: step, policy version, data-loader position, model fingerprint, ...
A checkpoint is written into `.tmp-step_...` and renamed into place only when complete (state.json is
written last), so a kill during writing leaves the previous checkpoint loadable. Resuming never unpickles
arbitrary objects: DeepSpeed's files are read under `weights_only_torch_load`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlloop.errors import RlloopError

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def model_fingerprint(model_path: str) -> str:
    """Hash of the policy's config.json: a checkpoint of another architecture must not be resumed."""
    with open(os.path.join(model_path, "config.json"), "rb") as f:
        config = json.loads(f.read())
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def list_complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp dirs and dirs without state.json skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def begin(root: str | Path, step: int) -> Path:
    """A fresh temp dir for the checkpoint of `step` (a leftover from a killed write is removed)."""
    tmp = Path(root) / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict[str, Any], model_path: str, *, keep_last: int) -> Path:
    """Write the HF files and state.json into `tmp`, rename it into place, drop old checkpoints."""
    hf = tmp / "hf"
    hf.mkdir(exist_ok=True)
    for name in _HF_FILES:
        src = os.path.join(model_path, name)
        if os.path.isfile(src):
            shutil.copy2(src, hf / name)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    final = step_dir(tmp.parent, state["step"])
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_complete(tmp.parent)[: -max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint written: %s", final)
    return final


def find(resume: str, root: str | Path) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete under `root` (None if there is none),
    else the given path, which must be a complete checkpoint."""
    if resume == "auto":
        found = list_complete(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise RlloopError(f"trainer.resume={resume!r}: not a complete rlloop checkpoint (no {STATE_FILE})")
    return path


def load_state(path: Path, *, fingerprint: str, total_steps: int) -> dict[str, Any]:
    """state.json of a checkpoint, checked against this run's model and step budget."""
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    if state.get("model_fingerprint") != fingerprint:
        raise RlloopError(
            f"checkpoint {path} is of another model (fingerprint {state.get('model_fingerprint')}, "
            f"this run's model has {fingerprint}); point trainer.resume elsewhere or change model"
        )
    if state["step"] >= total_steps:
        raise RlloopError(
            f"checkpoint {path} is at step {state['step']} and trainer.total_steps={total_steps}: "
            "nothing is left to train (raise trainer.total_steps to continue)"
        )
    return state


def _deepspeed_state_classes() -> list:
    """The classes DeepSpeed pickles into its own ZeRO checkpoints besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Within the block every `torch.load` runs with weights_only=True, allowing only DeepSpeed's state
    classes besides tensors and containers.

    DeepSpeed's checkpoint engine calls torch.load(weights_only=False): a crafted file under
    trainer.resume would run arbitrary code in the learner. A file that needs another class fails with
    an UnpicklingError naming it.
    """
    import torch

    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
