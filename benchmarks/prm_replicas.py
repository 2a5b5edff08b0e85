"""PRM replicas and scoring/generation overlap in the RL loop: time/prm vs time/prm_wait per step.

    python benchmarks/prm_replicas.py --replicas 1 2 --steps 5

Runs `Trainer.train_step` on the tiny model (length reward, 2 rollout workers, reward=tdrm) once per
replica count and prints the medians of steps 2.. (step 1 pays start-up costs).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = [
    "time/generate",
    "time/verify",
    "time/prm",
    "time/prm_wait",
    "time/step",
    "prm/tokens",
    "prm/pad_frac",
]


def run(replicas: int, steps: int, extra: list[str]) -> dict[str, float]:
    from hydra import compose, initialize_config_dir

    from rlloop.config import register_configs
    from rlloop.controller import Trainer
    from tests.conftest import LENGTH_REWARD, TINY_RUN

    register_configs()
    overrides = [
        *TINY_RUN,
        *LENGTH_REWARD,
        "learner.world_size=1",
        "trainer.eval_before=false",
        "reward=tdrm",
        "rollout.num_workers=2",
        "rollout.prompts_per_step=8",
        "rollout.n=8",
        "rollout.max_new_tokens=48",
        f"reward.prm.num_replicas={replicas}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="prm_replicas_"))
    try:
        rows = [trainer.train_step() for _ in range(steps)][1:]
    finally:
        trainer.shutdown()
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. reward.prm.max_batch_tokens=1024"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "rewards" / "verifiers")]  # length-reward fixture
    for replicas in args.replicas:
        print(json.dumps({"num_replicas": replicas, **run(replicas, args.steps, args.overrides)}))


if __name__ == "__main__":
    main()
