"""Smoke test for benchmarks/vs_trl.py: two tiny steps of rlloop (sync and async) and of TRL's GRPOTrainer (as
users run it, and under rlloop's malloc setting), so the script cannot rot.

Slow on a loaded 2-core machine (rlloop's start-up — Ray, learner group, verifier pool — dominates).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("trl") is None,
        reason="trl is not installed (pip install -e '.[test]' pins trl==1.16.0)",
    ),
]


def test_vs_trl_tiny_both_systems_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"),
        "--model", "tiny", "--prompts-per-step", "2", "--n", "2", "--max-new-tokens", "8",
        "--steps", "2", "--runs", "1", "--task", "arith", "--systems", "rlloop,trl,trl-mmap1m", "--modes", "sync,async", "--out", str(out),
        "--timeout-s", "500", "--gradient-checkpointing",  # both sides' checkpointing path, too
        # a short final eval and one verifier worker: this test checks the harness, not the speed
        "--rlloop-override", "task.num_test=4", "--rlloop-override", "reward.verifier.num_workers=1",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "results.json").read_text())
    assert {r["system"] for r in report["runs"]} == {"rlloop-ws1", "rlloop-ws1-async", "trl", "trl-mmap1m"}
    for run in report["runs"]:
        assert run["steps_done"] == 2, run
        for key in ("wall_s", "s_per_step", "samples_per_s", "peak_rss_gb", "reward_last"):
            assert math.isfinite(run[key]), (run["system"], key, run[key])
        assert run["peak_rss_gb"] > 0.05, run  # a python process with torch is far above 50 MB
        assert 0 < run["s_per_step"] < run["wall_s"]
    rl = next(r for r in report["runs"] if r["system"] == "rlloop-ws1")
    # the sampler must have found the Ray actors, not only the driver
    assert rl["max_procs"] > 1 and "learner" in rl["peak_rss_gb_by_role"], rl["peak_rss_gb_by_role"]
    assert 0 < rl["peak_pss_gb_by_role"]["learner"] <= rl["peak_rss_gb_by_role"]["learner"] + 1e-6
    # the learner's model FLOPs against the measured matmul peak (a share, and above nothing); packed
    # micro-batches (the default) compute no padding, and the 2 samples of a prompt share it: fewer
    # positions than real tokens, padding_frac = 1 - real / computed below 0
    assert 0 < rl["learner_mfu"] < 1 and -1 < rl["padding_frac"] < 0, rl
    assert report["env"]["matmul_peak_gflops_2_threads"] >= report["env"]["matmul_peak_gflops_2_threads_after"]
    assert "vs_trl: model=tiny system=rlloop-ws1 samples_per_s_ratio=" in proc.stdout
    table = (out / "table.md").read_text()
    assert "rlloop-ws1 / trl" in table and "rlloop-ws1-async / trl" in table and "trl-mmap1m / trl" in table
    assert "positions computed per real token" in table
