"""`python -m rlloop.prm_train`: train a TD-PRM (or the ScalarPRM baseline) offline, with DeepSpeed ZeRO.

Data (`data.format`): `transitions` (TDRM's released schema, jsonl/parquet), `trajectories` (jsonl of
question, steps, correct) or `rollouts` (jsonl of rlloop rollouts with `correct`); see
`rlloop.rewards.prm.data`. The PRM starts from `model.path` (a PRM folder is continued, a plain causal LM
gets a fresh value head; `prm_init=prm` insists on a value head) or a built-in `model=tiny|...`.

    python -m rlloop.prm_train data.format=trajectories data.train_path=train.jsonl \\
        model.path=/models/arith-small td=td0 gamma=0.8 lr=3e-4 epochs=2 out_dir=/tmp/prm

Writes `out_dir/prm_metrics.json` (BCE, V_last accuracy and AUROC against the outcome, smoothness;
before and after training, held-out when `data.eval_path` or `data.eval_fraction` gives an eval set) and
the trained PRM folder `out_dir/prm` (load with `ValueHeadModel.from_pretrained` / `PRMScorer`).
"""

from __future__ import annotations

import json
import logging
import math
import os
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

logger = logging.getLogger("rlloop.prm_train")


@dataclass
class PRMDataConfig:
    format: str = "trajectories"  # transitions | trajectories | rollouts
    train_path: str = MISSING
    eval_path: Optional[str] = None
    eval_fraction: float = 0.0  # without eval_path: hold out this share of train (by prompt group)
    step_delimiter: str = "\n\n"  # rollouts without step_char_ends are split with these
    step_regex: Optional[str] = None


@dataclass
class PRMTrainConfig:
    data: PRMDataConfig = field(default_factory=PRMDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prm_init: str = "auto"  # auto (PRM folder if it has a value head, else a fresh head) | prm | backbone
    td: str = (
        "td0"  # td0 | nstep | td_lambda | mc (ScalarPRM, outcome labels) | labels (ScalarPRM, step_labels)
    )
    gamma: float = 0.8
    n: int = 2
    lam: float = 0.7
    terminal_weight: float = 1.0
    ema: Optional[float] = None  # target-network decay; None bootstraps from the online net (TDRM)
    lr: float = 3e-4  # TDRM used 1e-6 for 1.5B+ PRMs; tiny/arith-small backbones need far more
    weight_decay: float = 0.001
    warmup_ratio: float = 0.03
    epochs: int = 1
    batch_size: int = 16  # trajectories (or transitions) per optimizer step
    grad_clip: float = 1.0
    zero_stage: int = 2
    bf16: bool = False
    max_length: Optional[int] = None  # tokens; longer trajectories are truncated on the left
    log_every: int = 10
    seed: int = 0
    num_threads: int = 1
    out_dir: Optional[str] = None  # default: the Hydra run dir


def register_configs() -> None:
    ConfigStore.instance().store(name="rlloop_prm_train_schema", node=PRMTrainConfig)


register_configs()


def _check(cfg: Any) -> None:
    fmt = cfg.data.format
    if fmt not in ("transitions", "trajectories", "rollouts"):
        raise ConfigError(f"data.format={fmt!r}: use transitions | trajectories | rollouts")
    if cfg.td not in ("td0", "nstep", "td_lambda", "mc", "labels"):
        raise ConfigError(f"td={cfg.td!r}: use td0 | nstep | td_lambda | mc | labels")
    if fmt == "transitions" and cfg.td not in ("td0", "nstep"):
        raise ConfigError(f"td={cfg.td!r} needs whole trajectories; transitions files train td0/nstep only")
    if cfg.prm_init not in ("auto", "prm", "backbone"):
        raise ConfigError(f"prm_init={cfg.prm_init!r}: use auto | prm | backbone")
    if not 0.0 <= cfg.gamma <= 1.0:
        raise ConfigError(f"gamma={cfg.gamma} must be in [0, 1]")
    if not 0.0 <= cfg.lam <= 1.0:
        raise ConfigError(f"lam={cfg.lam} must be in [0, 1]")
    if cfg.n < 1 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError(
            f"n, epochs and batch_size must be >= 1 (got {cfg.n}, {cfg.epochs}, {cfg.batch_size})"
        )
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1)")


