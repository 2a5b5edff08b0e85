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


LAUNCH_SCRIPTS = sorted([*(ROOT / "launch").glob("*.sh"), *(ROOT / "launch").glob("*.sbatch")])


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    if not local.exists():
        pytest.fail(f"{name} is not installed: run `make setup` (it comes with pip install -e '.[test]')")
    return str(local)


def test_launch_scripts_exist():
    names = {p.name for p in LAUNCH_SCRIPTS}
    assert {"local_job.sh", "submit.sh", "sweep.sh", "slurm.sbatch"} <= names


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=[p.name for p in LAUNCH_SCRIPTS])
def test_launch_script_passes_bash_n_and_shellcheck(script):
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run(
        [_tool("shellcheck"), "--shell=bash", "--severity=style", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_shellcheck_does_find_problems(tmp_path):
    """The same call flags a known fault (an unquoted variable), so a silent linter cannot pass scripts."""
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/tmp\n")
    lint = subprocess.run([_tool("shellcheck"), "--severity=style", str(bad)], capture_output=True, text=True)
    assert lint.returncode != 0 and "SC2086" in lint.stdout


def _submit(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    return subprocess.run(
        ["bash", "launch/submit.sh", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60
    )


def test_submit_without_a_cluster_address_says_how_to_give_one():
    proc = _submit(["model=tiny"])
    assert proc.returncode == 2
    assert "error: no Ray cluster to submit to: pass --address" in proc.stderr


def test_submit_refuses_an_env_var_that_is_not_set_before_contacting_the_cluster():
    # the address is a closed port: had the script tried to submit, the error would be a connection one
    proc = _submit(["--address", f"http://127.0.0.1:{_free_port()}", "--env", "RLLOOP_SURELY_UNSET_VAR"])
    assert proc.returncode != 0
    assert "--env RLLOOP_SURELY_UNSET_VAR: not set in this shell" in proc.stderr
    assert "ray job submit" not in proc.stderr


@pytest.mark.slow
def test_hydra_multirun_sweep_over_w_prm_runs_every_combination(tmp_path):
    """launch/sweep.sh with a 2-value w_prm grid: two 1-step runs, each in <sweep dir>/<n> with its own
    w_prm in its saved config and one trained step in its metrics."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHON": sys.executable, "SWEEP_DIR": str(sweep), "WANDB_MODE": "disabled"}
    grid = [
        "reward.w_prm=0,0.5",
        *TINY_RUN,
        "rollout.prompts_per_step=2",
        "task.num_test=4",
        "trainer.total_steps=1",
        "trainer.eval_before=false",
        "learner.world_size=1",
    ]
    proc = subprocess.run(
        ["bash", "launch/sweep.sh", *grid], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(2 runs)" in proc.stdout
    assert (sweep / "multirun.yaml").is_file()
    w_prm = {}
    for run in ("0", "1"):
        config = (sweep / run / "config_resolved.yaml").read_text()
        w_prm[run] = next(line.split(":")[1].strip() for line in config.splitlines() if "w_prm:" in line)
        rows = [json.loads(x) for x in (sweep / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "reward/total" in r] == [1]
    assert sorted(w_prm.values()) == ["0.0", "0.5"]
