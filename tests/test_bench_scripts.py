"""Smoke test for benchmarks/learner_step.py and benchmarks/generation_malloc.py on the tiny model, so the
scripts behind RESULTS.md's "Learner memory" section cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _table_rows(out: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_learner_step_composed_arms():
    out = _run(
        "benchmarks/learner_step.py", "--model", "tiny", "--rows", "4", "--prompt-len", "8",
        "--response-len", "4", "--micro-batch", "4", "--threads", "1", "--steps", "1", "--rounds", "1",
        "--arms", "response-only,response-only+gc+zero0+plainlp+mmap1m",
    )  # fmt: skip
    rows = _table_rows(out)
    assert set(rows) == {"response-only", "response-only+gc+zero0+plainlp+mmap1m"}, out
    for cells in rows.values():
        assert float(cells[0]) > 0 and float(cells[1]) > 0  # step s, peak RSS GB


def test_learner_step_rejects_a_bad_arm():
    proc = subprocess.run(
        [sys.executable, "benchmarks/learner_step.py", "--arms", "response-only+zero0+zero2"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0 and "more than one ZeRO stage" in proc.stderr


def test_generation_malloc_both_arms():
    out = _run(
        "benchmarks/generation_malloc.py", "--model", "tiny", "--prompts", "2", "--n", "2", "--tokens", "8",
        "--repeats", "1", "--rounds", "1",
    )  # fmt: skip
    rows = _table_rows(out)
    assert set(rows) == {"default", "mmap1m"}, out
    assert rows["default"][2] == "1.00" and float(rows["mmap1m"][0]) > 0


def test_gpu_check_learner_figure_on_cpu(tmp_path):
    """benchmarks/gpu_check.py's learner figure (what gpu_check.sh runs on a lent GPU) on the tiny shape:
    one line per batching arm, and packed with GRPO groups computes each prompt once."""
    out = _run(
        "benchmarks/gpu_check.py", "learner", "--model", "tiny", "--device", "cpu", "--models-dir", str(tmp_path),
        "--rows", "8", "--group", "4", "--prompt-len", "16", "--response-len", "16", "--micro-batch", "8", "--steps", "1",
    )  # fmt: skip
    lines = {f["batching"]: f for f in (dict(kv.split("=", 1) for kv in line.split()[2:])
                                        for line in out.splitlines() if line.startswith("gpu_check: learner_step"))}  # fmt: skip
    assert set(lines) == {"padded", "sorted", "packed"}, out
    tokens = int(lines["packed"]["tokens"])
    # 2 prompts of 16 tokens, each stored once instead of 4 times
    assert int(lines["packed"]["positions"]) == tokens - 2 * 3 * 16
    assert all(float(f["step_s"]) > 0 for f in lines.values())
