"""Reward hacking against the code verifier: hostile programs that must score 0 and leave no trace, and
legitimate ones that must score 1. None is skipped: bubblewrap works on the CI machine.

Every hostile program faces a test only the hidden expected value can pass (`SECRET`, a fresh random
token kept in the trusted process, a host file, the host's environment). After each: the score is 0; no
file named with the run's token exists outside the sandbox (the canary dir under tmp_path, the host's
/tmp and /dev/shm); no process of the sandbox uid and no child of this process survives; nothing
connected to the listener this test holds on 127.0.0.1; no listener on the port the attack bound; the
secret is in neither the reason nor the scores.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import pytest

from rlloop.rewards.verifiers import VerifyRequest, get_verifier
from rlloop.rewards.verifiers.sandbox import _UID_BASE, resolve_isolation

verify_code = get_verifier("code")
OPTS = {"wall_s": 1.0, "cpu_s": 1.0, "memory_mb": 256, "output_kb": 256, "max_procs": 16}

# name -> (program, kind). kind "call": judged by `assert solve() == SECRET`; "io": stdout must be SECRET.
# Placeholders: CANARY (a host dir), TOKEN (names every file an attack makes), PORT (host listener),
# BIND_PORT (what an attack tries to listen on), ABSTRACT (a host abstract unix socket).
ATTACKS: dict[str, tuple[str, str]] = {
    # ---- writes outside the work dir
    "write_canary": ("open('CANARY/TOKEN-a', 'w').write('x')\ndef solve():\n    return 0", "call"),
    "os_open_low_level": (
        "import os\nfd = os.open('CANARY/TOKEN-b', os.O_CREAT | os.O_WRONLY)\nos.write(fd, b'x')\n"
        "def solve():\n    return 0",
        "call",
    ),
    "fifo": (
        "import os\nfor d in ('CANARY', '/tmp', '/dev/shm', '.'):\n"
        "    try:\n        os.mkfifo(d + '/TOKEN-fifo')\n    except OSError:\n        pass\n"
        "def solve():\n    return 0",
        "call",
    ),
    "hard_link": (
        "import os\nopen('TOKEN-src', 'w').write('x')\n"
        "for dst in ('CANARY/TOKEN-hl', '/tmp/TOKEN-hl', '/dev/shm/TOKEN-hl'):\n"
        "    try:\n        os.link('TOKEN-src', dst)\n    except OSError:\n        pass\n"
        "try:\n    os.link('/sandbox/main.py', 'TOKEN-main')\nexcept OSError:\n    pass\n"
        "def solve():\n    return 0",
        "call",
    ),
    "symlink_escape": (
        "import os\nos.symlink('CANARY', 'TOKEN-ln')\n"
        "try:\n    open('TOKEN-ln/TOKEN-via-link', 'w').write('x')\nexcept OSError:\n    pass\n"
        "os.symlink('/proc/1/root/CANARY', 'TOKEN-ln2')\n"
        "try:\n    open('TOKEN-ln2/TOKEN-via-proc', 'w').write('x')\nexcept OSError:\n    pass\n"
        "def solve():\n    return 0",
        "call",
    ),
    "sub_interpreter": (
        "try:\n    import _xxsubinterpreters as interp\nexcept ImportError:\n    import _interpreters as interp\n"
        "i = interp.create()\n"
        "interp.run_string(i, \"open('CANARY/TOKEN-sub', 'w').write('x'); "
        "open('/tmp/TOKEN-sub', 'w').write('x')\")\n"
        "def solve():\n    return 0",
        "call",
    ),
    "dev_shm_and_tmp": (
        "open('/dev/shm/TOKEN-shm', 'w').write('x')\nopen('/tmp/TOKEN-tmp', 'w').write('x')\n"
        "def solve():\n    return 0",
        "call",
    ),
    "read_only_system": (
        "import os\nwritten = []\n"
        "for d in ('/', '/usr', '/usr/lib', '/sandbox', '/etc', '/dev', '/proc/self'):\n"
        "    try:\n        open(d + '/TOKEN-ro', 'w').write('x')\n        written.append(d)\n"
        "    except OSError:\n        pass\n"
        "def solve():\n    return written",
        "call",
    ),
    "ctypes_syscalls": (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "fd = libc.open(b'CANARY/TOKEN-ct', 0o101, 0o644)\nlibc.write(fd, b'x', 1)\n"
        "def solve():\n    return fd",
        "call",
    ),
    "subprocess_shell": (
        "import subprocess\n"
        "try:\n    subprocess.run(['/bin/sh', '-c', 'touch CANARY/TOKEN-sh /tmp/TOKEN-sh'])\n"
        "except OSError:\n    pass\ndef solve():\n    return 0",
        "call",
    ),
    # ---- reading the tests or the expected outputs
    "read_expected_file": ("def solve():\n    return open('CANARY/expected.json').read()", "call"),
    "walk_the_filesystem": (
        "import os\ndef solve():\n"
        "    for root, dirs, files in os.walk('/'):\n"
        "        dirs[:] = [d for d in dirs if d not in ('proc', 'dev', 'x86_64-linux-gnu')]\n"
        "        for f in [f for f in files if not f.endswith(('.py', '.pyc', '.so'))]:\n"
        "            try:\n                text = open(os.path.join(root, f), errors='ignore').read(1 << 16)\n"
        "            except OSError:\n                continue\n"
        "            if 'SECRET-' in text:\n"
        "                return text[text.index('SECRET-'):][:43]\n"
        "    return None",
        "call",
    ),
    "proc_environ_and_cmdline": (
        "import os\ndef solve():\n    for pid in os.listdir('/proc'):\n"
        "        for what in ('environ', 'cmdline'):\n"
        "            try:\n                data = open(f'/proc/{pid}/{what}', 'rb').read().decode()\n"
        "            except OSError:\n                continue\n"
        "            if 'SECRET-' in data:\n                return data[data.index('SECRET-'):][:43]\n"
        "    return os.getppid()",
        "call",
    ),
    "parent_memory": (
        "import os, re\ndef solve():\n    for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        "        try:\n            maps = open(f'/proc/{pid}/maps').read().splitlines()\n"
        "            mem = open(f'/proc/{pid}/mem', 'rb')\n        except OSError:\n            continue\n"
        "        for line in maps:\n            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
        "            try:\n                mem.seek(lo)\n                chunk = mem.read(min(hi - lo, 1 << 24))\n"
        "            except (OSError, ValueError, OverflowError):\n                continue\n"
        "            m = re.search(rb'SECRET-[0-9a-f]{36}', chunk)\n"
        "            if m and pid != str(os.getpid()):\n                return m.group().decode()\n"
        "    return None",
        "call",
    ),
    "own_environment": (
        "import os\ndef solve():\n    return next((v for v in os.environ.values() if 'SECRET' in v), dict(os.environ))",
        "call",
    ),
    "frames": (
        "import sys\ndef solve():\n    f = sys._getframe()\n    while f is not None:\n"
        "        for scope in (f.f_locals, f.f_globals):\n            for v in list(scope.values()):\n"
        "                if isinstance(v, str) and v.startswith('SECRET-'):\n                    return v\n"
        "        f = f.f_back\n    return None",
        "call",
    ),
    "gc_objects": (
        "import gc\ndef solve():\n    for o in gc.get_objects():\n"
        "        for v in (o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()):\n"
        "            if isinstance(v, str) and v.startswith('SECRET-'):\n                return v\n"
        "    return None",
        "call",
    ),
    "inherited_fds": (
        "import os\ndef solve():\n    seen = []\n    for fd in range(3, 64):\n"
        "        try:\n            seen.append((fd, os.readlink(f'/proc/self/fd/{fd}')))\n"
        "        except OSError:\n            pass\n    return str(seen)",
        "call",
    ),
    # ---- patching builtins, the harness, sys.modules
    "patch_builtins": (
        "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
        "builtins.sorted = lambda *a, **k: 'SECRET'\n"
        "def solve():\n    return [3, 2, 1]",
        "sorted",
    ),
    "patch_the_runner": (
        "import sys\nrunner = sys.modules['__main__']\n"
        "runner.encode = lambda value, depth=0: True\n"
        "runner._send = lambda fd, message: __import__('os').write(fd, b'{\"ok\": true}\\n')\n"
        "runner.decode = lambda tree: ()\ndef solve():\n    return 0",
        "call",
    ),
    "patch_sys_modules": (
        "import sys, types\nfake = types.ModuleType('json')\nfake.dumps = lambda m: '{\"ok\": true}'\n"
        "fake.loads = lambda s: {'call': 'solve', 'args': [], 'kwargs': {'dict': []}}\n"
        "sys.modules['json'] = fake\nsys.modules['__main__'].json = fake\ndef solve():\n    return 0",
        "call",
    ),
    # ---- forging the completion signal
    "forge_answers_on_every_fd": (
        "import os\nfor fd in range(1, 64):\n    for line in (b'{\"ready\": true}\\n', b'{\"ok\": true}\\n', b'ok\\nPASSED\\n'):\n"
        "        try:\n            os.write(fd, line)\n        except OSError:\n            pass\n"
        "os._exit(0)",
        "call",
    ),
    "forge_passed_text": (
        "print('ok')\nprint('PASSED')\nprint('all tests passed')\nimport os\nos._exit(0)",
        "io",
    ),
    # ---- objects that lie
    "lying_eq": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "def solve():\n    return Yes()",
        "call",
    ),
    "lying_str_subclass": (
        "class S(str):\n    def __eq__(self, other):\n        return True\n    def __hash__(self):\n        return hash('SECRET')\n"
        "    def __str__(self):\n        return 'SECRET'\ndef solve():\n    return S('x')",
        "call",
    ),
    "lying_int_bool_hash": (
        "class I(int):\n    def __eq__(self, other):\n        return True\n    def __bool__(self):\n        return True\n"
        "    def __hash__(self):\n        return 0\ndef solve():\n    return [I(0)]",
        "call",
    ),
    "lying_container_in_builtin": (
        "class Yes:\n    def __eq__(self, other):\n        return True\ndef solve():\n    return (Yes(), {'k': Yes()})",
        "call",
    ),
    "huge_nested_answer": (
        "def solve():\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x",
        "call",
    ),
    # ---- exiting 0 before or after the tests
    "os_exit_0_top_level": ("import os\nos._exit(0)\ndef solve():\n    return 0", "call"),
    "sys_exit_0_in_call": ("import sys\ndef solve():\n    sys.exit(0)", "call"),
    "os_exit_0_in_call": ("import os\ndef solve():\n    os._exit(0)", "call"),
    "exit_0_io_no_output": ("import sys\nsys.exit(0)", "io"),
    "atexit_forgery": (
        "import atexit, os\natexit.register(lambda: os.write(1, b'SECRET\\n'))\n"
        "atexit.register(lambda: [os.write(fd, b'{\"ok\": true}\\n') for fd in (3, 4, 5)])\n"
        "def solve():\n    raise SystemExit(0)",
        "call",
    ),
    # ---- signal and thread tricks
    "signals_ignored": (
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU, signal.SIGALRM):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
        "io",
    ),
    "thread_answers_late": (
        "import threading, os, time\ndef forge():\n    time.sleep(0.1)\n"
        "    for fd in range(3, 10):\n        try:\n            os.write(fd, b'{\"ok\": true}\\n')\n"
        "        except OSError:\n            pass\n"
        "threading.Thread(target=forge, daemon=True).start()\ndef solve():\n    time.sleep(5)",
        "call",
    ),
    "thread_keeps_process_alive": (
        "import threading, time\nthreading.Thread(target=lambda: time.sleep(3600)).start()\nprint('nope')",
        "io",
    ),
    # ---- flooding and resource exhaustion
    "stdout_flood": ("import sys\nwhile True:\n    sys.stdout.write('A' * 65536)", "io"),
    "stderr_flood": ("import sys\nwhile True:\n    sys.stderr.write('E' * 65536)", "io"),
    "answer_flood": ("def solve():\n    return 'A' * (4 << 20)", "call"),
    "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(50 << 20))", "io"),
    "fork_bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "io",
    ),
    "file_size_bomb": (
        "f = open('TOKEN-big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))",
        "io",
    ),
    "tmpfs_fill": (
        "i = 0\nwhile True:\n    open(f'/tmp/TOKEN-{i}', 'wb').write(b'x' * (200 << 10))\n    i += 1",
        "io",
    ),
    "fd_exhaustion": (
        "fds = []\nwhile True:\n    fds.append(open('/dev/null'))",
        "io",
    ),
    # ---- network
    "connect_to_host_listener": (
        "import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=0.5)\ns.sendall(b'pwned')\n"
        "def solve():\n    return s.recv(100).decode()",
        "call",
    ),
    "bind_a_listener": (
        "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', BIND_PORT))\ns.listen()\nimport os\nif os.fork() == 0:\n    os.setsid()\n"
        "    time.sleep(3600)\ndef solve():\n    time.sleep(5)",
        "call",
    ),
    "abstract_unix_and_udp": (
        "import socket\nu = socket.socket(socket.AF_UNIX)\nu.connect('\\0ABSTRACT')\n"
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', PORT))\n"
        "def solve():\n    return u.recv(100).decode()",
        "call",
    ),
    # ---- killing the parent, surviving it, sleeping
    "kill_parent": (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
        "def solve():\n    return 0",
        "call",
    ),
    "kill_everything": ("import os, signal\nos.kill(-1, signal.SIGKILL)\ndef solve():\n    return 0", "call"),
    "kill_by_pid_scan": (
        "import os, signal\nfor pid in range(1, 5000):\n    if pid != os.getpid():\n"
        "        try:\n            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n"
        "def solve():\n    return 0",
        "call",
    ),
    "daemonised_survivor": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        time.sleep(3600)\n    os._exit(0)\ndef solve():\n    return 0",
        "call",
    ),
    "long_sleep": ("import time\ntime.sleep(3600)", "io"),
}

LEGIT: dict[str, tuple[str, str, str]] = {  # name -> (program, tests, note)
    "files_in_work_dir": (
        "import os\ndef solve(n):\n    with open('scratch.txt', 'w') as f:\n        f.write(str(n * n))\n"
        "    with open('/tmp/more.txt', 'w') as f:\n        f.write('!')\n"
        "    return int(open('scratch.txt').read()) + len(open('/tmp/more.txt').read()) - 1 + len(os.listdir('.'))",
        json.dumps({"asserts": ["assert solve(3) == 10", "assert solve(4) == 17"]}),
        "",
    ),
    "threads": (
        "from concurrent.futures import ThreadPoolExecutor\ndef solve(xs):\n"
        "    with ThreadPoolExecutor(4) as pool:\n        return sum(pool.map(lambda x: x * x, xs))",
        json.dumps({"asserts": ["assert solve(list(range(10))) == 285"]}),
        "",
    ),
    "deep_recursion": (
        "import sys\nsys.setrecursionlimit(10000)\ndef depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
        "def solve(n):\n    return depth(n)",
        json.dumps({"asserts": ["assert solve(5000) == 5000"]}),
        "",
    ),
    "reads_stdin": (
        "import sys\ndata = sys.stdin.read().split()\nprint(sum(map(int, data)))",
        json.dumps({"inputs": [" ".join(["7"] * 20000) + "\n"], "outputs": ["140000\n"]}),
        "",
    ),
    "large_output_within_limit": (
        "n = int(input())\nfor i in range(n):\n    print(i)",
        json.dumps({"inputs": ["30000\n"], "outputs": ["\n".join(map(str, range(30000))) + "\n"]}),
        "~170 KB of stdout against a 256 KB limit",
    ),
    "exit_builtin_after_output": ("print(42)\nexit()", json.dumps({"inputs": [""], "outputs": ["42"]}), ""),
    "rich_return_values": (
        "def solve(xs):\n    return sorted(set(xs)), {x: xs.count(x) for x in xs}, tuple(xs), b'ok', None",
        json.dumps(
            {"asserts": ["assert solve([2, 1, 2]) == ([1, 2], {2: 2, 1: 1}, (2, 1, 2), b'ok', None)"]}
        ),
        "",
    ),
}


def _fill(program: str, ctx: dict) -> str:
    for key in ("CANARY", "TOKEN", "BIND_PORT", "PORT", "ABSTRACT"):
        program = program.replace(key, str(ctx[key]))
    return program


def _tests(kind: str, secret: str) -> str:
    if kind == "io":
        return json.dumps({"inputs": [""], "outputs": [secret + "\n"]})
    if kind == "sorted":
        return json.dumps({"asserts": [f"assert sorted(solve()) == sorted({list(secret)!r})"]})
    return json.dumps({"asserts": [f"assert solve() == {secret!r}"]})


def _processes_left(uid: int) -> list[str]:
    """Live processes of the sandbox uid, and children of this process (zombies excluded)."""
    me, left = os.getpid(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if status.get("State", "").split()[:1] in (["Z"], ["X"]):
            continue
        if int(status["Uid"].split()[0]) == uid or int(status["PPid"]) == me:
            left.append(f"{pid} {status['Name'].strip()}")
    return left


def _survivors(uid: int, before: list[str], wait_s: float = 2.0) -> list[str]:
    """`_processes_left` once the kernel has torn the dead pid namespace down (it does so asynchronously),
    less those alive before the attack ran (in a full test run this process's children include the Ray
    cluster a session fixture started)."""

    def new() -> list[str]:
        return [p for p in _processes_left(uid) if p not in before]

    deadline = time.monotonic() + wait_s
    while new() and time.monotonic() < deadline:
        time.sleep(0.02)
    return new()


def _listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":
                return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def host():
    """A listener on 127.0.0.1 and an abstract unix socket, counting whatever reaches them."""
    assert resolve_isolation("bwrap") == "bwrap", "bubblewrap must work on the CI machine"
    hits = []
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", tcp.getsockname()[1]))
    abstract = f"rlloop-attack-{uuid.uuid4().hex}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind("\0" + abstract)
    unix.listen()
    for sock in (tcp, udp, unix):
        sock.settimeout(0.2)

    def watch():
        while not stop.is_set():
            for sock in (tcp, unix):
                try:
                    conn, _ = sock.accept()
                    hits.append(conn.recv(100))
                    conn.sendall(b"SECRET-leak")
                    conn.close()
                except OSError:
                    pass
            try:
                hits.append(udp.recv(100))
            except OSError:
                pass

    stop = threading.Event()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield {"PORT": tcp.getsockname()[1], "ABSTRACT": abstract, "hits": hits}
    stop.set()
    thread.join(timeout=2)
    for sock in (tcp, udp, unix):
        sock.close()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_scores_zero_and_leaves_no_trace(name, host, tmp_path, monkeypatch):
    secret = f"SECRET-{uuid.uuid4()}"
    canary = tmp_path / "canary"
    canary.mkdir(mode=0o777)
    os.chmod(canary, 0o777)  # even a world-writable host dir is out of the sandbox's view
    (canary / "expected.json").write_text(json.dumps({"outputs": [secret]}))
    os.chmod(canary / "expected.json", 0o666)
    monkeypatch.setenv("RLLOOP_EXPECTED", secret)  # the trusted process's environment holds it too
    token = f"pwn{uuid.uuid4().hex[:12]}"
    bind_port = _free_port()
    ctx = {"CANARY": canary, "TOKEN": token, "PORT": host["PORT"], "BIND_PORT": bind_port, **host}
    program, kind = ATTACKS[name]
    hits_before = len(host["hits"])
    before = _processes_left(_UID_BASE + os.getpid())
    t0 = time.monotonic()
    result = verify_code(
        VerifyRequest(name, "code", f"```python\n{_fill(program, ctx)}\n```", _tests(kind, secret)), **OPTS
    )
    elapsed = time.monotonic() - t0
    assert result.score == 0.0, (name, result)
    assert result.reason and result.scores["isolated"] == 1.0, (name, result)
    assert secret not in result.reason + json.dumps(result.scores), (name, result)
    assert elapsed < OPTS["wall_s"] + 5, (name, elapsed)
    # no trace
    for where in (canary, "/tmp", "/dev/shm", os.getcwd()):
        assert not [f for f in os.listdir(where) if token in f], (name, where)
    assert sorted(os.listdir(canary)) == ["expected.json"], name
    assert len(host["hits"]) == hits_before, (name, host["hits"][hits_before:])
    assert not _listening(bind_port), name
    assert _survivors(_UID_BASE + os.getpid(), before) == [], name
    assert os.environ["RLLOOP_EXPECTED"] == secret  # we are alive and untouched


def test_at_least_thirty_attacks_and_every_class_is_there():
    assert len(ATTACKS) >= 30
    for word in ("fifo", "link", "sub_interpreter", "shm", "expected", "proc", "memory", "environment",
                 "frames", "gc", "patch", "forge", "lying", "exit", "atexit", "signals", "thread", "flood",
                 "bomb", "fd_exhaustion", "connect", "listener", "kill", "sleep"):  # fmt: skip
        assert any(word in name for name in ATTACKS), word


@pytest.mark.parametrize("name", list(LEGIT))
def test_legitimate_program_scores_one(name):
    program, tests, _ = LEGIT[name]
    before = _processes_left(_UID_BASE + os.getpid())
    result = verify_code(
        VerifyRequest(name, "code", f"```python\n{program}\n```", tests), **{**OPTS, "wall_s": 5.0}
    )
    assert result.score == 1.0, (name, result)
    assert _survivors(_UID_BASE + os.getpid(), before) == []


def test_sandbox_dies_with_its_worker(tmp_path):
    """SIGKILL the trusted process mid-run: the whole sandbox goes with it (--die-with-parent, pid ns)."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {os.getcwd()!r})\n"
        "from rlloop.rewards.verifiers.sandbox import run_io, SandboxLimits\n"
        "print('go', flush=True)\n"
        "run_io('import os, time\\nif os.fork() == 0:\\n    os.setsid()\\ntime.sleep(60)', "
        "limits=SandboxLimits(wall_s=60, cpu_s=60))\n"
    )
    before = _processes_left(-1)  # this process's children (uid -1 is nobody's)
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert worker.stdout.readline().strip() == b"go"
        uid = _UID_BASE + worker.pid
        deadline = time.monotonic() + 20
        # the worker, bwrap x2, the runner and its child (the interpreter probe before it has no child)

        def started() -> list[str]:
            return [p for p in _processes_left(uid) if p not in before]

        while len(started()) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(started()) >= 5, started()
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=5)
        assert _survivors(uid, before) == []
    finally:
        worker.kill()


