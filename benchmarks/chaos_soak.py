"""Chaos soak: kill random actors at random moments of a run and check nothing was lost or trained twice.

    python benchmarks/chaos_soak.py                         # 30 steps, 6 kills, seed 0
    python benchmarks/chaos_soak.py --steps 4 --kills 2     # the CI size (tests/test_chaos_soak.py)

Two runs of the same config and seed on the tiny model (the deterministic CPU path: HF generate seeded
per step and per worker, ZeRO-2 over gloo): a clean one, then one during which a killer thread SIGKILLs,
at random moments, the process of a random rollout worker, PRM replica, verifier worker or learner rank
(each kind at least once when --kills >= 4). The run recovers by itself: Ray restarts a dead rollout
worker / PRM replica and the controller re-syncs it and re-issues its work; the verifier pool replaces a
dead worker; a dead learner rank makes `rlloop.train.run` restart the run from its last complete checkpoint
(trainer.save_every=1).

The killer works from OUTSIDE the controller: it reads the actors' PIDs from Ray's actor table (the GCS;
`ray.util.state` needs the dashboard, which a local rlloop cluster does not start) and `os.kill`s them.
Nothing in rlloop is patched except `rlloop.controller.Trainer`, subclassed only to keep a handle on the
last Trainer object and read its `trained_groups` (the prompt uids, in order, whose rollouts the kept
updates trained on; restored from the checkpoint after a learner restart).

lost = prompt groups the clean run trained on that the chaos run did not; duplicated = groups the chaos run
trained on more often than the clean run; max_weight_diff = max |w_chaos - w_clean| over the final policy
weights (0.0: bit-identical). Last line:

    chaos: kills=K lost=0 duplicated=0 max_weight_diff=X
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The random tiny model never answers right; the TRL-style length reward of the test fixtures gives GRPO a
# real signal, so the weights move every step and a replayed or skipped batch shows in them.
FIXTURES = ROOT / "tests" / "rewards" / "verifiers"
sys.path.insert(0, str(FIXTURES))

logger = logging.getLogger("chaos_soak")

# Ray actor class name -> the kind of actor the issue asks to kill.
KINDS = {
    "rollout worker": "RolloutWorkerCore",
    "PRM replica": "PRMScorer",
    "verifier worker": "VerifierWorkerCore",
    "learner rank": "LearnerActor",
}

OVERRIDES = [
    "model=tiny",
    "task=arith",
    "task.num_test=8",
    "reward=tdrm",
    "reward.w_prm=0.2",  # the PRM's values enter the reward: a replica that came back wrong would show
    "reward.prm.num_replicas=2",
    "reward.verifier.num_workers=2",
    "reward.verifier.sources={arith:custom}",
    "reward.verifier.custom_fn=reward_fixtures:trl_len_reward",
    "rollout.num_workers=2",
    "rollout.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=24",
    "learner=zero2",
    "learner.world_size=2",
    "learner.micro_batch_size=4",
    "learner.lr=1e-3",
    "algo.use_ref=true",
    "trainer.eval_every=0",
    "trainer.eval_before=false",
    "trainer.save_every=1",  # a killed learner rank costs at most the step it was in
    "trainer.keep_last=2",
    # a SIGKILLed actor is noticed at once (RayActorError); the timeout only catches hangs, and start-up on a
    # loaded 2-core machine (DeepSpeed init, op builds) can take minutes
    "trainer.call_timeout_s=600",
    "logger=[jsonl]",
]


def compose(steps: int, seed: int, kills: int, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlloop.config import register_configs

    register_configs()
    overrides = [
        *OVERRIDES,
        f"trainer.total_steps={steps}",
        f"trainer.seed={seed}",
        f"trainer.max_restarts={kills + 1}",  # learner kills: every one may restart the run
        f"trainer.max_actor_restarts={kills + 1}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def live_actors() -> dict[str, list[int]]:
    """kind -> PIDs of the ALIVE actors of that kind in this driver's Ray cluster."""
    from ray._private import state

    out: dict[str, list[int]] = {kind: [] for kind in KINDS}
    by_class = {cls: kind for kind, cls in KINDS.items()}
    for info in state.actors().values():
        kind = by_class.get(info.get("ActorClassName"))
        if kind is not None and info.get("State") == "ALIVE" and info.get("Pid"):
            out[kind].append(int(info["Pid"]))
    return out


def last_step(out_dir: Path) -> int:
    """The last step metrics.jsonl records (it is truncated back when a run restarts from a checkpoint)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "reward/total" in row:
            step = int(row["step"])
    return step


class StepWatcher(threading.Thread):
    """Seconds between consecutive steps appearing in metrics.jsonl."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(name="step-watcher", daemon=True)
        self.out_dir, self.periods, self.done = out_dir, [], threading.Event()

    def run(self) -> None:
        seen, last_t = 0, None
        while not self.done.wait(0.05):
            step = last_step(self.out_dir)
            if step > seen:
                now = time.monotonic()
                if last_t is not None:
                    self.periods.append((now - last_t) / (step - seen))
                seen, last_t = step, now


