"""Training a reward model (the TD-PRM, the Q-RM): what the two share.

- `RewardModelTrainer`: the update machinery of `TDPRMTrainer` and `QRMTrainer` — a DeepSpeed engine
  (`rlloop.models.ds_engine.build_ds_engine`, which owns optimizer, clipping and schedule) or, without
  one, a plain AdamW with gradients accumulated over micro-batches and clipped once; the version counter
  and the current learning rate.
- `train_offline`: the offline run behind `python -m rlloop.prm_train` and `python -m rlloop.qrm_train`
  — seeds, data, model, engine, epochs of shuffled batches with a progress bar and periodic log lines,
  evaluation before and after, the saved folder and the metrics file. `entry_points` gives their Hydra mains.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlloop.errors import ConfigError, exit_on_user_error

logger = logging.getLogger(__name__)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


class RewardModelTrainer:
    """One update = `_begin_update()`, `_backward(loss, part, whole)` per micro-batch, `_end_update()`.

    engine: an optional DeepSpeed engine around `model`; `_backward` then calls `engine.backward` and
    `engine.step` once per micro-batch (the engine applies the optimizer step every `grad_accum` of them).
    Without it, a plain AdamW (`lr`, `weight_decay`); each micro-batch's loss is weighted by its share of
    the update, and `_end_update` clips to `max_grad_norm` (0 = no clipping) and steps once.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        lr: float,
        engine=None,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        micro_batch_size: int = 16,
        max_length: int | None = None,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.micro_batch_size = int(micro_batch_size)
        self.max_grad_norm = float(max_grad_norm)
        self.max_length = max_length
        self.pad_id = pad_id_of(tokenizer)
        self.optimizer = None
        if engine is None:
            import torch

            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.version = 0

    @property
    def train_net(self):
        """What the training forward runs through: the engine when there is one, else the model."""
        return self.engine if self.engine is not None else self.model

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def lr(self) -> float:
        opt = self.optimizer if self.optimizer is not None else self.engine.optimizer
        return float(opt.param_groups[0]["lr"])

    def _begin_update(self) -> None:
        self.model.train()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def _backward(self, loss, part: float, whole: float) -> None:
        """Backward of one micro-batch's loss, the micro-batch being `part` of the update's `whole` (rows,
        pairs or steps): the plain optimizer's gradient is then the whole update's mean."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            (loss * part / whole).backward()

    def _end_update(self) -> float:
        """Clip and step the plain optimizer (nothing with an engine), back to eval mode, version + 1.
        Returns the gradient norm before clipping (NaN when not measured: an engine, or no clipping)."""
        grad_norm = float("nan")
        if self.optimizer is not None:
            if self.max_grad_norm > 0:
                import torch

                params = [p for p in self.model.parameters() if p.requires_grad]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.version += 1
        return grad_norm


# ----- the offline run (python -m rlloop.prm_train / qrm_train) -------------------------------------------


@dataclass
class OfflineRun:
    """What a reward model's offline run plugs into `train_offline`.

    name: "prm" | "qrm": the folder `out_dir/<name>`, the file `out_dir/<name>_metrics.json`.
    unit: what one example is ("example", "pair"): `metrics["num_train_<unit>s"]`, error messages.
    load_data(cfg) -> (train examples, held-out examples).
    load_model(path) -> (model, tokenizer) from the resolved `model.path`.
    make_trainer(model, tokenizer, engine) -> a `RewardModelTrainer`.
    train_step(trainer, batch) -> the step's metrics; evaluate(trainer, examples) -> metrics ({} if none).
    progress(step metrics) -> the progress bar's postfix; config(cfg, path) -> `metrics["config"]`.
    check_data(trainer, train, held_out): optional, raises on examples the trainer cannot encode.
    """

    name: str
    unit: str
    desc: str
    load_data: Callable[[Any], tuple[list, list]]
    load_model: Callable[[str], tuple[Any, Any]]
    make_trainer: Callable[[Any, Any, Any], RewardModelTrainer]
    train_step: Callable[[Any, list], dict]
    evaluate: Callable[[Any, list], dict]
    progress: Callable[[dict], dict]
    config: Callable[[Any, str], dict]
    check_data: Callable[[Any, list, list], None] | None = None


def train_offline(cfg: Any, out_dir: str, run: OfflineRun) -> dict:
    """Seed, load data and model, train with DeepSpeed (world size 1), evaluate before and after, save
    `out_dir/<name>` (model + tokenizer) and `out_dir/<name>_metrics.json`; returns the metrics."""
    import torch
    from tqdm import tqdm

    from rlloop.models import resolve_model
    from rlloop.models.ds_engine import build_ds_engine, destroy_distributed

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_set, eval_set = run.load_data(cfg)
    if not train_set:
        raise ConfigError(f"data.train_path={cfg.data.train_path}: no training {run.unit}s left")

    path = resolve_model(cfg.model)
    model, tokenizer = run.load_model(path)
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
    trainer = run.make_trainer(model, tokenizer, engine)
    if run.check_data is not None:
        run.check_data(trainer, train_set, eval_set)
    metrics: dict[str, Any] = {
        "config": run.config(cfg, path),
        f"num_train_{run.unit}s": len(train_set),
        f"num_eval_{run.unit}s": len(eval_set),
    }
    metrics["eval_before"] = run.evaluate(trainer, eval_set)
    history = []
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    order = list(range(len(train_set)))
    with tqdm(total=total, desc=run.desc, unit="step", dynamic_ncols=True) as bar:
        for epoch in range(cfg.epochs):
            rng.shuffle(order)
            for i in range(steps_per_epoch):
                batch = [train_set[j] for j in order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
                m = run.train_step(trainer, batch)
                m = {"epoch": epoch, "step": trainer.version, **m}
                history.append(m)
                bar.set_postfix(**run.progress(m))
                bar.update(1)
                if cfg.log_every and trainer.version % cfg.log_every == 0:
                    logger.info(
                        "step %d: %s", trainer.version, json.dumps({k: round(v, 5) for k, v in m.items()})
                    )
    metrics["train_seconds"] = time.perf_counter() - t0
    metrics["train_last"] = history[-1]
    metrics["train"] = run.evaluate(trainer, train_set)
    metrics["eval"] = run.evaluate(trainer, eval_set)
    metrics["history"] = history
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, cfg.zero_stage, str(out / run.name))
    tokenizer.save_pretrained(str(out / run.name))
    (out / f"{run.name}_metrics.json").write_text(json.dumps(metrics, indent=2))
    destroy_distributed()
    return metrics


def load_head_model(cls, path: str, init: str, dtype: str, name: str) -> tuple[Any, Any]:
    """(model, tokenizer) to train, `cls` being a `rlloop.rewards.heads.HeadModel`: `init` is the config
    key `<name>_init` — `<name>` loads a folder `cls` saved (and fails on any other), `backbone` puts a
    fresh head on the backbone at `path`, `auto` does the first where `path` has the head, else the second."""
    from transformers import AutoTokenizer

    if init == name or (init == "auto" and cls.has_head(path)):
        try:
            model = cls.from_pretrained(path, dtype=dtype)
        except FileNotFoundError as e:
            raise ConfigError(f"{name}_init={name} but model.path: {e}") from None
    else:
        model = cls.from_backbone(path, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path)


def save_model(model, zero_stage: int, path: str) -> None:
    """`model.save_pretrained(path)`, gathering ZeRO-3's partitioned parameters first."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            model.save_pretrained(path)
    else:
        model.save_pretrained(path)


