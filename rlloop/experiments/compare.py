"""Compare finished `rlloop.train` run folders: held-out accuracy curves (mean and min–max over the runs that
share a label, i.e. seeds), a PNG and a markdown table.

    python -m rlloop.experiments.compare --run "lr 3e-5=outputs/a/seed0" --run "lr 3e-5=outputs/a/seed1" \
        --prompts-per-step 16 --out docs/img/demo.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlloop.errors import RlloopError
from rlloop.experiments import common


def load_runs(specs: list[str], prompts_per_step: int) -> list[common.RunResult]:
    runs = []
    for i, spec in enumerate(specs):
        label, sep, folder = spec.rpartition("=")
        if not sep or not label:
            raise RlloopError(f"--run {spec!r}: expected LABEL=RUN_DIR")
        metrics = Path(folder) / "metrics.jsonl"
        if not metrics.exists():
            raise RlloopError(f"--run {spec!r}: {metrics} does not exist")
        curve = common.eval_curve(metrics, prompts_per_step)
        if not curve:
            raise RlloopError(f"--run {spec!r}: {metrics} has no eval/accuracy rows")
        runs.append(common.RunResult(label, i, folder, 0, 0.0, curve))
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeat; same label = seeds)")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--title", default="held-out accuracy")
    ap.add_argument("--out", required=True, help="PNG path; the table goes next to it as .md")
    args = ap.parse_args(argv)
    summary = common.summarise(load_runs(args.run, args.prompts_per_step))
    out = Path(args.out)
    common.plot_curves(summary, out, title=args.title)
    table = common.markdown_table(summary, wall=False)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    common.cli(main)
