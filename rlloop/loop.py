"""The run around the steps: evaluation before, during and after, metrics and samples to the tracker,
periodic checkpoints, and the trained models saved at the end (`Trainer.run`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rlloop.batch import format_step_values
from rlloop.config import to_dict

logger = logging.getLogger("rlloop.controller")


def fit(trainer: Any) -> dict[str, Any]:
    """Train for trainer.total_steps; evaluate before, every eval_every steps, and after."""
    from tqdm.auto import tqdm

    from rlloop.plotting import plot_run
    from rlloop.tracking import Tracker, redact

    cfg, t = trainer.cfg, trainer.cfg.trainer
    if trainer.resume_state is not None:
        truncate_metrics(trainer.out_dir / "metrics.jsonl", trainer.step)
    tracker = Tracker(list(cfg.logger), trainer.out_dir, config=redact(to_dict(cfg)), wandb_cfg=to_dict(cfg.wandb),
                      mlflow_cfg=to_dict(cfg.mlflow),
                      # resumed: the same wandb/MLflow runs continue, TensorBoard drops what came after the checkpoint
                      resume_step=None if trainer.resume_state is None else trainer.step)  # fmt: skip
    summary: dict[str, Any] = {"out_dir": str(trainer.out_dir), "model_path": trainer.model_path}
    if trainer.resume_state is not None:
        summary["resumed_from"] = str(trainer.resume_path)
    try:
        if t.eval_before and trainer.resume_state is None:
            ev = trainer.evaluate()
            tracker.log(ev, step=0)
            summary |= eval_summary("eval_before", ev, t.eval_samples)
        bar = tqdm(range(trainer.step, t.total_steps), initial=trainer.step, total=t.total_steps, desc="RL steps",
                   unit="step", dynamic_ncols=True)  # fmt: skip
        for _ in bar:
            metrics = trainer.train_step()
            if t.eval_every and trainer.step % t.eval_every == 0 and trainer.step < t.total_steps:
                metrics.update(trainer.evaluate())
            sample_now = bool(t.log_samples_every) and trainer.step % t.log_samples_every == 0
            if sample_now or trainer.step == t.total_steps:
                metrics.update(trainer.memory_metrics())
            tracker.log(metrics, step=trainer.step)
            if sample_now:
                log_samples(trainer, tracker)
            if t.save_every and trainer.step % t.save_every == 0 and trainer.step < t.total_steps:
                trainer.save_checkpoint()
            bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['accuracy']:.3f}")
        ev = trainer.evaluate()
        tracker.log(ev, step=trainer.step)
        summary |= eval_summary("eval_after", ev, t.eval_samples)
        if t.save_final:
            summary |= save_final(trainer)
    finally:
        tracker.finish()
    if (trainer.out_dir / "metrics.jsonl").exists():
        summary["plot"] = str(plot_run(trainer.out_dir / "metrics.jsonl", trainer.out_dir / "training.png"))
    (trainer.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_final(trainer: Any) -> dict[str, str]:
    """The trained policy (HF folder) and the online PRMs and critic beside it; their paths."""
    cfg, out, actors = trainer.cfg, trainer.out_dir, trainer.actors
    trainer.learner.save_hf(str(out / "checkpoint"), tokenizer_path=trainer.model_path)
    saved = {"checkpoint": str(out / "checkpoint")}
    if trainer.prm_pool is not None and cfg.reward.prm.online:
        trainer.prm_pool.save(str(out / "prm"))
        saved["prm_checkpoint"] = str(out / "prm")
    if actors.implicit_prm is not None and cfg.reward.implicit_prm.online:
        actors.save_implicit_prm(out / "implicit_prm", trainer.tokenizer)
        saved["implicit_prm_checkpoint"] = str(out / "implicit_prm")
    if trainer.critic is not None:  # a value-head folder (a PRM folder when its output is sigmoid)
        trainer.critic.save_value_model(str(out / "critic"))
        saved["critic_checkpoint"] = str(out / "critic")
    return saved


def log_samples(trainer: Any, tracker: Any) -> None:
    """The last step's first rollouts as a table; on the console one solution with its PRM values."""
    last = getattr(trainer, "_last_rollouts", [])
    rows = [[ro.uid, ro.prompt_text[-200:], ro.text, ro.ground_truth, ro.outcome.get("correct"), ro.step_values]
            for ro in last[:4]]  # fmt: skip
    if rows:
        columns = ["uid", "prompt", "response", "ground_truth", "correct", "step_values"]
        tracker.log_table("samples", columns, rows, trainer.step)
    if "console" in tracker.backends:
        # one wrong solution (else the first) step by step with its PRM values: where does V drop?
        shown = [ro for ro in last if ro.step_values]
        wrong = [ro for ro in shown if not ro.outcome.get("correct")]
        if wrong or shown:
            logger.info("%s", format_step_values((wrong or shown)[0]))


def eval_summary(prefix: str, ev: dict[str, float], k: int) -> dict[str, float]:
    out = {prefix: ev["eval/accuracy"]}
    if "eval/accuracy_sampled" in ev:
        out |= {f"{prefix}_sampled": ev["eval/accuracy_sampled"], f"{prefix}_pass_at_k": ev[f"eval/pass_at_{k}"]}
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after `step` (by a run killed after its last checkpoint), so the resumed run's
    metrics continue without gaps or duplicates."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
