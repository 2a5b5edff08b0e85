"""`code`: run model-written Python against test cases in the sandbox; score = fraction of tests passed.

The program is the last ```python fenced block of the answer (else the last ``` block, else the whole
answer). The ground truth (or `extra["tests"]`) is JSON, one of:
- stdin/stdout pairs (APPS / verl style): `{"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}`;
  outputs are compared line by line, ignoring trailing whitespace and trailing blank lines.
- assert-style tests (MBPP / HumanEval style): `{"asserts": ["assert add(1, 2) == 3", ...],
  "setup": "import math"}` or a JSON list of assert strings.
- a plain (non-JSON) string: one assert-style test.

The judge stays outside the judged (sandbox.py isolates the program); every test runs the program in a
fresh sandbox. Stdin/stdout tests: the trusted side feeds stdin and compares the captured stdout; a pass
needs exit status 0 too. Assert-style tests run HERE, in the trusted process, never in the sandbox: each
name a test reads that neither the test, its setup nor Python's builtins define (`add` above) becomes a
proxy that sends its arguments into the sandbox, calls the program's function there and brings the
return value back as plain data (JSON of exact builtin types, `sandbox_runner.encode`/`decode`); the
assert then compares plain values with Python's own operators. So the program never sees a test or an
expected value, cannot patch the builtins or the harness the test uses, and an object whose `__eq__`,
`__hash__`, `__bool__` or `__str__` lies cannot leave the sandbox. Tests that need the program's objects
themselves (methods of a returned instance, mutated arguments, callbacks) are out of reach: they fail.
The setup code runs both in the sandbox (before the program, as before) and here (for the tests).
"""

from __future__ import annotations

import ast
import builtins
import json
import re
from typing import Any, Dict, List, Optional, Set, Tuple

from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult, register_verifier
from rlloop.rewards.verifiers.sandbox import (
    CallSession,
    SandboxError,
    SandboxLimits,
    resolve_isolation,
    run_io,
)

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python block, else the last fenced block, else `text` itself."""
    blocks = _FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return text


def parse_tests(spec: Any) -> Tuple[str, List[Any], str]:
    """(kind, tests, setup): kind 'io' with (stdin, expected) pairs or 'assert' with test sources."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            return "assert", [spec], ""
    if isinstance(spec, list):
        return "assert", [str(t) for t in spec], ""
    if isinstance(spec, dict):
        if "input_output" in spec:  # verl/PRIME nest it as a JSON string
            return parse_tests(spec["input_output"])
        setup = str(spec.get("setup") or spec.get("test_setup_code") or "")
        if "inputs" in spec and "outputs" in spec:
            inputs, outputs = spec["inputs"], spec["outputs"]
            if len(inputs) != len(outputs):
                raise ValueError(f"code tests: {len(inputs)} inputs but {len(outputs)} outputs")
            return "io", [(_text(i), _text(o)) for i, o in zip(inputs, outputs, strict=True)], setup
        for key in ("asserts", "test_list", "tests"):
            if key in spec:
                tests = spec[key]
                return "assert", [tests] if isinstance(tests, str) else [str(t) for t in tests], setup
    raise ValueError(f"code tests: unrecognised format {str(spec)[:120]!r}")


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value) + "\n"
    return str(value)


def outputs_match(actual: str, expected: str) -> bool:
    def norm(s: str) -> List[str]:
        lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(actual) == norm(expected)


def free_names(test: str, known: Set[str]) -> List[str]:
    """Names `test` reads but does not bind itself, and that are not in `known` or Python's builtins:
    the program's functions, which the trusted side calls in the sandbox."""
    loaded, bound = set(), set()
    for node in ast.walk(ast.parse(test)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return sorted(loaded - bound - known - set(dir(builtins)))


class _Remote:
    """A program function as the trusted test sees it: arguments out, a plain value back."""

    def __init__(self, session: CallSession, name: str) -> None:
        self._session, self._name = session, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._session.call(self._name, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<sandboxed function {self._name}>"


def run_assert_test(
    program: str, test: str, setup: Dict[str, Any], limits: SandboxLimits, isolation: str
) -> str:
    """Run one assert-style test against `program` in a fresh sandbox: "" when it passes, else why not."""
    try:
        code = compile(test, "<test>", "exec")
        remote = free_names(test, set(setup))
    except SyntaxError as err:
        return f"test does not parse: {err}"
    with CallSession(program, limits, isolation) as session:
        try:
            session.ready()  # the program's top level must run to its end first
            namespace = dict(setup)
            namespace.update({name: _Remote(session, name) for name in remote})
            exec(code, namespace)
        except SandboxError as err:
            return str(err)
        except AssertionError:
            return "assertion failed"
        except Exception as err:  # the test itself failed on what came back (e.g. a TypeError)
            return f"{type(err).__name__}: {err}"[:300]
    return ""


@register_verifier("code")
def verify_code(
    request: VerifyRequest,
    wall_s: float = 2.0,
    cpu_s: float = 2.0,
    memory_mb: int = 256,
    output_kb: int = 1024,
    max_procs: int = 16,
    max_tests: Optional[int] = None,
    stop_on_failure: bool = False,
    isolation: str = "bwrap",
    allow_unisolated: bool = False,
    tmpfs_mb: int = 16,
) -> VerifyResult:
    """scores: pass_rate (the score), passed, total, all_passed, isolated (1 under bwrap, 0 without OS
    isolation); reason: the first failure's.

    isolation: "bwrap" (default) or "none". Running unisolated, asked for or as a fallback where bwrap
    cannot run, needs `allow_unisolated=True`; without it SandboxUnavailable is raised (the worker fails
    to start): model code never runs unisolated by accident.
    """
    mode = resolve_isolation(isolation, allow_unisolated)
    limits = SandboxLimits(
        wall_s=wall_s,
        cpu_s=cpu_s,
        memory_mb=memory_mb,
        output_kb=output_kb,
        max_procs=max_procs,
        tmpfs_mb=tmpfs_mb,
    )
    spec = request.extra.get("tests", request.ground_truth)
    try:
        kind, tests, setup = parse_tests(spec)
    except ValueError as err:
        return VerifyResult.failed(request.uid, f"bad test spec for uid {request.uid}: {err}")
    if max_tests is not None:
        tests = tests[:max_tests]
    if not tests:
        return VerifyResult.failed(request.uid, "no tests")
    program = extract_code(request.solution_str)
    setup_namespace: Dict[str, Any] = {"__name__": "rlloop_test"}
    if setup:
        program = setup + "\n" + program
        if kind == "assert":
            try:
                exec(compile(setup, "<test setup>", "exec"), setup_namespace)
            except Exception as err:
                return VerifyResult.failed(request.uid, f"bad test setup for uid {request.uid}: {err!r}")
    passed, first_failure = 0, ""
    for index, test in enumerate(tests):
        if kind == "io":
            stdin, expected = test
            result = run_io(program, stdin, limits, mode)
            ok = result.completed and outputs_match(result.stdout, expected)
            why = result.reason or ("" if ok else "wrong answer")
        else:
            why = run_assert_test(program, test, setup_namespace, limits, mode)
            ok = not why
        if ok:
            passed += 1
        elif not first_failure:
            first_failure = f"test {index + 1}/{len(tests)}: {why}"
            if stop_on_failure:
                break
    total = len(tests)
    rate = passed / total
    scores = {
        "pass_rate": rate,
        "passed": float(passed),
        "total": float(total),
        "all_passed": float(passed == total),
        "isolated": float(mode == "bwrap"),
    }
    return VerifyResult(request.uid, rate, scores, first_failure)
