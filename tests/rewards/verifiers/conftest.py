"""A Ray cluster shared by the verifier-pool tests (ENVIRONMENT.md §4: loopback, no auth, 2 CPUs)."""

from __future__ import annotations

import os
import sys

import pytest

# The fixture reward functions are named by dotted path ("reward_fixtures:verl_compute_score"), as a
# user's would be; this folder must be importable in the driver (the pool passes sys.path to workers).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from rlloop.distributed.ray_setup import init_ray

    started = not ray.is_initialized()
    init_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()
