"""Training-log statistics of an experiment folder's runs: for every arm (runs/<arm>-<seed>/metrics.jsonl,
finished runs only), the mean of chosen metrics over the first and the last `--window` training steps,
averaged over seeds. It says what happened inside the runs whose held-out curves `credit` / `compare`
plot (pairs formed, DPO margins, TGDPO guidance, reward, length).

    python -m rlloop.experiments.train_stats outputs/dpo_v3
    python -m rlloop.experiments.train_stats outputs/credit_v3 --keys reward/total,prm/value_mean --window 5
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from pathlib import Path

from rlloop.errors import RlloopError
from rlloop.experiments import common
from rlloop.tracking import read_metrics

DEFAULT_KEYS = (
    "reward/total", "response_length/mean", "dpo/pairs", "dpo/groups_skipped", "dpo/margin", "dpo/accuracy",
    "dpo/chosen_reward", "dpo/rejected_reward", "tgdpo/guidance_chosen", "tgdpo/guidance_rejected",
    "tgdpo/nonpositive_weight_frac",
)  # fmt: skip
RUN_DIR = re.compile(r"^(?P<arm>.+)-(?P<seed>\d+)$")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def run_stats(metrics: Path, keys: list[str], window: int) -> dict[str, tuple[float, float]]:
    """{key: (mean over the first `window` training steps, mean over the last `window`)}; NaN where the
    key was never logged. Training rows are the ones without eval/ keys."""
    train = [r for r in read_metrics(metrics) if "step" in r and not any(k.startswith("eval/") for k in r)]
    first, last = train[:window], train[-window:]
    return {k: (_mean([r[k] for r in first if k in r]), _mean([r[k] for r in last if k in r])) for k in keys}


def experiment_stats(root: Path, keys: list[str], window: int) -> dict[str, dict]:
    """{arm: {"seeds": [...], "stats": {key: (first, last)} averaged over the arm's finished runs}}."""
    runs = root / "runs"
    if not runs.is_dir():
        raise RlloopError(f"{root}: no runs/ folder (an experiment's --out, e.g. outputs/credit)")
    per_arm: dict[str, list[tuple[int, dict]]] = {}
    for d in sorted(runs.iterdir()):
        m = RUN_DIR.match(d.name)
        if not m or not (d / "done.json").exists() or not (d / "metrics.jsonl").exists():
            continue
        per_arm.setdefault(m["arm"], []).append((int(m["seed"]), run_stats(d / "metrics.jsonl", keys, window)))
    if not per_arm:
        raise RlloopError(f"{runs}: no finished run (a <arm>-<seed> folder with done.json and metrics.jsonl)")
    out = {}
    for arm, seeded in per_arm.items():
        stats = {
            k: tuple(_mean([s[k][i] for _, s in seeded if not math.isnan(s[k][i])]) for i in (0, 1)) for k in keys
        }
        out[arm] = {"seeds": sorted(seed for seed, _ in seeded), "stats": stats}
    return out


def to_markdown(stats: dict[str, dict], window: int) -> str:
    lines = []
    for arm, info in stats.items():
        lines.append(f"{arm} (seeds {', '.join(map(str, info['seeds']))}): first {window} steps -> last {window}")
        for k, (a, b) in info["stats"].items():
            if not (math.isnan(a) and math.isnan(b)):
                lines.append(f"  {k:32s} {a:9.3f} -> {b:9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="an experiment's --out folder (with runs/<arm>-<seed>/)")
    ap.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="comma-separated metrics.jsonl keys")
    ap.add_argument("--window", type=int, default=10, help="training steps at each end")
    args = ap.parse_args(argv)
    if args.window < 1:
        ap.error("--window must be >= 1")
    keys = [k for k in args.keys.split(",") if k]
    stats = experiment_stats(Path(args.folder), keys, args.window)
    print(to_markdown(stats, args.window))
    missing = [k for k in keys if all(math.isnan(v) for info in stats.values() for v in info["stats"][k])]
    if missing and args.keys != ",".join(DEFAULT_KEYS):  # a typo in --keys is said, not silently dropped
        print(f"never logged by any run: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    common.cli(main)
