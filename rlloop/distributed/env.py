"""Environment for child processes that must form their own torch.distributed group.

A process that joined a group (an in-process learner, a DeepSpeed launcher rank) carries RANK/MASTER_PORT in
its environment; a child started from it (a CLI, a benchmark run, the arith-small pretraining) would inherit
them and try to join or listen on that group's port (EADDRINUSE). Children get an environment without them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DIST_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def without_dist_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: os.environ) without the torch.distributed rendezvous variables."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in DIST_ENV_KEYS}