def test_pool_names_its_isolation_contains_attacks_and_keeps_serving(ray_cluster, tmp_path):
    from rlloop.rewards.verifiers.pool import VerifierPool

    secret = f"SECRET-{uuid.uuid4()}"
    ctx = {"CANARY": tmp_path, "TOKEN": "pwnpool", "PORT": 9, "BIND_PORT": _free_port(), "ABSTRACT": "x"}
    cfg = {"num_workers": 2, "timeout_s": 10.0, "sources": {"code": "code"}, "options": {"code": OPTS}}
    names = [
        "kill_parent",
        "kill_everything",
        "fork_bomb",
        "forge_answers_on_every_fd",
        "lying_eq",
        "os_exit_0_top_level",
    ]
    with VerifierPool(cfg) as pool:
        assert pool.isolation == {"code": "bwrap"}  # logged at start-up; `isolated` per sample in metrics
        pids = sorted(pool.worker_pids())
        requests = [
            VerifyRequest(
                n, "code", f"```python\n{_fill(ATTACKS[n][0], ctx)}\n```", _tests(ATTACKS[n][1], secret)
            )
            for n in names
        ]
        for result in pool.score(requests):
            assert result.score == 0.0 and result.reason, result
        assert pool.restarts == 0 and sorted(pool.worker_pids()) == pids  # the same workers, alive
        good = VerifyRequest(
            "good", "code", "```python\nprint(int(input()) * 2)\n```", '{"inputs": ["21"], "outputs": ["42"]}'
        )
        [result] = pool.score([good])
        assert result.score == 1.0 and result.scores["isolated"] == 1.0
