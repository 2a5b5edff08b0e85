"""`python -m rlloop.prm_train`: train a TD-PRM (or the ScalarPRM baseline) offline, with DeepSpeed ZeRO.

Data (`data.format`): `transitions` (TDRM's released schema, jsonl/parquet), `trajectories` (jsonl of
question, steps, correct), `rollouts` (jsonl of rlloop rollouts with `correct`) or `trl_stepwise` (TRL's
stepwise supervision: prompt, completions, labels; jsonl/parquet, e.g. a TRL PRM data set saved with
`to_parquet`); see `rlloop.rewards.prm.data`. The PRM starts from `model.path` (a PRM folder is continued, a plain causal LM
gets a fresh value head; `prm_init=prm` insists on a value head) or a built-in `model=tiny|...`.

    python -m rlloop.prm_train data.format=trajectories data.train_path=train.jsonl \\
        model.path=/models/arith-small td=td0 gamma=0.8 lr=3e-4 epochs=2 out_dir=/tmp/prm

Writes `out_dir/prm_metrics.json` (BCE, V_last accuracy and AUROC against the outcome, smoothness;
before and after training, held-out when `data.eval_path` or `data.eval_fraction` gives an eval set) and
the trained PRM folder `out_dir/prm` (load with `ValueHeadModel.from_pretrained` / `PRMScorer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from rlloop.config import ModelConfig
from rlloop.errors import ConfigError
from rlloop.rewards.training import entry_points

logger = logging.getLogger("rlloop.prm_train")


@dataclass
class PRMDataConfig:
    format: str = "trajectories"  # transitions | trajectories | rollouts | trl_stepwise
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
    )  # | reach (max backup of hard step_labels, bootstrapped on V; gamma, lam apply)
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
    from rlloop.rewards.prm.data import LOADERS

    fmt = cfg.data.format
    if fmt not in LOADERS:
        raise ConfigError(f"data.format={fmt!r}: use {' | '.join(LOADERS)}")
    from rlloop.rewards.prm.td_trainer import TRAINER_KINDS

    if cfg.td not in TRAINER_KINDS:
        raise ConfigError(f"td={cfg.td!r}: use {' | '.join(TRAINER_KINDS)}")
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


def _group(example: dict) -> str:
    """The prompt group a trajectory belongs to (its rollouts stay on one side of the split)."""
    return str(example.get("group") or example.get("question") or example.get("prompt_text"))


def _columns(examples: list[dict]) -> tuple[list, list, list, list]:
    return (
        [e["prompt_text"] for e in examples],
        [e["response_text"] for e in examples],
        [e["step_char_ends"] for e in examples],
        [e["outcome"] for e in examples],
    )


def _labels(examples: list[dict], td: str) -> dict:
    from rlloop.rewards.prm.td_trainer import LABELLED_KINDS

    if td not in LABELLED_KINDS:
        return {}
    missing = [i for i, e in enumerate(examples) if e.get("step_labels") is None]
    if missing:
        raise ConfigError(f"td={td} but example {missing[0]} (0-based) has no step_labels")
    return {"step_labels": [e["step_labels"] for e in examples]}


def _load_data(cfg: Any) -> tuple[list[dict], list[dict]]:
    from rlloop.rewards.prm.data import load_examples
    from rlloop.rewards.training import hold_out_groups

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
        train_set, eval_set = hold_out_groups(train_set, cfg.data.eval_fraction, cfg.seed, _group)
    logger.info("PRM data: %d train, %d eval (%s)", len(train_set), len(eval_set), fmt)
    return train_set, eval_set


def train(cfg: Any, out_dir: str) -> dict:
    """Load data and model, train with DeepSpeed (world size 1), evaluate, save; returns the metrics."""
    _check(cfg)  # before the heavy imports: a typo fails in a second
    from rlloop.rewards.prm.model import ValueHeadModel
    from rlloop.rewards.prm.td_trainer import TDPRMTrainer
    from rlloop.rewards.training import OfflineRun, load_head_model, train_offline

    transitions = cfg.data.format == "transitions"

    def make_trainer(model, tokenizer, engine):
        same_name = ("lr", "td", "gamma", "n", "lam", "terminal_weight", "ema", "max_length")
        return TDPRMTrainer(
            model,
            tokenizer,
            engine=engine,
            max_grad_norm=cfg.grad_clip,
            micro_batch_size=cfg.batch_size,
            step_delimiter=cfg.data.step_delimiter,
            step_regex=cfg.data.step_regex,
            **{key: cfg[key] for key in same_name},
        )

    def train_step(trainer, batch: list[dict]) -> dict:
        if transitions:
            return trainer.transition_step(batch)
        return trainer.step(*_columns(batch), **_labels(batch, cfg.td))

    def evaluate(trainer, examples: list[dict]) -> dict[str, float]:
        if not examples:
            return {}
        if transitions:
            return trainer.transition_evaluate(examples)
        return trainer.evaluate(*_columns(examples), **_labels(examples, cfg.td))

    def progress(m: dict) -> dict:
        return {"loss": f"{m.get('prm/loss', m.get('prm/bce')):.4f}", "lr": f"{m['prm/lr']:.2e}"}

    run = OfflineRun(
        name="prm",
        unit="example",
        desc=f"prm_train ({cfg.td})",
        load_data=_load_data,
        load_model=lambda path: load_head_model(ValueHeadModel, path, cfg.prm_init, cfg.model.dtype, "prm"),
        make_trainer=make_trainer,
        train_step=train_step,
        evaluate=evaluate,
        progress=progress,
        config=lambda cfg, path: {"td": cfg.td, "gamma": cfg.gamma, "n": cfg.n, "lam": cfg.lam, "lr": cfg.lr},
    )
    return train_offline(cfg, out_dir, run)


def _summary(metrics: dict) -> str:
    keys = ("prm/bce", "prm/outcome_bce", "prm/v_last_acc", "prm/auroc", "prm/smoothness")
    lines = []
    for split in ("eval_before", "train", "eval"):
        m = metrics.get(split) or {}
        if m:
            lines.append(f"{split:12s} " + "  ".join(f"{k.split('/')[1]}={m[k]:.4f}" for k in keys if k in m))
    return "\n".join(lines)


_main, main = entry_points("prm", train, _summary, logger)

if __name__ == "__main__":
    main()
