"""Run untrusted Python in a child process with limits. Never in the trainer's or the worker's process.

Layers, each measured on the project's machine (see tests/rewards/verifiers/test_verifier_sandbox.py):
1. A separate process in its own session (its process group is killed on timeout), started with
   `python -I -S -B` (no site-packages, no PYTHON* variables, no bytecode writes) and a clean environment
   (PATH, LANG only), in a throw-away working directory.
2. rlimits: CPU time, address space (memory), file size (also caps stdout/stderr, which go to files),
   process count, open files; core dumps off. Wall clock is enforced by the parent.
3. When running as root (containers, CI): a new network namespace (no interfaces up: no network) and a
   per-worker unprivileged uid, which makes RLIMIT_NPROC bite (root ignores it), keeps the child out of
   root-owned files, away from other processes' /proc/PID/environ and unable to signal its parent.
   After each run every process of that uid is killed (a fork bomb's escaped children too).
   Without root it tries an unprivileged user+network namespace; RLIMIT_NPROC is then counted against
   the shared uid, so it is set to that uid's current process count plus the limit.
4. A Python audit hook in the child (defence in depth; the only file/network guard without root):
   no writes or deletes outside the work dir, no other process's environ, no signals to other
   processes, no non-Unix sockets, no subprocess/exec/os.system, no ctypes. Audit hooks can be evaded
   by native code, which is why layers 2-3 exist; without root, a determined attacker with a C
   extension on the path could get further (site-packages are not on the path: `-S`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
_EXIT_REASONS = {1: "uncaught exception", 2: "assertion failed", 3: "sys.exit() before the tests finished",
                 4: "blocked by the sandbox", 5: "sandbox set-up failed"}  # fmt: skip
_UID_BASE = 200_000  # per-worker sandbox uids: _UID_BASE + worker pid (no passwd entry needed)


@dataclass
class SandboxLimits:
    wall_s: float = 2.0  # wall clock per run
    cpu_s: float = 2.0  # CPU seconds per run
    memory_mb: int = 256  # address space
    output_kb: int = 1024  # stdout/stderr and any file the program writes
    max_procs: int = 16  # processes/threads the program may have at once
    max_open_files: int = 64
    isolate_network: bool = True
    drop_privileges: bool = True  # when root: run as a per-worker unprivileged uid
    allow_subprocess: bool = False
    audit_hook: bool = True  # off only to test the OS-level layers on their own


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: Optional[int]
    completed: bool  # the program (and test) ran to the end: not killed, no exit before the end
    reason: str  # "" when completed with returncode 0
    duration_s: float
    isolation: str = ""  # e.g. "uid+netns", for logging/tests


def _interpreter_candidates() -> list[str]:
    seen, out = set(), []
    for path in (
        getattr(sys, "_base_executable", None),
        sys.executable,
        shutil.which("python3"),
        "/usr/bin/python3",
    ):
        if path and os.path.exists(path) and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            out.append(path)
    return out


_PROBE_CACHE: dict[tuple, tuple[str, bool]] = {}


def _choose_interpreter(limits: SandboxLimits) -> tuple[str, bool]:
    """(python, drop_privileges): the first interpreter whose stdlib the sandbox uid can read.

    A pyenv Python under /root (mode 700) cannot import its own stdlib once it is not root any more;
    the system Python usually can. If none works unprivileged, fall back to keeping the uid (logged).
    """
    want_drop = limits.drop_privileges and os.geteuid() == 0
    key = (want_drop,)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    probe = (
        "import json, re, math, collections, itertools, functools, heapq, bisect, string, sys\nprint('ok')\n"
    )
    choice = None
    for python in _interpreter_candidates():
        if want_drop:
            result = _run(probe, "", None, dataclasses.replace(limits, wall_s=10, cpu_s=10), python, True)
            if result.completed and result.stdout.strip() == "ok":
                choice = (python, True)
                break
            logger.info(
                "sandbox: %s cannot run unprivileged (%s)", python, result.reason or result.stderr[-200:]
            )
    if choice is None:
        if want_drop:
            logger.warning("sandbox: no interpreter runs as an unprivileged uid; keeping the current uid")
        choice = (_interpreter_candidates()[0], False)
    _PROBE_CACHE[key] = choice
    return choice


def run_python(
    program: str, stdin: str = "", test: Optional[str] = None, limits: SandboxLimits | None = None
) -> SandboxResult:
    """Run `program` (then `test`, in the same namespace, if given) in a sandboxed child process.

    stdin: fed to the program. Returns its stdout/stderr (decoded with replacement: non-UTF-8 is fine),
    and `completed` only if it ran to the end, which a `sys.exit()` before the test finished is not.
    """
    limits = limits or SandboxLimits()
    python, drop = _choose_interpreter(limits)
    return _run(program, stdin, test, limits, python, drop)


def _uid_processes(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    zombie = False
                    for line in f:
                        if line.startswith("State:"):
                            zombie = line.split()[1] in ("Z", "X")  # dead, waiting to be reaped
                        elif line.startswith("Uid:"):
                            if int(line.split()[1]) == uid and not zombie:
                                pids.append(int(entry))
                            break
            except OSError:
                continue
    return pids


def reap_orphans() -> int:
    """Kill sandbox processes whose worker is gone (it was killed mid-run); returns how many.

    The launcher dies with its worker (PR_SET_PDEATHSIG), but what it forked does not. Sandbox uids are
    _UID_BASE + worker pid, so a process of such a uid whose worker pid no longer exists is an orphan.
    """
    if os.geteuid() != 0:
        return 0
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration, ValueError):
            continue
        if uid >= _UID_BASE and not os.path.exists(f"/proc/{uid - _UID_BASE}"):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    if killed:
        logger.warning("sandbox: killed %d orphaned sandbox processes", killed)
    return killed


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` until none is left (a fork bomb keeps forking while we kill)."""
    for _ in range(50):
        pids = _uid_processes(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)
    logger.error("sandbox: processes of uid %d survive SIGKILL", uid)


