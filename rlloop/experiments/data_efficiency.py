"""Experiment 1, RL data efficiency: held-out accuracy by training prompts seen, for four reward set-ups.

Arms (TDRM, arXiv 2509.15110, in miniature on the built-in `arith` task):

- `rule`            — verifiable outcome reward only (GRPO baseline);
- `rule+scalar`     — outcome + a frozen ScalarPRM, `outcome` fusion (R = w_rule·outcome + w_prm·g(V));
- `rule+td`         — outcome + a frozen TD(0)-PRM, `outcome` fusion (TDRM's released recipe);
- `rule+td-step-online` — outcome + the TD(0)-PRM as a dense `step` reward, TD-updated online as the critic;
- `ppo`             — outcome reward, PPO with a critic (`algo=ppo`, GAE) started from the policy's backbone;
- `ppo+td-critic`   — the same with the TD(0)-PRM as the critic's initialisation (`algo.critic.init=prm`).

The two PRMs are trained first on the same rollouts of the starting policy by
`rlloop.experiments.prm_quality` (or taken from `--prm-dir`, a previous run's `prms/` folder). Every arm
is a real `python -m rlloop.train` run per seed; the curve is `eval/accuracy` (greedy, held-out) against
steps × prompts per step.

    python -m rlloop.experiments.data_efficiency --seeds 0,1,2 --steps 40     # ~1-2 h on 2 cores
    python -m rlloop.experiments.data_efficiency --smoke --out /tmp/de         # CI-sized, model=tiny

Writes `<out>/data_efficiency.{json,md,png}`; an interrupted run continues (finished runs are reused).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rlloop.errors import RlloopError
from rlloop.experiments import common

logger = logging.getLogger(__name__)

ARMS = ("rule", "rule+scalar", "rule+td", "rule+td-step-online", "ppo", "ppo+td-critic")
DEFAULT_ARMS = ARMS[:4]


def arm_overrides(arm: str, prms: dict[str, str], w_prm: float) -> list[str]:
    """Hydra overrides of one arm (PRM paths from `prms`: kind -> folder)."""
    if arm == "rule":
        return ["reward=rule"]
    if arm == "rule+scalar":
        return ["reward=tdrm", f"reward.prm.path={prms['mc']}", f"reward.w_prm={w_prm}", f"reward.w_rule={1 - w_prm}"]
    if arm == "rule+td":
        return ["reward=tdrm", f"reward.prm.path={prms['td0']}", f"reward.w_prm={w_prm}", f"reward.w_rule={1 - w_prm}"]
    if arm == "rule+td-step-online":
        return [
            "reward=tdrm", f"reward.prm.path={prms['td0']}", "reward.fusion=step", "reward.prm.online=true",
            f"reward.w_prm={w_prm}", f"reward.w_rule={1 - w_prm}",
        ]  # fmt: skip
    if arm == "ppo":
        return ["reward=rule", "algo=ppo"]
    if arm == "ppo+td-critic":
        return ["reward=rule", "algo=ppo", "algo.critic.init=prm", f"reward.prm.path={prms['td0']}"]
    raise RlloopError(f"unknown arm {arm!r}; expected one of {list(ARMS)}")


def prepare_prms(args, out: Path) -> dict[str, str]:
    """PRM folders by kind: from --prm-dir, or trained now on rollouts of the starting policy."""
    if args.prm_dir:
        prms = {k: str(Path(args.prm_dir) / k) for k in ("td0", "mc")}
        for k, p in prms.items():
            if not (Path(p) / "config.json").exists():
                raise RlloopError(f"--prm-dir {args.prm_dir}: no PRM folder {p} (config.json missing) for kind {k}")
        return prms
    from rlloop.experiments import prm_quality

    res = prm_quality.run(
        out=str(out / "prm_quality"),
        train_prompts=args.prm_train_prompts,
        eval_prompts=args.prm_eval_prompts,
        n=4,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        epochs=args.prm_epochs,
        lr=3e-4,
        batch_size=16,
        gamma=0.8,
        seed=0,
        model_name=args.model,
        eval_n=4,
        kinds=("td0", "mc"),
    )
    return {k: res[k]["path"] for k in ("td0", "mc")}


def base_overrides(args) -> list[str]:
    return [
        f"model={args.model}",
        f"trainer.total_steps={args.steps}",
        f"trainer.eval_every={args.eval_every}",
        "trainer.eval_before=true",
        "trainer.save_final=false",
        f"rollout.prompts_per_step={args.prompts_per_step}",
        f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        *args.override,
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/experiments/data_efficiency")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"some of {','.join(ARMS)}")
    ap.add_argument("--w-prm", type=float, default=0.2, help="PRM weight of the PRM arms (TDRM: 0.2)")
    common.add_run_arguments(ap)
    args = common.parse_run_args(ap, argv)
    out = Path(args.out)
    arms = [a for a in args.arms.split(",") if a]
    for a in arms:
        if a not in ARMS:
            raise RlloopError(f"--arms: unknown arm {a!r}; expected some of {list(ARMS)}")
    if not 0.0 <= args.w_prm <= 1.0:
        raise RlloopError(f"--w-prm must be in [0, 1], got {args.w_prm}")
    seeds = common.parse_seeds(args.seeds)
    prms = prepare_prms(args, out) if any(a not in ("rule", "ppo") for a in arms) else {}
    results = []
    for seed in seeds:  # seeds outermost: a partial run still compares every arm
        for arm in arms:
            run_dir = out / "runs" / arm.replace("+", "_") / f"seed{seed}"
            results.append(
                common.train_run(
                    arm, seed, [*base_overrides(args), *arm_overrides(arm, prms, args.w_prm)], run_dir,
                    prompts_per_step=args.prompts_per_step, timeout_s=args.timeout_s,
                )
            )  # fmt: skip
    summary = common.summarise(results)
    common.write_report(out, "data_efficiency", results, summary, {"prms": prms, "args": vars(args)})
    if summary:
        common.plot_curves(summary, out / "data_efficiency.png", title=f"RL data efficiency ({args.model}, arith)")
    return common.finish(out, results, summary)


if __name__ == "__main__":
    common.cli(main)
