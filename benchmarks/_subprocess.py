"""A benchmark arm in a fresh process: the worker prints one `RESULT {json}` line on stdout."""

from __future__ import annotations

import json
import subprocess
import sys

PREFIX = "RESULT "


def run_arm(cmd: list[str], env: dict[str, str], arm: str) -> dict:
    """Run `cmd`; its last RESULT line as a dict, or exit naming the arm with the tail of its stderr."""
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith(PREFIX)]
    if out.returncode != 0 or not lines:
        sys.exit(f"arm {arm} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(PREFIX) :])