def _read_capped(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    return data[:limit].decode("utf-8", errors="replace")


def _run(
    program: str, stdin: str, test: Optional[str], limits: SandboxLimits, python: str, drop: bool
) -> SandboxResult:
    run_dir = tempfile.mkdtemp(prefix="rlloop-sandbox-")  # 0700, ours: config, outputs, status
    try:
        return _run_in(run_dir, program, stdin, test, limits, python, drop)
    finally:  # also when the worker's per-sample limit interrupts us
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_in(
    run_dir: str,
    program: str,
    stdin: str,
    test: Optional[str],
    limits: SandboxLimits,
    python: str,
    drop: bool,
) -> SandboxResult:
    workdir = os.path.join(run_dir, "work")
    os.mkdir(workdir, 0o700)
    uid = _UID_BASE + os.getpid() if drop else None
    if uid is not None:
        os.chmod(run_dir, 0o711)  # the child must reach its cwd by path for realpath(); nothing listable
    nonce = secrets.token_hex(16)
    files = {
        name: os.path.join(run_dir, name) for name in ("main.py", "test.py", "stdin", "out", "err", "status")
    }
    for name, text in (("main.py", program), ("test.py", test), ("stdin", stdin)):
        if text is not None:
            with open(files[name], "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(text)
    nproc = limits.max_procs
    if uid is None:
        nproc += len(_uid_processes(os.getuid()))  # RLIMIT_NPROC counts every process of a shared uid
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": workdir}
    start = time.monotonic()
    proc = None
    timed_out = False
    status = os.open(files["status"], os.O_WRONLY | os.O_CREAT, 0o600)  # the launcher's "ran to the end"
    try:
        config = {
            "program": files["main.py"],
            "test": files["test.py"] if test is not None else None,
            "workdir": workdir,
            "uid": uid,
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "fsize_kb": limits.output_kb,
            "nproc": nproc,
            "nofile": limits.max_open_files,
            "isolate_network": limits.isolate_network,
            "allow_subprocess": limits.allow_subprocess,
            "audit_hook": limits.audit_hook,
            "nonce": nonce,
            "parent_pid": os.getpid(),
            "status_fd": status,  # pass_fds keeps the number
        }
        config_path = os.path.join(run_dir, "config.json")
        with os.fdopen(os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(config, f)
        with (
            open(files["stdin"], "rb") as fin,
            open(files["out"], "wb") as fout,
            open(files["err"], "wb") as ferr,
        ):
            proc = subprocess.Popen(
                [python, "-I", "-S", "-B", _LAUNCHER, config_path],
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                cwd=workdir,
                env=env,
                start_new_session=True,
                pass_fds=(status,),
                close_fds=True,
            )
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        os.close(status)
        _cleanup(proc, uid)
    duration = time.monotonic() - start
    stdout = _read_capped(files["out"], limits.output_kb << 10)
    stderr = _read_capped(files["err"], 64 << 10)
    status_text = _read_capped(files["status"], 4096)
    isolation = "uid" if uid is not None else "same-uid"
    first = status_text.splitlines()[0] if status_text else ""
    if first.startswith("ready"):
        isolation += "+" + (first.split()[1] if len(first.split()) > 1 else "no-netns")
    completed = nonce in status_text and not timed_out and proc is not None and proc.returncode == 0
    reason = "" if completed else _reason(proc, timed_out, stderr, limits)
    returncode = None if proc is None else proc.returncode
    return SandboxResult(stdout, stderr, returncode, completed, reason, duration, isolation)


def warm_up(limits: SandboxLimits | None = None) -> str:
    """Pick the interpreter now (a probe run or two), not inside the first sample's time limit."""
    reap_orphans()
    python, drop = _choose_interpreter(limits or SandboxLimits())
    return f"{python} ({'unprivileged uid' if drop else 'same uid'})"


def _cleanup(proc: Optional[subprocess.Popen], uid: Optional[int]) -> None:
    if proc is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("sandbox: pid %d did not die", proc.pid)
    if uid is not None:
        _kill_uid(uid)


def _reason(proc: Optional[subprocess.Popen], timed_out: bool, stderr: str, limits: SandboxLimits) -> str:
    if proc is None:
        return "sandbox did not start"
    if timed_out:
        return f"wall-clock limit ({limits.wall_s:g} s)"
    code = proc.returncode
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and "MemoryError" not in stderr:
        return (
            f"CPU-time limit ({limits.cpu_s:g} s)" if code == -signal.SIGXCPU else "killed (CPU-time limit)"
        )
    if code == -signal.SIGXFSZ:
        return f"output/file-size limit ({limits.output_kb} KB)"
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    if "File too large" in stderr:  # Python ignores SIGXFSZ: the write raises EFBIG instead
        return f"output/file-size limit ({limits.output_kb} KB)"
    if "MemoryError" in stderr:
        return f"memory limit ({limits.memory_mb} MB)"
    base = _EXIT_REASONS.get(code, f"exit code {code}")
    if code == 0:
        return "exited before the end"
    return f"{base}: {last[:200]}" if last and code in (1, 2, 4, 5) else base