class Killer(threading.Thread):
    """SIGKILLs one actor per planned moment: (step s, fraction f) = f of a step's time after metrics.jsonl
    first shows step s. Kinds: each once in random order, then random ones."""

    def __init__(self, out_dir: Path, plan: list[tuple[int, float, str]], step_s: float) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.out_dir, self.plan, self.step_s = out_dir, plan, step_s
        self.kills: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        for at_step, frac, kind in self.plan:
            while last_step(self.out_dir) < at_step:
                if self.done.wait(0.05):
                    return
            if self.done.wait(frac * self.step_s):
                return
            pid = None
            deadline = time.monotonic() + 60
            while pid is None and time.monotonic() < deadline:  # e.g. a learner rank during a restart
                pids = live_actors()[kind]
                if pids:
                    pid = random.Random(at_step * 7 + len(self.kills)).choice(pids)
                elif self.done.wait(0.2):
                    return
            if pid is None:
                logger.error("no live %s to kill after step %d", kind, at_step)
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                logger.warning("%s pid %d was already gone", kind, pid)
                continue
            self.kills.append({"kind": kind, "pid": pid, "after_step": last_step(self.out_dir)})
            logger.warning("chaos: killed %s (pid %d) during step %d", kind, pid, last_step(self.out_dir) + 1)


def train(cfg, out_dir: Path) -> tuple[list[str], dict, float]:
    """rlloop.train.run in this process; returns the last Trainer's trained_groups, summary, seconds."""
    from rlloop import controller
    from rlloop import train as train_cli

    trainers: list = []
    original = controller.Trainer

    class Recording(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    controller.Trainer = Recording
    start = time.monotonic()
    try:
        summary = train_cli.run(cfg, str(out_dir))
    finally:
        controller.Trainer = original
    return list(trainers[-1].trained_groups), summary, time.monotonic() - start


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        raise FileNotFoundError(f"no *.safetensors under {path}")
    return out


def metric_rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "reward/total" in r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--seed", type=int, default=0, help="the runs' trainer.seed and the kill plan's seed")
    p.add_argument("--out", type=Path, default=None, help="keep both runs here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3 (kills happen after step 1 and before the last step)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    # actors import the length reward module by name
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(FIXTURES), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )

    from rlloop.distributed.ray_setup import init_ray

    for attempt in range(3):  # on a loaded machine Ray's raylet may miss its fixed 30 s start-up window
        try:
            init_ray(num_cpus=2)
            break
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception here
            if attempt == 2:
                raise
            logger.warning("Ray did not start (%s); trying again", err)
            import ray

            ray.shutdown()
            time.sleep(5)
    base = args.out or Path(tempfile.mkdtemp(prefix="chaos_soak-"))
    cfg = compose(args.steps, args.seed, args.kills, args.overrides)

    clean_dir, chaos_dir = base / "clean", base / "chaos"
    for d in (clean_dir, chaos_dir):
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.jsonl").unlink(missing_ok=True)

    logger.info("clean run: %d steps -> %s", args.steps, clean_dir)
    watcher = StepWatcher(clean_dir)
    watcher.start()
    try:
        clean_groups, _, clean_s = train(cfg, clean_dir)
    finally:
        watcher.done.set()
        watcher.join(timeout=10)
    # one step's period as the killer sees it (generate ... weight sync, the checkpoint, the metrics row)
    step_s = statistics.median(watcher.periods) if watcher.periods else 5.0
    logger.info("clean run: %.0f s, step period %.1f s", clean_s, step_s)

    rng = random.Random(args.seed)
    kinds = list(KINDS)
    rng.shuffle(kinds)  # every kind once (when kills >= 4), then random ones
    kinds = (kinds + [rng.choice(list(KINDS)) for _ in range(args.kills)])[: args.kills]
    # kill moments: after step 1 (the workers have weights of their own to lose) and before the last step
    at = sorted(rng.randint(1, args.steps - 2) for _ in range(args.kills))
    plan = sorted((s, rng.random(), kind) for s, kind in zip(at, kinds))
    logger.info("chaos run: plan %s -> %s", plan, chaos_dir)
    killer = Killer(chaos_dir, plan, step_s)
    killer.start()
    try:
        chaos_groups, summary, chaos_s = train(cfg, chaos_dir)
    finally:
        killer.done.set()
        killer.join(timeout=10)
    logger.info(
        "chaos run: %.0f s, kills %s, learner restarts %s", chaos_s, killer.kills, summary.get("restarts")
    )

    clean_count, chaos_count = collections.Counter(clean_groups), collections.Counter(chaos_groups)
    lost = sum((clean_count - chaos_count).values())
    duplicated = sum((chaos_count - clean_count).values())
    same_order = clean_groups == chaos_groups
    steps_logged = [r["step"] for r in metric_rows(chaos_dir)]
    a, b = weights(clean_dir / "checkpoint"), weights(chaos_dir / "checkpoint")
    if set(a) != set(b):
        raise RuntimeError(f"the runs saved different tensors: {sorted(set(a) ^ set(b))}")
    max_diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    reward_diff = max(
        abs(x["reward/total"] - y["reward/total"])
        for x, y in zip(metric_rows(clean_dir), metric_rows(chaos_dir))
    )
    result = {
        "steps": args.steps,
        "seed": args.seed,
        "kills": len(killer.kills),
        "kills_by_kind": dict(collections.Counter(k["kind"] for k in killer.kills)),
        "kill_log": killer.kills,
        "learner_restarts": len(summary.get("restarts", [])),
        "lost": lost,
        "duplicated": duplicated,
        "same_order": same_order,
        "groups_trained": len(chaos_groups),
        "steps_logged_once_each": steps_logged == list(range(1, args.steps + 1)),
        "max_reward_diff_per_step": reward_diff,
        "max_weight_diff": max_diff,
        "clean_s": round(clean_s, 1),
        "chaos_s": round(chaos_s, 1),
        "out": str(base),
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    print(
        f"chaos: kills={len(killer.kills)} lost={lost} duplicated={duplicated} max_weight_diff={max_diff:.3g}"
    )
    ok = lost == 0 and duplicated == 0 and steps_logged == list(range(1, args.steps + 1))
    return 0 if ok and len(killer.kills) >= args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
