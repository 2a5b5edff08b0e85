"""Runs INSIDE the sandbox, as a script: `python -I -S -B sandbox_runner.py MODE PROGRAM LIMITS [REQ RESP]`.

The trusted side (sandbox.py) imports this module too, for `encode`/`decode`: the one value format both
sides speak. Stdlib only; nothing in this process is secret (no tests, no expected outputs, no token), so
the untrusted program may read or patch all of it: whatever it sends back is only its own answer, decoded
and compared by the trusted side.

MODE "io": set the rlimits, run the program as `__main__`; it reads stdin and writes stdout itself.
MODE "call": set the rlimits, run the program, send {"ready": true} on fd RESP, then answer each request
line {"call": NAME, "args": [...], "kwargs": {...}} read from fd REQ with {"ok": VALUE} or {"error": TEXT}.
"""

import json
import math
import os
import resource
import sys

# Values cross the boundary as JSON, with builtin containers JSON lacks tagged by a one-key object.
# Decoding builds only exact builtin types, so an object with a lying __eq__, __hash__, __bool__ or
# __str__ cannot reach the comparison: it fails to encode here, or arrives as plain data.
_TAGS = ("tuple", "set", "frozenset", "dict", "bytes", "complex", "float")


def encode(value, depth=0):
    """A JSON-able tree for `value`, built from exact builtin types only; TypeError otherwise."""
    if depth > 100:
        raise TypeError("value nested deeper than 100 levels")
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return value
    if kind is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind is tuple or kind is set or kind is frozenset:
        items = [encode(v, depth + 1) for v in value]
        return {kind.__name__: items}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [encode(value.real), encode(value.imag)]}
    raise TypeError(f"a {kind.__name__} cannot be sent out of the sandbox (only builtin data types)")


def decode(tree):
    """The value `encode` made; ValueError for anything else (the trusted side's parser of answers)."""
    if tree is None or type(tree) in (bool, int, str):
        return tree
    if type(tree) is float:
        return tree
    if type(tree) is list:
        return [decode(v) for v in tree]
    if type(tree) is dict and len(tree) == 1:
        ((tag, body),) = tree.items()
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag in ("tuple", "set", "frozenset") and type(body) is list:
            items = [decode(v) for v in body]
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict" and type(body) is list:
            out = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("malformed dict entry")
                out[decode(pair[0])] = decode(pair[1])
            return out
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2:
            return complex(decode(body[0]), decode(body[1]))
    raise ValueError(f"not an encoded value: {str(tree)[:80]!r}")


def _set_limits(limits):
    cpu = math.ceil(limits["cpu_s"])
    for which, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU, then SIGKILL a second later
        (resource.RLIMIT_AS, (limits["memory_mb"] << 20,) * 2),
        (resource.RLIMIT_FSIZE, (limits["fsize_kb"] << 10,) * 2),
        (resource.RLIMIT_NPROC, (limits["nproc"],) * 2),
        (resource.RLIMIT_NOFILE, (limits["nofile"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(which, value)


def _send(fd, message):
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def _serve(namespace, req_fd, resp_fd):
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = os.read(req_fd, 65536)
            if not chunk:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        request = json.loads(line)
        try:
            fn = namespace[request["call"]]
        except KeyError:
            _send(resp_fd, {"error": f"NameError: name {request['call']!r} is not defined"})
            continue
        try:
            args = decode(request["args"])
            kwargs = decode(request["kwargs"])
            answer = {"ok": encode(fn(*args, **kwargs))}
        except SystemExit as err:
            answer = {"error": f"SystemExit({err.code!r}) inside {request['call']}()"}
        except BaseException as err:  # the program's own failure; reported, judged outside
            answer = {"error": f"{type(err).__name__}: {err}"[:500]}
        _send(resp_fd, answer)


def main():
    mode, program_path, limits, *fds = sys.argv[1:]
    _set_limits(json.loads(limits))
    with open(program_path, "rb") as f:
        program = f.read()
    sys.argv = ["main.py"]
    import builtins

    builtins.exit = builtins.quit = sys.exit  # `-S` skips site, which defines them; programs use them
    namespace = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
    if mode == "io":
        exec(compile(program, "main.py", "exec"), namespace)
        return
    req_fd, resp_fd = int(fds[0]), int(fds[1])
    try:
        exec(compile(program, "main.py", "exec"), namespace)
    except SystemExit as err:
        _send(resp_fd, {"error": f"the program called sys.exit({err.code!r}) before the tests ran"})
        raise
    except BaseException as err:
        _send(resp_fd, {"error": f"{type(err).__name__}: {err}"[:500]})
        raise
    _send(resp_fd, {"ready": True})
    _serve(namespace, req_fd, resp_fd)


if __name__ == "__main__":
    main()
