"""launch/local_job.sh: a real `ray job submit` of a 1-step tiny run against a local head node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RUN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_one_step(tmp_path):
    out = tmp_path / "job"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "RAY": str(Path(sys.executable).parent / "ray"),
        "RAY_PORT": str(_free_port()),
        "RAY_DASHBOARD_PORT": str(_free_port()),
        "OUT_DIR": str(out),
        "WANDB_MODE": "disabled",
    }
    proc = subprocess.run(
        [
            "bash",
            "launch/local_job.sh",
            *TINY_RUN,
            "trainer.total_steps=1",
            "learner.world_size=1",
            "trainer.eval_before=false",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "succeeded" in log, log
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/total" in r] == [1]
    # The head node is gone afterwards: nothing listens on its dashboard port any more.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(env["RAY_DASHBOARD_PORT"]))) != 0
