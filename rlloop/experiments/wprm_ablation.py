"""Experiment 3, ablation of the PRM weight: R = (1 − w_prm)·outcome + w_prm·g(V) with a frozen TD(0)-PRM
(`outcome` fusion, TDRM's released recipe; TDRM found w_prm = 0.2 best), w_prm = 0 being rule-only.

    python -m rlloop.experiments.wprm_ablation --weights 0,0.1,0.2,0.4 --seeds 0,1,2 \
        --prm-dir outputs/experiments/data_efficiency/prm_quality/prms
    python -m rlloop.experiments.wprm_ablation --smoke --out /tmp/wprm          # CI-sized, model=tiny

Writes `<out>/wprm_ablation.{json,md,png}` (final accuracy against w_prm, mean and spread over seeds).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rlloop.errors import RlloopError
from rlloop.experiments import common
from rlloop.experiments.data_efficiency import base_overrides, prepare_prms

logger = logging.getLogger(__name__)


def plot_final(summary: dict[str, dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = sorted(summary, key=lambda a: float(a.split("=")[1]))
    x = [float(a.split("=")[1]) for a in ws]
    mean = [summary[a]["final_mean"] for a in ws]
    err = [summary[a]["final_std"] for a in ws]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(x, mean, yerr=err, marker="o", capsize=4)
    ax.set_xlabel("w_prm")
    ax.set_ylabel("final held-out accuracy (mean ± std)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/experiments/wprm_ablation")
    ap.add_argument("--weights", default=None, help="comma-separated w_prm values (default 0,0.1,0.2,0.4; smoke 0,0.2)")
    common.add_run_arguments(ap)
    args = common.parse_run_args(ap, argv)
    args.weights = args.weights or ("0,0.2" if args.smoke else "0,0.1,0.2,0.4")
    try:
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
    except ValueError as e:
        raise RlloopError(f"--weights must be comma-separated numbers, got {args.weights!r}") from e
    bad = [w for w in weights if not 0.0 <= w <= 1.0]
    if bad or not weights:
        raise RlloopError(f"--weights must be non-empty and in [0, 1], got {args.weights!r}")
    out = Path(args.out)
    prms = prepare_prms(args, out)
    results = []
    for seed in common.parse_seeds(args.seeds):
        for w in weights:
            arm = f"w_prm={w:g}"
            overrides = [
                *base_overrides(args), "reward=tdrm", f"reward.prm.path={prms['td0']}",
                f"reward.w_prm={w}", f"reward.w_rule={1 - w}",
            ]  # fmt: skip
            results.append(
                common.train_run(
                    arm, seed, overrides, out / "runs" / f"w{w:g}" / f"seed{seed}",
                    prompts_per_step=args.prompts_per_step, timeout_s=args.timeout_s,
                )
            )  # fmt: skip
    summary = common.summarise(results)
    common.write_report(out, "wprm_ablation", results, summary, {"prms": prms, "args": vars(args)})
    if summary:
        plot_final(summary, out / "wprm_ablation.png", f"PRM weight ablation ({args.model}, arith)")
    return common.finish(out, results, summary)


if __name__ == "__main__":
    common.cli(main)
