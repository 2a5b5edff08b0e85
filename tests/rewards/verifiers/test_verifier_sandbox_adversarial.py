"""Adversarial suite: model-written code attacking the sandbox. Every attack must be contained: reward 0
with a reason, the host process and its files untouched, and the pool keeps serving.

Each attack prints PWNED if it succeeded and the test expects PWNED, so only a successful attack scores.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from rlloop.rewards.verifiers import VerifyRequest
from rlloop.rewards.verifiers.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(wall_s=2.0, cpu_s=2.0, memory_mb=256, output_kb=256, max_procs=16)
IS_ROOT = os.geteuid() == 0


def attacks(victim: str, escape: str, parent_pid: str = "os.getppid()") -> dict[str, str]:
    """name -> program. `victim` must survive, `escape` must not appear."""
    return {
        "infinite_loop": "while True:\n    pass\nprint('PWNED')",
        "fork_bomb": (
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
            "print('PWNED')"
        ),
        "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\nprint('PWNED')",
        "huge_output": "import sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n",
        "write_outside": f"open({escape!r}, 'w').write('x')\nprint('PWNED')",
        "write_outside_os_open": (
            f"import os\nfd = os.open({escape!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\nprint('PWNED')"
        ),
        "read_trainer_env": (
            "import os\nenv = open(f'/proc/{" + parent_pid + "}/environ', 'rb').read()\n"
            "print('PWNED' if env else 'empty')"
        ),
        "own_env_is_clean": "import os\nprint('PWNED' if any(k.startswith(('RAY', 'RLLOOP')) for k in os.environ) else 'clean')",
        "open_socket": (
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(1)\n"
            "s.connect(('127.0.0.1', 22))\nprint('PWNED')"
        ),
        "kill_parent": "import os, signal\nos.kill(" + parent_pid + ", signal.SIGKILL)\nprint('PWNED')",
        "delete_files": f"import os\nos.remove({victim!r})\nprint('PWNED')",
        "rmtree_files": f"import shutil, os\nshutil.rmtree(os.path.dirname({victim!r}))\nprint('PWNED')",
        "sys_exit_mid_test": "import sys\nprint('PWNED')\nsys.exit(0)",  # run as an assert test below
        "non_utf8_output": "import sys\nsys.stdout.buffer.write(b'\\xff\\xfePWNED\\x80\\n')",
        "ctypes_escape": "import ctypes\nctypes.CDLL(None).kill(" + parent_pid + ", 9)\nprint('PWNED')",
        "subprocess_escape": f"import subprocess\nsubprocess.run(['rm', '-f', {victim!r}])\nprint('PWNED')",
    }


@pytest.fixture
def host_files(tmp_path):
    victim_dir = tmp_path / "trainer"
    victim_dir.mkdir()
    victim = victim_dir / "checkpoint.txt"
    victim.write_text("precious")
    escape = f"/tmp/rlloop-escape-{os.getpid()}-{time.monotonic_ns()}"  # /tmp is world-writable
    yield str(victim), escape
    assert victim.read_text() == "precious", "the sandbox modified a host file"
    assert not os.path.exists(escape), "the sandbox wrote outside its work dir"


def _run_attack(name, program):
    if name == "sys_exit_mid_test":
        return run_python("def solve():\n    return 1\n" + program, test="assert solve() == 2", limits=LIMITS)
    return run_python(program, limits=LIMITS)


@pytest.mark.parametrize("name", list(attacks("/x", "/y")))
def test_attack_contained_in_process(name, host_files, monkeypatch):
    victim, escape = host_files
    monkeypatch.setenv("RLLOOP_TRAINER_SECRET", "hunter2")
    program = attacks(victim, escape)[name]
    t0 = time.monotonic()
    result = _run_attack(name, program)
    assert time.monotonic() - t0 < LIMITS.wall_s + 5
    if name == "non_utf8_output":  # harmless: it must just decode, not crash the verifier
        assert result.completed and "PWNED" in result.stdout and "\ufffd" in result.stdout
        return
    if name == "own_env_is_clean":
        assert result.completed and result.stdout.strip() == "clean"
        return
    assert not result.completed, (name, result)
    assert "PWNED" not in result.stdout or name == "sys_exit_mid_test"
    assert result.reason, name
    assert "hunter2" not in result.stdout + result.stderr
    assert os.getpid() and os.environ["RLLOOP_TRAINER_SECRET"] == "hunter2"  # we are alive and untouched
    if name in ("fork_bomb", "infinite_loop"):
        assert "limit" in result.reason
    if name == "memory_bomb":
        assert "memory" in result.reason
    if name == "huge_output":
        assert "output" in result.reason and len(result.stdout) <= LIMITS.output_kb << 10


@pytest.mark.skipif(not IS_ROOT, reason="the uid/network-namespace layers need root (see sandbox.py)")
@pytest.mark.parametrize(
    "name",
    ["write_outside_os_open", "read_trainer_env", "open_socket", "kill_parent", "delete_files", "fork_bomb"],
)
def test_os_layers_hold_without_the_audit_hook(name, tmp_path):
    """With the Python audit hook off, rlimits + uid + netns alone still contain the attack."""
    victim_dir = tmp_path / "trainer"
    victim_dir.mkdir()
    (victim_dir / "checkpoint.txt").write_text("precious")
    escape = str(victim_dir / "escape.txt")  # root-owned dir: only the uid layer stops this
    program = attacks(str(victim_dir / "checkpoint.txt"), escape)[name]
    import dataclasses

    result = run_python(program, limits=dataclasses.replace(LIMITS, audit_hook=False))
    assert not result.completed and "PWNED" not in result.stdout, (name, result)
    assert result.isolation == "uid+netns"
    assert (victim_dir / "checkpoint.txt").read_text() == "precious" and not os.path.exists(escape)


def test_fork_bomb_leaves_no_processes():
    from rlloop.rewards.verifiers.sandbox import _UID_BASE, _uid_processes

    run_python(attacks("/x", "/y")["fork_bomb"], limits=LIMITS)
    if IS_ROOT:
        assert _uid_processes(_UID_BASE + os.getpid()) == []


def test_pool_contains_every_attack_and_keeps_serving(ray_cluster, tmp_path):
    from rlloop.rewards.verifiers.pool import VerifierPool

    victim_dir = tmp_path / "trainer"
    victim_dir.mkdir()
    victim = victim_dir / "checkpoint.txt"
    victim.write_text("precious")
    escape = f"/tmp/rlloop-escape-pool-{os.getpid()}"
    code_opts = {
        "wall_s": LIMITS.wall_s,
        "cpu_s": LIMITS.cpu_s,
        "memory_mb": LIMITS.memory_mb,
        "output_kb": LIMITS.output_kb,
    }
    cfg = {"num_workers": 2, "timeout_s": 10.0, "sources": {"code": "code"}, "options": {"code": code_opts}}
    io_test = json.dumps({"inputs": [""], "outputs": ["PWNED\n"]})
    with VerifierPool(cfg) as pool:
        pids_before = sorted(pool.worker_pids())
        requests = []
        for name, program in attacks(str(victim), escape).items():
            tests = json.dumps({"asserts": ["assert False"]}) if name == "sys_exit_mid_test" else io_test
            requests.append(VerifyRequest(name, "code", f"```python\n{program}\n```", tests))
        t0 = time.monotonic()
        results = pool.score(requests)
        elapsed = time.monotonic() - t0
        by_name = {r.uid: r for r in results}
        for name, result in by_name.items():
            if name == "non_utf8_output":  # decodes with replacement characters; not an exact match
                assert result.score == 0.0 and result.reason == "test 1/1: wrong answer"
                continue
            assert result.score == 0.0, (name, result)
            assert result.reason, name
        assert pool.restarts == 0, "an attack took a worker down"
        assert sorted(pool.worker_pids()) == pids_before  # the same worker processes, alive
        good = VerifyRequest(
            "good",
            "code",
            "```python\nprint(int(input()) * 2)\n```",
            json.dumps({"inputs": ["21"], "outputs": ["42"]}),
        )
        assert pool.score([good])[0].score == 1.0  # still serving
    assert victim.read_text() == "precious" and not os.path.exists(escape)
    assert elapsed < 60


@pytest.mark.skipif(not IS_ROOT, reason="sandbox uids exist only when running as root")
def test_orphans_of_a_dead_worker_are_reaped():
    """A worker killed mid-run leaves its sandbox's forked children; the next worker start kills them."""
    import subprocess

    from rlloop.rewards.verifiers.sandbox import _UID_BASE, _uid_processes, reap_orphans

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer exists stands for the killed worker
    uid = _UID_BASE + dead.pid
    orphan = subprocess.Popen(["sleep", "60"], user=uid, group=uid, start_new_session=True)
    try:
        assert _uid_processes(uid) == [orphan.pid]
        assert reap_orphans() >= 1
        assert orphan.wait(timeout=5) == -9
    finally:
        orphan.kill()


def test_sandbox_dies_with_its_worker(tmp_path):
    """The launcher gets SIGKILL when the process that started it (the verifier worker) dies."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {os.getcwd()!r})\n"
        + "from rlloop.rewards.verifiers.sandbox import run_python, SandboxLimits\n"
        "run_python('import time, os\\nprint(os.getpid(), flush=True)\\ntime.sleep(60)', "
        "limits=SandboxLimits(wall_s=60, cpu_s=60))\n"
    )
    worker = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        child = None
        while time.monotonic() < deadline and child is None:
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            cmd = f.read()
                        with open(f"/proc/{pid}/status") as f:
                            ppid = next(int(x.split()[1]) for x in f if x.startswith("PPid:"))
                    except (OSError, StopIteration):
                        continue
                    if b"sandbox_launcher.py" in cmd and ppid == worker.pid:
                        child = int(pid)
            time.sleep(0.1)
        assert child is not None, "the sandbox did not start"
        time.sleep(0.3)  # past the launcher's set-up
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=5)
        for _ in range(50):
            if (
                not os.path.exists(f"/proc/{child}")
                or open(f"/proc/{child}/status").read().find("State:\tZ") >= 0
            ):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"sandbox pid {child} outlived its worker")
    finally:
        worker.kill()
