"""Shared plumbing of the experiment suite: run `rlloop.train` as a subprocess, read its eval curve,
aggregate seeds (mean and min–max spread), plot, and write markdown tables.

Every run is a real `python -m rlloop.train` (its own Ray cluster, learner group, verifier pool), so an
experiment measures exactly what a user's run would do; results are read back from `metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rlloop.distributed.env import without_dist_env
from rlloop.errors import RlloopError
from rlloop.tracking import read_metrics

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunResult:
    """One training run: its eval curve as (step, prompts seen, held-out accuracy), wall time, exit code."""

    arm: str
    seed: int
    run_dir: str
    rc: int
    wall_s: float
    curve: list[tuple[int, int, float]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.curve[-1][2] if self.curve else math.nan

    @property
    def start(self) -> float:
        return self.curve[0][2] if self.curve else math.nan


def eval_curve(metrics_path: Path, prompts_per_step: int) -> list[tuple[int, int, float]]:
    """(step, prompts seen, eval/accuracy) for every eval row of a run's metrics.jsonl, in step order."""
    if not metrics_path.exists():
        return []
    points = {int(row["step"]): float(row["eval/accuracy"]) for row in read_metrics(metrics_path) if "eval/accuracy" in row}
    return [(s, s * prompts_per_step, points[s]) for s in sorted(points)]


def train_run(
    arm: str,
    seed: int,
    overrides: Sequence[str],
    run_dir: Path,
    *,
    prompts_per_step: int,
    timeout_s: float = 3600.0,
    reuse: bool = True,
) -> RunResult:
    """`python -m rlloop.train <overrides> trainer.seed=<seed>` into `run_dir` (log in run_dir/train.log).

    With `reuse`, a finished run (its `done.json` exists) is read back instead of trained again, so an
    interrupted experiment continues where it stopped.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "done.json"
    if reuse and done.exists():
        info = json.loads(done.read_text())
        curve = [tuple(p) for p in info["curve"]]
        return RunResult(arm, seed, str(run_dir), info["rc"], info["wall_s"], curve, list(overrides))  # type: ignore[arg-type]
    cmd = [
        sys.executable, "-m", "rlloop.train", *overrides, f"trainer.seed={seed}",
        "logger=[jsonl]", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "PYTHONUNBUFFERED": "1"}
    env = without_dist_env(env)
    logger.info("%s seed %d: %s", arm, seed, " ".join(cmd[3:]))
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    curve = eval_curve(run_dir / "metrics.jsonl", prompts_per_step)
    result = RunResult(arm, seed, str(run_dir), rc, wall, curve, list(overrides))
    if rc != 0:
        tail = (run_dir / "train.log").read_text(errors="replace")[-1500:]
        logger.error("%s seed %d failed (exit %d); log %s ends:\n%s", arm, seed, rc, run_dir / "train.log", tail)
    else:
        done.write_text(json.dumps({"rc": rc, "wall_s": wall, "curve": curve}))
    logger.info("%s seed %d: rc %d, %.0f s, accuracy %s", arm, seed, rc, wall, [round(p[2], 3) for p in curve])
    return result


def summarise(results: Sequence[RunResult]) -> dict[str, dict]:
    """Per arm: eval points (prompts seen) with mean, min and max accuracy over seeds, and the final
    accuracy's mean ± population std and gain over the start."""
    arms: dict[str, list[RunResult]] = {}
    for r in results:
        if r.rc == 0 and r.curve:
            arms.setdefault(r.arm, []).append(r)
    out: dict[str, dict] = {}
    for arm, runs in arms.items():
        xs = sorted({p[1] for r in runs for p in r.curve})
        per_x = {x: [p[2] for r in runs for p in r.curve if p[1] == x] for x in xs}
        finals = [r.final for r in runs]
        gains = [r.final - r.start for r in runs]
        out[arm] = {
            "seeds": [r.seed for r in runs],
            "prompts_seen": xs,
            "mean": [statistics.fmean(per_x[x]) for x in xs],
            "min": [min(per_x[x]) for x in xs],
            "max": [max(per_x[x]) for x in xs],
            "final_mean": statistics.fmean(finals),
            "final_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "gain_mean": statistics.fmean(gains),
            "gain_std": statistics.pstdev(gains) if len(gains) > 1 else 0.0,
            "wall_s_median": statistics.median(r.wall_s for r in runs),
        }
    return out