def hold_out_groups(
    examples: Sequence[dict], fraction: float, seed: int, group: Callable[[dict], str]
) -> tuple[list[dict], list[dict]]:
    """(train, held-out): `fraction` of the groups (`group(example)`, e.g. the prompt) held out, each
    group's examples kept on one side."""
    if fraction <= 0:
        return list(examples), []
    groups = sorted({group(e) for e in examples})
    random.Random(seed).shuffle(groups)
    held = set(groups[: max(1, int(round(fraction * len(groups))))])
    return [e for e in examples if group(e) not in held], [e for e in examples if group(e) in held]


def entry_points(
    name: str, train: Callable[[Any, str], dict], summary: Callable[[dict], str], log: logging.Logger
) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """(`_main(cfg)`, `main()`) of `python -m rlloop.<name>_train` over conf/<name>_train.yaml.

    `_main` trains into `cfg.out_dir` (default: the Hydra run dir) with tqdm-safe logging and prints
    `summary(metrics)`; an RlloopError or a missing file is one line on `log` and exit code 2. `main` runs
    `_main` under `hydra.main`.
    """

    def _main(cfg: Any) -> None:
        import torch
        from hydra.core.hydra_config import HydraConfig
        from tqdm.contrib.logging import logging_redirect_tqdm

        out_dir = cfg.out_dir or HydraConfig.get().runtime.output_dir
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        with exit_on_user_error(log), logging_redirect_tqdm():
            metrics = train(cfg, out_dir)
        print(summary(metrics))
        print(f"outputs: {out_dir}  ({name}_metrics.json, {name}/)")

    def main() -> None:
        import hydra

        from rlloop.confdir import conf_dir

        config_path = conf_dir()
        hydra.main(version_base=None, config_path=config_path, config_name=f"{name}_train")(_main)()

    return _main, main
