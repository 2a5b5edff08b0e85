"""The chaos soak at CI size: actors SIGKILLed from outside at random moments; no prompt lost or trained twice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_chaos_soak_loses_and_duplicates_nothing(tmp_path):
    """benchmarks/chaos_soak.py with 4 steps and 2 kills (the full soak: 30 steps, 6 kills, RESULTS.md).
    Its own process: the soak starts and owns a Ray cluster, which must not be the pytest session's."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos_soak.py"),
            "--steps=4",
            "--kills=2",
            f"--out={tmp_path / 'runs'}",
            f"--json={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("chaos: kills=2 lost=0 duplicated=0 max_weight_diff="), last
    result = json.loads(out.read_text())
    assert result["kills"] == 2 and result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["same_order"] and result["steps_logged_once_each"], result
