"""`python -m rlloop.qrm_train`: train a Q-RM on preference pairs with DeepSpeed ZeRO (world size 1).

Data: jsonl/parquet pairs with columns `prompt`, `chosen`, `rejected` (`rlloop.rewards.qrm.data`; build
them from rlloop's own verified rollouts with `python -m rlloop.qrm_pairs`). The Q-RM starts from
`model.path` (a Q-RM folder is continued, a plain causal LM gets a fresh token head; `qrm_init=qrm` insists
on a head) or a built-in `model=tiny|arith-small|...`, and is trained with

    L = −log σ(β·(mean_t s_t^chosen − mean_t s_t^rejected) − γ)        (released: β = 0.2, γ = 2.0)

    python -m rlloop.qrm_train data.train_path=pairs.jsonl model=arith-small epochs=2 out_dir=/tmp/qrm

Writes `out_dir/qrm_metrics.json` (loss, pairwise accuracy and mean margin on the held-out pairs before and
after training, and on the training pairs after) and the Q-RM folder `out_dir/qrm` (load with
`TokenQModel.from_pretrained` / `QRMScorer`). Held-out pairs: `data.eval_path`, else `data.eval_fraction`
of the prompt groups (a prompt's pairs stay on one side).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from rlloop.config import ModelConfig
from rlloop.errors import ConfigError, RlloopError

logger = logging.getLogger("rlloop.qrm_train")


@dataclass
class QRMDataConfig:
    train_path: str = MISSING
    eval_path: Optional[str] = None
    eval_fraction: float = 0.1  # without eval_path: hold out this share of the prompt groups
    prompt_format: str = "raw"  # raw (prompt text as the model sees it) | chat (apply the chat template)


@dataclass
class QRMTrainConfig:
    data: QRMDataConfig = field(default_factory=QRMDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    qrm_init: str = "auto"  # auto (Q-RM folder if it has a head, else a fresh head) | qrm | backbone
    beta: float = 0.2  # Q-RM release
    gamma: float = 2.0  # Q-RM release
    lr: float = 1e-4  # the release used 1e-5 for 7B+ models; the small built-in backbones need more
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: int = 1
    batch_size: int = 16  # pairs per optimizer step
    grad_clip: float = 1.0
    zero_stage: int = 2
    bf16: bool = False
    max_length: Optional[int] = None  # tokens per sequence; the prompt is cut from the left first
    append_eos: bool = True  # completions end with EOS, as the policy's finished responses do
    log_every: int = 10
    seed: int = 0
    num_threads: int = 1
    out_dir: Optional[str] = None  # default: the Hydra run dir


ConfigStore.instance().store(name="rlloop_qrm_train_schema", node=QRMTrainConfig)


def _check(cfg: Any) -> None:
    if cfg.qrm_init not in ("auto", "qrm", "backbone"):
        raise ConfigError(f"qrm_init={cfg.qrm_init!r}: use auto | qrm | backbone")
    if cfg.data.prompt_format not in ("raw", "chat"):
        raise ConfigError(f"data.prompt_format={cfg.data.prompt_format!r}: use raw | chat")
    if cfg.beta <= 0:
        raise ConfigError(f"beta={cfg.beta} must be > 0")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1 (got {cfg.epochs}, {cfg.batch_size})")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1)")


def split_by_group(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): `fraction` of the prompt groups held out, each group's pairs kept together."""
    if fraction <= 0:
        return pairs, []
    groups = sorted({p["group"] for p in pairs})
    if len(groups) < 2:
        raise ConfigError(
            f"data.eval_fraction={fraction} needs pairs of at least 2 prompts, got {len(groups)}"
        )
    random.Random(seed).shuffle(groups)
    held = set(groups[: max(1, int(round(fraction * len(groups))))])
    return [p for p in pairs if p["group"] not in held], [p for p in pairs if p["group"] in held]


def load_qrm(path: str, qrm_init: str, dtype: str):
    """(TokenQModel, tokenizer) from `path` according to `qrm_init`."""
    from transformers import AutoTokenizer

    from rlloop.rewards.qrm.model import TokenQModel, has_qrm_head

    if qrm_init == "qrm" or (qrm_init == "auto" and has_qrm_head(path)):
        try:
            model = TokenQModel.from_pretrained(path, dtype=dtype)
        except FileNotFoundError as e:
            raise ConfigError(f"qrm_init=qrm but model.path: {e}") from None
    else:
        model = TokenQModel.from_backbone(path, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path)


def _validate_tokens(trainer, pairs: list[dict], path: str) -> None:
    """Pairs that are fine as text but empty/identical as tokens fail here, naming the pair."""
    for i, pair in enumerate(pairs):
        try:
            trainer.encode_pairs([pair])
        except ValueError as e:
            from rlloop.data.loader import DataError

            raise DataError(
                f"{path}: pair {i} (group {pair['group']!r}): {str(e).split(': ', 1)[-1]}"
            ) from None


