"""Calibrate a credit-assignment setting: does a PERFECT process reward save prompts over the outcome alone?

Before asking whether a learned PRM helps RL, a setting has to be one where step credit can help at all.
On `task=chain-credit` (long chains, `chain-small` pretrained on them) this runs, per seed:

- `rule`: GRPO on the verifier's outcome only (`reward=rule`);
- `oracle`: the same, with the oracle PRM (`reward.prm.oracle=true`: V = 1 before the first wrong step,
  0 from it on) through `reward.fusion=first_error` (a wrong solution's blame starts at its first wrong
  step; its correct prefix is left alone) — the credit a perfect PRM gives;
- `oracle_step` (with `--arms`): the oracle's step values as a dense, group-normalised step reward
  (`reward.fusion=step reward.step_process=value`) beside the outcome — credit that still has a signal
  when every sample of a group is wrong;
- any `--arm NAME=override,override` added on the command line (e.g. a learned PRM).

For each arm it reports the prompts its mean curve needs to reach `rule`'s final mean accuracy, and the
ratio to `rule`'s; the setting is well posed for the PRM question when the oracle's ratio is <= 0.5.
Last line(s): `credit: rule_prompts=R oracle_prompts=O ratio=O/R` (one per oracle arm).

    python -m rlloop.experiments.credit --seeds 0,1,2 --steps 40 --out docs/credit
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rlloop.experiments import common

ORACLE = ["reward=tdrm", "reward.prm.oracle=true"]
ARMS = {
    "rule": ["reward=rule"],
    # a wrong solution's correct prefix spared, the rest blamed: the prototype's oracle credit
    "oracle": [*ORACLE, "reward.fusion=first_error", "reward.w_prm=1.0"],
    # dense: every step's V (1 while right, 0 from the first error) as a group-normalised step reward on
    # top of the outcome, so a group whose samples are all wrong still learns which went wrong later
    "oracle_step": [*ORACLE, "reward.fusion=step", "reward.step_process=value", "reward.w_rule=1.0",
                    "reward.w_prm=1.0"],
}
DEFAULT_ARMS = "rule,oracle"


def prompts_to_reach(summary: dict, arm: str, target: float, *, interpolate: bool = False) -> float:
    """Prompts seen at the first eval point where `arm`'s mean accuracy >= target (inf if never).

    With `interpolate`, the crossing is placed by linear interpolation between that eval point and the
    one before it (the evaluation grid is coarse: 160 prompts at the default settings)."""
    s = summary[arm]
    prev = None
    for x, m in zip(s["prompts_seen"], s["mean"], strict=True):
        if m >= target - 1e-9:
            if not interpolate or prev is None or m == prev[1]:
                return float(x)
            return prev[0] + (x - prev[0]) * (target - prev[1]) / (m - prev[1])
        prev = (float(x), float(m))
    return math.inf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_run_arguments(ap)
    ap.add_argument("--task", default="chain-credit")
    ap.add_argument("--arms", default=DEFAULT_ARMS, help=f"built-in arms to run, comma-separated, of {sorted(ARMS)}")
    ap.add_argument("--arm", action="append", default=[], help="NAME=override[,override...] (extra arms)")
    ap.add_argument("--out", default="outputs/credit")
    args = common.parse_run_args(ap, argv)
    model = "chain-small" if args.model == "arith-small" else args.model
    unknown = [a for a in args.arms.split(",") if a and a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
    arms = {a: ARMS[a] for a in args.arms.split(",") if a}
    for spec in args.arm:
        name, _, overrides = spec.partition("=")
        arms[name] = [o for o in overrides.split(",") if o]
    task = ["task=chain", "task.min_ops=3", "task.max_ops=4", "task.heldout_fact_frac=0"] if args.smoke else [f"task={args.task}"]
    base = [
        *task, f"model={model}", f"trainer.total_steps={args.steps}",
        f"trainer.eval_every={args.eval_every}", "trainer.eval_samples=0",
        f"rollout.prompts_per_step={args.prompts_per_step}", f"rollout.n={args.n}",
        *([f"rollout.max_new_tokens={args.max_new_tokens}"] if args.smoke else []), *args.override,
    ]  # fmt: skip
    out = Path(args.out)
    results = []
    for seed in common.parse_seeds(args.seeds):
        for arm, overrides in arms.items():
            results.append(
                common.train_run(arm, seed, [*base, *overrides], out / "runs" / f"{arm}-{seed}",
                                 prompts_per_step=args.prompts_per_step, timeout_s=args.timeout_s)  # fmt: skip
            )
    summary = common.summarise(results)
    extra: dict = {}
    if "rule" in summary:
        target = summary["rule"]["final_mean"]
        reach = {arm: prompts_to_reach(summary, arm, target) for arm in summary}
        interp = {arm: prompts_to_reach(summary, arm, target, interpolate=True) for arm in summary}
        extra = {"target_accuracy": target, "prompts_to_reach": reach, "prompts_to_reach_interpolated": interp}
        for arm, x in reach.items():
            print(f"{arm}: reaches rule's final accuracy {target:.3f} after {x:g} prompts "
                  f"(interpolated {interp[arm]:.0f})")  # fmt: skip
        for arm in [a for a in reach if a.startswith("oracle")]:
            ratio = reach[arm] / reach["rule"] if reach["rule"] else math.nan
            ratio_i = interp[arm] / interp["rule"] if interp["rule"] else math.nan
            print(f"credit: rule_prompts={reach['rule']:g} {arm}_prompts={reach[arm]:g} ratio={ratio:.2f} "
                  f"interpolated_ratio={ratio_i:.2f}")  # fmt: skip
    common.write_report(out, "credit", results, summary, extra)
    common.plot_curves(summary, out / "credit.png", title=f"{args.task}: {' vs '.join(summary)}")
    return common.finish(out, results, summary)


if __name__ == "__main__":
    common.cli(main)