def plot_curves(summary: dict[str, dict], path: Path, *, title: str, xlabel: str = "training prompts seen") -> Path:
    """Mean accuracy per arm with a min–max band over seeds, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for arm, s in summary.items():
        ax.plot(s["prompts_seen"], s["mean"], marker="o", label=f"{arm} (n={len(s['seeds'])})")
        ax.fill_between(s["prompts_seen"], s["min"], s["max"], alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(summary: dict[str, dict], *, wall: bool = True) -> str:
    """One row per arm: seeds, start → final accuracy (mean ± std), gain, median wall time (if `wall`)."""
    lines = [
        "| arm | seeds | accuracy at start | final accuracy (mean ± std) | gain (mean ± std) |"
        + (" wall s (median) |" if wall else ""),
        "|---|---|---|---|---|" + ("---|" if wall else ""),
    ]
    for arm, s in summary.items():
        start = s["mean"][0] if s["mean"] else math.nan
        lines.append(
            f"| {arm} | {len(s['seeds'])} | {start:.3f} | {s['final_mean']:.3f} ± {s['final_std']:.3f} "
            f"| {s['gain_mean']:+.3f} ± {s['gain_std']:.3f} |" + (f" {s['wall_s_median']:.0f} |" if wall else "")
        )
    return "\n".join(lines)


def write_report(out: Path, name: str, results: Sequence[RunResult], summary: dict, extra: dict | None = None) -> None:
    """`out/<name>.json` (every run and the summary) and `out/<name>.md` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "runs": [r.__dict__ for r in results],
        "summary": summary,
        **(extra or {}),
    }
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / f"{name}.md").write_text(markdown_table(summary) + "\n")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise RlloopError(f"--seeds must be comma-separated integers, got {text!r}") from e
    if not seeds:
        raise RlloopError("--seeds is empty")
    return seeds


# ----------------------------------------------------------------------------------------------- CLIs
def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """Arguments every RL experiment shares: the runs' size, seeds, the PRMs to train or reuse, `--smoke`."""
    ap.add_argument("--model", default="arith-small")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--prm-dir", default=None, help="reuse PRMs: a folder with td0/ and mc/ PRM folders")
    ap.add_argument("--prm-train-prompts", type=int, default=128)
    ap.add_argument("--prm-eval-prompts", type=int, default=32)
    ap.add_argument("--prm-epochs", type=int, default=3)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for every run")
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    ap.add_argument("--smoke", action="store_true", help="CI size: model=tiny, 2 steps, 1 seed, tiny data")


def parse_run_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, shrink everything to CI size under `--smoke`, and set up logging."""
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.seeds, args.steps, args.eval_every = "tiny", "0", 2, 1
        args.prompts_per_step, args.n, args.max_new_tokens = 2, 2, 16
        args.prm_train_prompts, args.prm_eval_prompts, args.prm_epochs = 4, 2, 1
        args.override = [*args.override, "task.num_test=4", "learner.world_size=1", "reward.verifier.num_workers=1"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return args


def finish(out: Path, results: Sequence[RunResult], summary: dict) -> int:
    """Print the table; exit code 1 (naming the failed runs) if any run failed, else 0."""
    print(markdown_table(summary))
    failed = [(r.arm, r.seed) for r in results if r.rc != 0]
    if failed:
        logger.error("runs that failed: %s (logs under %s/runs)", failed, out)
        return 1
    return 0


def cli(main: Callable[[], int]) -> None:
    """Run an experiment's main(): bad arguments or inputs are one `error:` line and exit code 2."""
    try:
        sys.exit(main())
    except RlloopError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
