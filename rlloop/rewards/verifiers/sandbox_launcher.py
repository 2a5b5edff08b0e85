"""Runs INSIDE the sandbox child (as a script: `python -I -S -B sandbox_launcher.py RUN_DIR/config.json`).

Stdlib only, single-threaded, so it can safely do what a `preexec_fn` in a multi-threaded Ray worker
could not: leave the network namespace, set resource limits, drop root, install the audit hook, and
only then run the untrusted program in this same process (no second interpreter start-up).

Exit codes the parent reads: 0 ok (for asserts: all ran), 1 uncaught exception, 2 assertion failed,
3 sys.exit() before the tests finished, 4 a blocked operation, 5 sandbox set-up failed.
"""

import json
import os
import resource
import sys

EXIT_ERROR, EXIT_ASSERT, EXIT_SYSEXIT, EXIT_BLOCKED, EXIT_SETUP = 1, 2, 3, 4, 5
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000


class Blocked(PermissionError):
    """An operation the sandbox forbids (raised from the audit hook)."""


def _unshare_network() -> str:
    """Enter a fresh network namespace (only a down loopback): 'netns', 'userns+netns' or ''."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return "netns"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:  # unprivileged user namespaces, if allowed
        return "userns+netns"
    return ""


def _set_limits(cfg: dict) -> None:
    cpu = int(cfg["cpu_s"]) + 1 if cfg["cpu_s"] % 1 else int(cfg["cpu_s"])
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU, then SIGKILL a second later
        resource.RLIMIT_AS: (cfg["memory_mb"] << 20,) * 2,
        resource.RLIMIT_FSIZE: (cfg["fsize_kb"] << 10,) * 2,  # also caps stdout/stderr (files)
        resource.RLIMIT_NPROC: (cfg["nproc"],) * 2,
        resource.RLIMIT_NOFILE: (cfg["nofile"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, value in limits.items():
        resource.setrlimit(which, value)


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the verifier worker dies (e.g. the pool killed it for hanging).

    Set after the uid change, which clears the parent-death signal.
    """
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(EXIT_SETUP)


def _install_audit_hook(workdir: str, private: str, allow_subprocess: bool) -> None:
    """Defence in depth, and the only guard where root is not available to drop privileges.

    Blocks: writes/deletes outside `workdir`, reading other processes' environ, signals to other
    processes, non-Unix sockets, new programs (subprocess, exec, os.system) and ctypes.
    """
    real = os.path.realpath
    workdir = real(workdir)
    private = real(private)
    me = os.getpid()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an fd already open
        path = real(os.fsdecode(path))
        return path == workdir or path.startswith(workdir + os.sep) or path in ("/dev/null", "/dev/zero")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            text = real(os.fsdecode(path))
            if text.startswith(private):
                raise Blocked(f"sandbox: reading {text} is not allowed")
            if (
                text.startswith("/proc/")
                and text.endswith("/environ")
                and text != f"/proc/{os.getpid()}/environ"
            ):
                raise Blocked(f"sandbox: reading {text} is not allowed")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write_flags
            if writing and not inside(path):
                raise Blocked(f"sandbox: writing {text} (outside the work dir) is not allowed")
        elif event in (
            "os.remove",
            "os.rmdir",
            "os.rename",
            "os.truncate",
            "os.chmod",
            "os.chown",
            "os.link",
            "os.symlink",
            "os.mkdir",
            "os.utime",
            "shutil.rmtree",
        ):
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            for path in paths[:2] if event in ("os.rename", "os.link", "os.symlink") else paths[:1]:
                if not inside(path):
                    raise Blocked(
                        f"sandbox: {event} on {os.fsdecode(path)} (outside the work dir) is not allowed"
                    )
        elif event in ("os.kill", "os.killpg"):
            target = args[0]
            if event == "os.killpg" or target not in (0, me, os.getpid()):
                raise Blocked(f"sandbox: {event}({target}) is not allowed")
        elif event == "socket.__new__":
            family = args[1] if len(args) > 1 else None
            if family not in (1, None):  # AF_UNIX only (socketpair for local IPC)
                raise Blocked("sandbox: network sockets are not allowed")
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"):
            address = args[1] if len(args) > 1 else None
            if not isinstance(address, (str, bytes)):
                raise Blocked(f"sandbox: {event} is not allowed")
        elif event.startswith(("ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata")):
            raise Blocked("sandbox: ctypes is not allowed")
        elif not allow_subprocess and event in (
            "subprocess.Popen",
            "os.system",
            "os.exec",
            "os.posix_spawn",
            "os.spawn",
            "os.startfile",
            "pty.spawn",
        ):
            raise Blocked(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def main() -> None:
    config_path = sys.argv[1]
    with open(config_path) as f:
        cfg = json.load(f)
    private = os.path.dirname(config_path)
    with open(cfg["program"], "rb") as f:  # read before privileges drop (the run dir is root-only)
        program = f.read()
    test = None
    if cfg.get("test") is not None:
        with open(cfg["test"], "rb") as f:
            test = f.read()
    nonce = cfg["nonce"].encode()
    status_fd = int(cfg["status_fd"])
    try:
        network = _unshare_network() if cfg["isolate_network"] else ""
        if cfg["uid"] is not None:
            os.chown(cfg["workdir"], cfg["uid"], cfg["uid"])
        _set_limits(cfg)
        if cfg["uid"] is not None:
            _drop_privileges(cfg["uid"])
        _die_with_parent(cfg["parent_pid"])
        os.chdir(cfg["workdir"])
        if cfg["audit_hook"]:
            _install_audit_hook(cfg["workdir"], private, cfg["allow_subprocess"])
    except Exception as err:  # the parent reports this as a sandbox failure, not a model failure
        os.write(2, f"sandbox set-up failed: {err!r}\n".encode())
        os._exit(EXIT_SETUP)
    os.write(status_fd, f"ready {network}\n".encode())
    del cfg
    sys.argv = ["main.py"]
    namespace = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
    code = 0
    try:
        exec(compile(program, "main.py", "exec"), namespace)
        if test is not None:
            exec(compile(test, "test.py", "exec"), namespace)
    except SystemExit as err:
        if test is not None:
            code = EXIT_SYSEXIT
        else:
            code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except AssertionError:
        import traceback

        traceback.print_exc()
        code = EXIT_ASSERT
    except Blocked:
        import traceback

        traceback.print_exc()
        code = EXIT_BLOCKED
    except BaseException:
        import traceback

        traceback.print_exc()
        code = EXIT_ERROR
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    if code == 0:
        os.write(status_fd, nonce + b"\n")  # proof the program and its tests ran to the end
    os._exit(code)


if __name__ == "__main__":
    main()
