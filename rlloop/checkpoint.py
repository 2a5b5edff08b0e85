"""Atomic, resumable checkpoints of a whole run.

Layout of `<out_dir>/checkpoints/step_000010/`:
  learner/   DeepSpeed checkpoint of every rank (weights, optimizer, ZeRO partitions)
  prm/       the online PRM's folder (when reward.prm.online)
  hf/        the policy's config and tokenizer files, so `python -m rlloop.export` needs nothing else
  state.json controller state: step, policy version, data-loader position, the model's identity
             (architecture fingerprint, hub revision, weights digest: `model_identity`), ...
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


# Files of a model folder whose content decides what the model does besides config.json: the weights and
# the tokenizer (a changed tokenizer maps the same text to other token ids).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = tuple(n for n in _HF_FILES if "config" not in n or n == "tokenizer_config.json") + (
    "tokenizer.model",
)
_WHOLE_FILE_BYTES = 64 << 20  # weight files up to this size are hashed whole; larger ones are sampled:
_SAMPLES = 16  # chunks, evenly spaced, the first and the last included
_SAMPLE_BYTES = 1 << 20
_HUB_SNAPSHOT = re.compile(r"/models--[^/]+/snapshots/([0-9a-f]{40})/?$")


def weights_digest(model_path: str) -> str:
    """Digest of a model folder's weight and tokenizer files: names, sizes and content.

    Weight files up to 64 MiB are hashed whole, larger ones by 16 evenly spaced 1 MiB chunks (a
    retrained or replaced model differs in every chunk; a 15 GB model is read in a fraction of a second).
    """
    digest = hashlib.sha256()
    for path in sorted(Path(model_path).iterdir()):
        is_weights = path.suffix in _WEIGHT_SUFFIXES
        if not path.is_file() or not (is_weights or path.name in _TOKENIZER_FILES):
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if not is_weights or size <= _WHOLE_FILE_BYTES:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
                continue
            for i in range(_SAMPLES):
                f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def hub_revision(model_path: str) -> str | None:
    """The commit of a hub model resolved into the hub's cache (`.../models--org--name/snapshots/<sha>`)."""
    m = _HUB_SNAPSHOT.search(str(model_path))
    return m.group(1) if m else None


def model_identity(model_path: str) -> dict[str, Any]:
    """What a checkpoint records about the model its run started from (state.json keys), and what a
    resume compares (load_state): the architecture (model_fingerprint), the hub commit when the model
    came from the hub (model_revision), and the weights and tokenizer (model_weights)."""
    return {
        "model_fingerprint": model_fingerprint(model_path),
        "model_revision": hub_revision(model_path),
        "model_weights": weights_digest(model_path),
    }


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


def load_state(path: Path, *, fingerprint: str | dict[str, Any], total_steps: int) -> dict[str, Any]:
    """state.json of a checkpoint, checked against this run's model and step budget.

    `fingerprint` is this run's `model_identity(model_path)`, or only its `model_fingerprint`. A resume
    is refused (RlloopError) when the architecture differs, or when the weights or tokenizer differ from
    those the checkpoint's run started from (checkpoints written before weights were recorded are checked
    by architecture only): the reference model, the rollout engine's tokenizer and the exported config
    would no longer match the trained weights.
    """
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    ours = fingerprint if isinstance(fingerprint, dict) else {"model_fingerprint": fingerprint}
    if state.get("model_fingerprint") != ours["model_fingerprint"]:
        raise RlloopError(
            f"checkpoint {path} is of another model (fingerprint {state.get('model_fingerprint')}, "
            f"this run's model has {ours['model_fingerprint']}); point trainer.resume elsewhere or change model"
        )
    theirs_weights, our_weights = state.get("model_weights"), ours.get("model_weights")
    if theirs_weights and our_weights and theirs_weights != our_weights:
        then, now = state.get("model_revision"), ours.get("model_revision")
        revisions = f", hub revision {then} then, {now} now" if then != now else ""
        pin = f" (model.revision={then})" if then and then != now else ""
        raise RlloopError(
            f"checkpoint {path}: the model changed since its run started from {state.get('model_path')} "
            f"(weights/tokenizer digest {theirs_weights} then, {our_weights} now{revisions}). Resume with the "
            f"model the run started from{pin}, or start a new run (another output_dir, or no trainer.resume)"
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
