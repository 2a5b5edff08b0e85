"""Start or join a Ray cluster with safe local defaults.

Ray 2.60 binds to the machine's eth0 address and turns token auth on by default
(ENVIRONMENT.md §4). On a laptop or CI we want loopback only and no token: the two environment
variables below must be set before Ray starts its processes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

_LOOPBACK_GATE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOCAL_ENV = {
    # Ray's Linux gate for "bind to 127.0.0.1": keeps the head, dashboard and workers on loopback.
    _LOOPBACK_GATE: "0",
    # A local throw-away cluster needs no token; a real cluster keeps whatever its operator set.
    "RAY_AUTH_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",
    # Actors' output is interleaved with the driver's progress bar: no weight-loading / shard-writing bars
    # and no load reports from transformers there (errors still print).
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def local_env() -> dict[str, str]:
    """Environment for actors of a local cluster (inherits the caller's values where set)."""
    env = {k: os.environ.get(k, v) for k, v in LOCAL_ENV.items()}
    for key in ("PYTHONPATH", "RLLOOP_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None, host: str = "127.0.0.1") -> dict[str, Any]:
    """Join `address` (or $RAY_ADDRESS, as under `ray job submit`), else start a local cluster on `host`.

    Returns `ray.cluster_resources()`. Idempotent: a second call in the same process is a no-op.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    if address is None and host in ("127.0.0.1", "localhost") and os.environ[_LOOPBACK_GATE] == "0":
        # Ray reads the gate once, when it is first imported: a process that imported ray before this
        # call (rlloop's own controller does) would otherwise resolve its node address to eth0 and bind
        # the GCS, raylet and agents to every interface.
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    runtime_env = {"env_vars": local_env()}
    if address is not None:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = num_cpus or os.cpu_count() or 2
        ray.init(
            # "local": always a new cluster of our own; without it ray.init() joins whatever cluster
            # `ray start` left running on this machine (and then refuses num_cpus)
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            _node_ip_address=host,
            log_to_driver=True,
            configure_logging=False,
        )
        logger.info("started a local Ray cluster on %s with %d CPUs", host, cpus)
    return ray.cluster_resources()


def get(refs: Any, *, timeout: float, what: str) -> Any:
    """`ray.get` with a timeout whose error says which actor call hung or died."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError as err:
        raise TimeoutError(f"{what}: no answer within {timeout:.0f} s") from err
    except RayActorError as err:
        raise RuntimeError(f"{what}: the actor died ({err})") from err
