"""`code`: run model-written Python against test cases in the sandbox; score = fraction of tests passed.

The program is the last ```python fenced block of the answer (else the last ``` block, else the whole
answer). The ground truth (or `extra["tests"]`) is JSON, one of:
- stdin/stdout pairs (APPS / verl style): `{"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}`;
  outputs are compared line by line, ignoring trailing whitespace and trailing blank lines.
- assert-style tests (MBPP / HumanEval style): `{"asserts": ["assert add(1, 2) == 3", ...],
  "setup": "import math"}` or a JSON list of assert strings; each runs after the program, in its namespace.
- a plain (non-JSON) string: one assert-style test.
Every test is its own sandboxed process, so one test's crash or `sys.exit` cannot pass another.
"""

from __future__ import annotations

import json
import re
from typing import Any, List, Optional, Tuple

from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult, register_verifier
from rlloop.rewards.verifiers.sandbox import SandboxLimits, run_python

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
    isolate_network: bool = True,
    drop_privileges: bool = True,
) -> VerifyResult:
    """scores: pass_rate (the score), passed, total, all_passed; reason: the first failure's."""
    limits = SandboxLimits(
        wall_s=wall_s,
        cpu_s=cpu_s,
        memory_mb=memory_mb,
        output_kb=output_kb,
        max_procs=max_procs,
        isolate_network=isolate_network,
        drop_privileges=drop_privileges,
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
    if setup:
        program = setup + "\n" + program
    passed, first_failure = 0, ""
    for index, test in enumerate(tests):
        if kind == "io":
            stdin, expected = test
            result = run_python(program, stdin=stdin, limits=limits)
            ok = result.completed and outputs_match(result.stdout, expected)
            why = result.reason or ("" if ok else "wrong answer")
        else:
            result = run_python(program, test=test, limits=limits)
            ok = result.completed
            why = result.reason
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
    }
    return VerifyResult(request.uid, rate, scores, first_failure)
