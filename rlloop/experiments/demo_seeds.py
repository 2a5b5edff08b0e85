"""The embedded demo over seeds, as a new user runs it: `python -m rlloop.train` from an empty model cache.

Each seed s runs `python -m rlloop.train trainer.seed=s task.seed=s` (task.seed changes the problems, the
teacher's misconceptions and the held-out set, and seeds the pretraining) with a fresh $RLLOOP_CACHE, so
its wall time includes pretraining chain-small. Prints one row per seed and the summary line

    demo: seeds=N greedy_gain_mean=G greedy_gain_min=M sampled_gain_mean=S wall_max_s=W

    python -m rlloop.experiments.demo_seeds --seeds 0 1 2 --out /tmp/demo_seeds [-- extra overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlloop.distributed.env import without_dist_env
from rlloop.experiments.common import REPO


def run_seed(seed: int, out: Path, overrides: list[str]) -> dict:
    run_dir = out / f"seed{seed}"
    with tempfile.TemporaryDirectory(prefix="rlloop-cache-") as cache:
        env = without_dist_env({**os.environ, "RLLOOP_CACHE": cache})
        cmd = [sys.executable, "-m", "rlloop.train", f"trainer.seed={seed}", f"task.seed={seed}",
               f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
        t0 = time.perf_counter()
        with open(out / f"seed{seed}.log", "w") as log:
            rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t0
        sft = next(Path(cache).glob("chain-small-*/sft_metrics.json"), None)
        pre = json.loads(sft.read_text()) if sft else {}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"seed": seed, "rc": rc, "wall_s": wall, "pretrain_s": pre.get("total_wall_s"), **summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="/tmp/rlloop-demo-seeds")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, out, args.overrides)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "rows.jsonl").open("a").write(json.dumps(row) + "\n")
    ok = [r for r in rows if r["rc"] == 0 and "eval_after" in r]
    print("| seed | greedy before → after (gain) | sampled before → after | pass@8 before → after | wall (pretraining) |")
    print("|---|---|---|---|---|")
    for r in ok:
        print(
            f"| {r['seed']} | {r['eval_before']:.3f} → {r['eval_after']:.3f} ({r['eval_after'] - r['eval_before']:+.3f}) "
            f"| {r['eval_before_sampled']:.3f} → {r['eval_after_sampled']:.3f} "
            f"| {r['eval_before_pass_at_k']:.3f} → {r['eval_after_pass_at_k']:.3f} "
            f"| {r['wall_s']:.0f} s ({(r['pretrain_s'] or 0):.0f} s) |"
        )
    if ok:
        gains = [r["eval_after"] - r["eval_before"] for r in ok]
        sampled = [r["eval_after_sampled"] - r["eval_before_sampled"] for r in ok]
        print(
            f"demo: seeds={len(ok)} greedy_gain_mean={statistics.mean(gains):.3f} "
            f"greedy_gain_min={min(gains):.3f} sampled_gain_mean={statistics.mean(sampled):.3f} "
            f"wall_max_s={max(r['wall_s'] for r in ok):.0f}"
        )
    if len(ok) != len(rows):
        print(f"demo: {len(rows) - len(ok)} run(s) failed; logs in {out}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
