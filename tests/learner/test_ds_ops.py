"""DeepSpeed's CPU JIT op built safely (rlloop.models.ds_engine.prepare_cpu_ops): one build folder per Python
environment, one rlloop build at a time, and torch's build lock cleared when a dead build left it.

The failure this guards against (2026-12-05): a learner killed during the op's rebuild left
`<extensions>/deepspeed_shm_comm/lock`; every later learner waited on it until its 600 s set-up timeout."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from rlloop.models.ds_engine import build_guard, clear_stale_build_locks, extensions_root
from tests.conftest import ROOT


def test_extensions_root_is_per_environment_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    root = extensions_root()
    assert root.name.startswith("rlloop-py") and os.environ["TORCH_EXTENSIONS_DIR"] == str(root)
    # another environment (sys.prefix) gets another folder
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert extensions_root() != root
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the user's choice wins
    assert extensions_root() == tmp_path


def test_stale_build_locks_are_removed_and_named(tmp_path, caplog):
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    (tmp_path / "other_op").mkdir()
    (tmp_path / "other_op" / "build.ninja").touch()
    with caplog.at_level(logging.WARNING, logger="rlloop.models.ds_engine"):
        removed = clear_stale_build_locks(tmp_path)
    assert removed == [tmp_path / "deepspeed_shm_comm" / "lock"]
    assert not removed[0].exists() and (tmp_path / "other_op" / "build.ninja").exists()
    assert "deepspeed_shm_comm/lock" in caplog.text


def test_build_guard_excludes_others_and_dies_with_its_holder(tmp_path):
    """While a process holds the guard nobody else gets it; once that process is killed (no clean-up
    runs), the kernel releases it: unlike torch's lock file, a dead holder cannot block the next build."""
    code = (
        "import sys, time; from pathlib import Path; from rlloop.models.ds_engine import build_guard\n"
        f"with build_guard(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with open(tmp_path / ".rlloop-build.lock", "w") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        t0 = time.perf_counter()
        with build_guard(tmp_path):
            assert time.perf_counter() - t0 < 5
    finally:
        child.kill()
        child.wait()


def test_prepare_cpu_ops_builds_past_a_stale_lock(tmp_path):
    """The real op, built from scratch in an empty folder where a dead build left its lock: before the
    fix the build waited on that lock forever (here: until the timeout)."""
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    code = (
        "import deepspeed.ops\nfrom deepspeed.accelerator import get_accelerator\n"
        "from rlloop.models.ds_engine import prepare_cpu_ops\n"
        "name = get_accelerator().create_op_builder('ShareMemCommBuilder').NAME\n"
        "prepare_cpu_ops()\nprint('compatible', deepspeed.ops.__compatible_ops__.get(name, False))\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "deepspeed_shm_comm" / "lock").exists()
    if proc.stdout.strip().endswith("compatible True"):  # a CPU DeepSpeed cannot build it for builds nothing
        assert (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()