def split_eval(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the prompt groups (rollouts of one prompt stay together)."""
    if fraction <= 0:
        return examples, []
    groups = sorted({str(e.get("group") or e.get("question") or e.get("prompt_text")) for e in examples})
    random.Random(seed).shuffle(groups)
    held = set(groups[: max(1, int(round(fraction * len(groups))))])
    key = lambda e: str(e.get("group") or e.get("question") or e.get("prompt_text"))  # noqa: E731
    return [e for e in examples if key(e) not in held], [e for e in examples if key(e) in held]


def load_prm(path: str, prm_init: str, dtype: str):
    """(ValueHeadModel, tokenizer) from `path` according to `prm_init`."""
    from transformers import AutoTokenizer

    from rlloop.rewards.prm.model import ValueHeadModel, has_value_head

    if prm_init == "prm" or (prm_init == "auto" and has_value_head(path)):
        try:
            model = ValueHeadModel.from_pretrained(path, dtype=dtype)
        except FileNotFoundError as e:
            raise ConfigError(f"prm_init=prm but model.path: {e}") from None
    else:
        model = ValueHeadModel.from_backbone(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _columns(examples: list[dict]) -> tuple[list, list, list, list]:
    return (
        [e["prompt_text"] for e in examples],
        [e["response_text"] for e in examples],
        [e["step_char_ends"] for e in examples],
        [e["outcome"] for e in examples],
    )


def _labels(examples: list[dict], td: str) -> dict:
    if td != "labels":
        return {}
    missing = [i for i, e in enumerate(examples) if e.get("step_labels") is None]
    if missing:
        raise ConfigError(f"td=labels but example {missing[0]} (0-based) has no step_labels")
    return {"step_labels": [e["step_labels"] for e in examples]}


def evaluate(trainer, examples: list[dict], fmt: str, td: str) -> dict[str, float]:
    if not examples:
        return {}
    if fmt == "transitions":
        return trainer.transition_evaluate(examples)
    labels = _labels(examples, td) if td == "labels" else {}
    return trainer.evaluate(*_columns(examples), **labels)


def train(cfg: Any, out_dir: str) -> dict:
    """Load data and model, train with DeepSpeed (world size 1), evaluate, save; returns the metrics."""
    _check(cfg)  # before the heavy imports: a typo fails in a second
    import torch
    from tqdm import tqdm

    from rlloop.models import resolve_model
    from rlloop.models.ds_engine import build_ds_engine, destroy_distributed
    from rlloop.rewards.prm.data import load_examples
    from rlloop.rewards.prm.td_trainer import TDPRMTrainer

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    fmt = cfg.data.format
    kwargs = (
        {"step_delimiter": cfg.data.step_delimiter, "step_regex": cfg.data.step_regex}
        if fmt == "rollouts"
        else {}
    )
    train_set = load_examples(fmt, cfg.data.train_path, **kwargs)
    if cfg.data.eval_path:
        eval_set = load_examples(fmt, cfg.data.eval_path, **kwargs)
    else:
        train_set, eval_set = split_eval(train_set, cfg.data.eval_fraction, cfg.seed)
    if not train_set:
        raise ConfigError(f"data.train_path={cfg.data.train_path}: no training examples left")
    logger.info("PRM data: %d train, %d eval (%s)", len(train_set), len(eval_set), fmt)

    path = resolve_model(cfg.model)
    model, tokenizer = load_prm(path, cfg.prm_init, cfg.model.dtype)
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
    trainer = TDPRMTrainer(
        model,
        tokenizer,
        lr=cfg.lr,
        td=cfg.td,
        gamma=cfg.gamma,
        n=cfg.n,
        lam=cfg.lam,
        terminal_weight=cfg.terminal_weight,
        ema=cfg.ema,
        max_grad_norm=cfg.grad_clip,
        step_delimiter=cfg.data.step_delimiter,
        step_regex=cfg.data.step_regex,
        micro_batch_size=cfg.batch_size,
        engine=engine,
        max_length=cfg.max_length,
    )
    metrics: dict[str, Any] = {
        "config": {"td": cfg.td, "gamma": cfg.gamma, "n": cfg.n, "lam": cfg.lam, "lr": cfg.lr}
    }
    metrics["eval_before"] = evaluate(trainer, eval_set, fmt, cfg.td)
    history = []
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    order = list(range(len(train_set)))
    with tqdm(total=total, desc=f"prm_train ({cfg.td})", unit="step", dynamic_ncols=True) as bar:
        for epoch in range(cfg.epochs):
            rng.shuffle(order)
            for i in range(steps_per_epoch):
                batch = [train_set[j] for j in order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
                if fmt == "transitions":
                    m = trainer.transition_step(batch)
                else:
                    m = trainer.step(*_columns(batch), **_labels(batch, cfg.td))
                m = {"epoch": epoch, "step": trainer.version, **m}
                history.append(m)
                loss = m.get("prm/loss", m.get("prm/bce"))
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{m['prm/lr']:.2e}")
                bar.update(1)
                if cfg.log_every and trainer.version % cfg.log_every == 0:
                    logger.info(
                        "step %d: %s", trainer.version, json.dumps({k: round(v, 5) for k, v in m.items()})
                    )
    metrics["train_seconds"] = time.perf_counter() - t0
    metrics["train_last"] = history[-1]
    metrics["train"] = evaluate(trainer, train_set, fmt, cfg.td)
    metrics["eval"] = evaluate(trainer, eval_set, fmt, cfg.td)
    metrics["history"] = history
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prm_dir = out / "prm"
    _save(model, engine, cfg.zero_stage, str(prm_dir))
    tokenizer.save_pretrained(str(prm_dir))
    (out / "prm_metrics.json").write_text(json.dumps(metrics, indent=2))
    destroy_distributed()
    return metrics


def _save(model, engine, zero_stage: int, path: str) -> None:
    if zero_stage == 3:  # parameters are partitioned: gather them for the save
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            model.save_pretrained(path)
    else:
        model.save_pretrained(path)


def _summary(metrics: dict) -> str:
    keys = ("prm/bce", "prm/outcome_bce", "prm/v_last_acc", "prm/auroc", "prm/smoothness")
    lines = []
    for split in ("eval_before", "train", "eval"):
        m = metrics.get(split) or {}
        if m:
            lines.append(f"{split:12s} " + "  ".join(f"{k.split('/')[1]}={m[k]:.4f}" for k in keys if k in m))
    return "\n".join(lines)


def _main(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig
    from tqdm.contrib.logging import logging_redirect_tqdm

    out_dir = cfg.out_dir or HydraConfig.get().runtime.output_dir
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    try:
        with logging_redirect_tqdm():
            metrics = train(cfg, out_dir)
    except (RlloopError, FileNotFoundError) as err:
        logger.error("error: %s", err)
        sys.exit(2)
    print(_summary(metrics))
    print(f"outputs: {out_dir}  (prm_metrics.json, prm/)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    import hydra

    config_path = str(Path(__file__).resolve().parent.parent / "conf")
    hydra.main(version_base=None, config_path=config_path, config_name="prm_train")(_main)()


if __name__ == "__main__":
    main()