def train(cfg: Any, out_dir: str) -> dict:
    """Load pairs and model, train with DeepSpeed (world size 1), evaluate, save; returns the metrics."""
    _check(cfg)  # before the heavy imports: a typo fails in a second
    import torch
    from tqdm import tqdm

    from rlloop.models import resolve_model
    from rlloop.models.ds_engine import build_ds_engine, destroy_distributed
    from rlloop.rewards.qrm.data import load_pairs
    from rlloop.rewards.qrm.trainer import QRMTrainer

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_set = load_pairs(cfg.data.train_path)
    if cfg.data.eval_path:
        eval_set = load_pairs(cfg.data.eval_path)
    else:
        train_set, eval_set = split_by_group(train_set, cfg.data.eval_fraction, cfg.seed)
    if not train_set:
        raise ConfigError(f"data.train_path={cfg.data.train_path}: no training pairs left")
    logger.info("Q-RM pairs: %d train, %d held out", len(train_set), len(eval_set))

    path = resolve_model(cfg.model)
    model, tokenizer = load_qrm(path, cfg.qrm_init, cfg.model.dtype)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    engine = build_ds_engine(
        model,
        lr=cfg.lr,
        zero_stage=cfg.zero_stage,
        micro_batch_size=cfg.batch_size,
        grad_accum=1,
        grad_clip=cfg.grad_clip,
        bf16=cfg.bf16,
        weight_decay=cfg.weight_decay,
        total_steps=total,
        warmup_steps=int(cfg.warmup_ratio * total),
    )
    trainer = QRMTrainer(
        model,
        tokenizer,
        lr=cfg.lr,
        beta=cfg.beta,
        gamma=cfg.gamma,
        micro_batch_size=cfg.batch_size,
        engine=engine,
        max_length=cfg.max_length,
        prompt_format=cfg.data.prompt_format,
        append_eos=cfg.append_eos,
    )
    _validate_tokens(trainer, train_set, cfg.data.train_path)
    _validate_tokens(trainer, eval_set, cfg.data.eval_path or cfg.data.train_path)
    metrics: dict[str, Any] = {
        "config": {"beta": cfg.beta, "gamma": cfg.gamma, "lr": cfg.lr, "epochs": cfg.epochs, "model": path},
        "num_train_pairs": len(train_set),
        "num_eval_pairs": len(eval_set),
    }
    metrics["eval_before"] = trainer.evaluate(eval_set)
    history = []
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    order = list(range(len(train_set)))
    with tqdm(total=total, desc="qrm_train", unit="step", dynamic_ncols=True) as bar:
        for epoch in range(cfg.epochs):
            rng.shuffle(order)
            for i in range(steps_per_epoch):
                batch = [train_set[j] for j in order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
                m = {"epoch": epoch, **trainer.step(batch)}
                history.append(m)
                bar.set_postfix(loss=f"{m['qrm/loss']:.4f}", acc=f"{m['qrm/pair_acc']:.2f}")
                bar.update(1)
                if cfg.log_every and trainer.version % cfg.log_every == 0:
                    logger.info(
                        "step %d: %s", trainer.version, json.dumps({k: round(v, 5) for k, v in m.items()})
                    )
    metrics["train_seconds"] = time.perf_counter() - t0
    metrics["train"] = trainer.evaluate(train_set)
    metrics["eval"] = trainer.evaluate(eval_set)
    metrics["history"] = history
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qrm_dir = out / "qrm"
    if cfg.zero_stage == 3:  # parameters are partitioned: gather them for the save
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            model.save_pretrained(str(qrm_dir))
    else:
        model.save_pretrained(str(qrm_dir))
    tokenizer.save_pretrained(str(qrm_dir))
    (out / "qrm_metrics.json").write_text(json.dumps(metrics, indent=2))
    destroy_distributed()
    return metrics


def _summary(metrics: dict) -> str:
    lines = []
    for split in ("eval_before", "train", "eval"):
        m = metrics.get(split) or {}
        if m:
            lines.append(
                f"{split:12s} loss={m['qrm/loss']:.4f}  pair_acc={m['qrm/pair_acc']:.4f}  "
                f"margin={m['qrm/margin']:.4f}  pairs={int(m['qrm/num_pairs'])}"
            )
    return "\n".join(lines)


def _main(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig
    from tqdm.contrib.logging import logging_redirect_tqdm

    out_dir = cfg.out_dir or HydraConfig.get().runtime.output_dir
    try:
        with logging_redirect_tqdm():
            metrics = train(cfg, out_dir)
    except (RlloopError, FileNotFoundError) as err:
        logger.error("error: %s", err)
        sys.exit(2)
    print(_summary(metrics))
    print(f"outputs: {out_dir}  (qrm_metrics.json, qrm/)")


def main() -> None:
    import hydra

    config_path = str(Path(__file__).resolve().parent.parent / "conf")
    hydra.main(version_base=None, config_path=config_path, config_name="qrm_train")(_main)()


if __name__ == "__main__":
    main()
