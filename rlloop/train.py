"""`python -m rlloop.train [overrides]` (also `rlloop-train`): one RL run, configured by Hydra.

With no arguments it trains the built-in `arith-small` model (pretraining it first if not cached) on
the built-in `arith` task, on a local Ray cluster, and prints held-out accuracy before and after.
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlloop.config import register_configs
from rlloop.errors import RlloopError

logger = logging.getLogger("rlloop.train")

register_configs()


def run(cfg: DictConfig, out_dir: str) -> dict:
    """Build the actors, train, evaluate and save; returns a summary dict."""
    from rlloop.controller import Trainer

    trainer = Trainer(cfg, out_dir)
    try:
        return trainer.run()
    finally:
        trainer.shutdown()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    out_dir = cfg.output_dir or HydraConfig.get().runtime.output_dir
    OmegaConf.save(cfg, f"{out_dir}/config_resolved.yaml", resolve=True)
    try:
        with logging_redirect_tqdm():
            summary = run(cfg, out_dir)
    except (RlloopError, FileNotFoundError) as err:
        # The user's input is wrong: one clear line naming the culprit, no traceback.
        logger.error("error: %s", err)
        sys.exit(2)
    logger.info("summary: %s", json.dumps(summary))
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before is not None and after is not None:
        print(f"held-out accuracy: before {before:.3f} -> after {after:.3f}")
    print(f"outputs: {out_dir}  (metrics.jsonl, training.png, checkpoint/)")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
