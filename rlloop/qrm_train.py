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

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from rlloop.config import ModelConfig
from rlloop.errors import ConfigError
from rlloop.rewards.training import entry_points

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


def _load_data(cfg: Any) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs): `data.eval_path`, else `data.eval_fraction` of the prompt groups."""
    from rlloop.rewards.qrm.data import load_pairs
    from rlloop.rewards.training import hold_out_groups

    train_set = load_pairs(cfg.data.train_path)
    if cfg.data.eval_path:
        eval_set = load_pairs(cfg.data.eval_path)
    else:
        fraction = cfg.data.eval_fraction
        groups = {p["group"] for p in train_set}
        if fraction > 0 and len(groups) < 2:
            raise ConfigError(
                f"data.eval_fraction={fraction} needs pairs of at least 2 prompts, got {len(groups)}"
            )
        train_set, eval_set = hold_out_groups(train_set, fraction, cfg.seed, lambda p: p["group"])
    logger.info("Q-RM pairs: %d train, %d held out", len(train_set), len(eval_set))
    return train_set, eval_set


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
    from rlloop.rewards.qrm.model import TokenQModel
    from rlloop.rewards.qrm.trainer import QRMTrainer
    from rlloop.rewards.training import OfflineRun, load_head_model, train_offline

    def make_trainer(model, tokenizer, engine):
        same_name = ("lr", "beta", "gamma", "max_length", "append_eos")
        return QRMTrainer(
            model,
            tokenizer,
            engine=engine,
            micro_batch_size=cfg.batch_size,
            prompt_format=cfg.data.prompt_format,
            **{key: cfg[key] for key in same_name},
        )

    def check_data(trainer, train_set: list[dict], eval_set: list[dict]) -> None:
        _validate_tokens(trainer, train_set, cfg.data.train_path)
        _validate_tokens(trainer, eval_set, cfg.data.eval_path or cfg.data.train_path)

    run = OfflineRun(
        name="qrm",
        unit="pair",
        desc="qrm_train",
        load_data=_load_data,
        load_model=lambda path: load_head_model(TokenQModel, path, cfg.qrm_init, cfg.model.dtype, "qrm"),
        make_trainer=make_trainer,
        train_step=lambda trainer, batch: trainer.step(batch),
        evaluate=lambda trainer, pairs: trainer.evaluate(pairs),
        progress=lambda m: {"loss": f"{m['qrm/loss']:.4f}", "acc": f"{m['qrm/pair_acc']:.2f}"},
        config=lambda cfg, path: {
            "beta": cfg.beta,
            "gamma": cfg.gamma,
            "lr": cfg.lr,
            "epochs": cfg.epochs,
            "model": path,
        },
        check_data=check_data,
    )
    return train_offline(cfg, out_dir, run)


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


_main, main = entry_points("qrm", train, _summary, logger)

if __name__ == "__main__":
    main()
