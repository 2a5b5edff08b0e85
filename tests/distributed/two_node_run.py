"""Two Ray nodes on this machine (ray.cluster_utils.Cluster, one CPU each), then `python -m rlloop.train
cluster.address=<them> <argv...>`; exits with the run's exit code and stops both nodes.

Run as a script by tests/distributed/test_placement.py (its own process: the test session may hold a Ray
of its own)."""

import os
import subprocess
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from ray._private import ray_constants  # noqa: E402

ray_constants.ENABLE_RAY_CLUSTER = False  # loopback only (see rlloop.distributed.ray_setup)
from ray.cluster_utils import Cluster  # noqa: E402

head = {"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"}
cluster = Cluster(initialize_head=True, head_node_args=head)
cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
try:
    proc = subprocess.run(
        [sys.executable, "-m", "rlloop.train", f"cluster.address={cluster.address}", *sys.argv[1:]]
    )
finally:
    cluster.shutdown()
sys.exit(proc.returncode)
