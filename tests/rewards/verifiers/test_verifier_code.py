"""The `code` verifier on real-looking model answers: stdin/stdout and assert-style tests."""

from __future__ import annotations

import json

import pytest

from rlloop.rewards.verifiers import VerifyRequest, get_verifier
from rlloop.rewards.verifiers.code import extract_code, outputs_match, parse_tests

verify_code = get_verifier("code")
FAST = {"wall_s": 3.0, "cpu_s": 2.0, "memory_mb": 256}

SUM_IO = json.dumps({"inputs": ["1 2\n", "10 -4\n", "0 0\n"], "outputs": ["3\n", "6\n", "0\n"]})
ADD_ASSERTS = json.dumps(
    {"asserts": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]}
)


def score(solution, tests, **opts):
    return verify_code(VerifyRequest("c", "code", solution, tests), **{**FAST, **opts})


def test_io_all_pass_with_prose_around_the_code():
    answer = (
        "We read two integers and print their sum.\n\n```python\nimport sys\n"
        "a, b = map(int, sys.stdin.read().split())\nprint(a + b)\n```\nThis runs in O(1)."
    )
    result = score(answer, SUM_IO)
    assert result.score == 1.0 and result.reason == ""
    assert result.scores == {
        "pass_rate": 1.0,
        "passed": 3.0,
        "total": 3.0,
        "all_passed": 1.0,
        "isolated": 1.0,  # bwrap works on the CI machine: never skipped, never silently unisolated
    }


def test_io_partial_credit_and_reason():
    answer = "```python\na, b = map(int, input().split())\nprint(abs(a + b))\n```"  # wrong for 10 -4? no: 6
    result = score(answer, json.dumps({"inputs": ["-5 1\n", "2 2\n"], "outputs": ["-4\n", "4\n"]}))
    assert result.score == 0.5
    assert result.reason == "test 1/2: wrong answer"


def test_io_runtime_error_is_reason():
    result = score("```python\nprint(1 // 0)\n```", json.dumps({"inputs": [""], "outputs": ["1"]}))
    assert result.score == 0.0 and "ZeroDivisionError" in result.reason


def test_io_syntax_error():
    result = score("```python\ndef f(:\n```", json.dumps({"inputs": [""], "outputs": ["1"]}))
    assert result.score == 0.0 and "SyntaxError" in result.reason


def test_io_trailing_whitespace_ignored_but_content_not():
    ok = score("```python\nprint('a  ')\nprint()\n```", json.dumps({"inputs": [""], "outputs": ["a\n"]}))
    bad = score("```python\nprint('b')\n```", json.dumps({"inputs": [""], "outputs": ["a\n"]}))
    assert ok.score == 1.0 and bad.score == 0.0


def test_assert_style_pass_and_partial():
    right = score("```python\ndef add(a, b):\n    return a + b\n```", ADD_ASSERTS)
    wrong = score("```python\ndef add(a, b):\n    return a * b if a > 0 else a + b\n```", ADD_ASSERTS)
    assert right.score == 1.0
    assert wrong.score == pytest.approx(1 / 3) and "assertion failed" in wrong.reason


def test_assert_style_mbpp_list_and_setup():
    tests = json.dumps({"test_list": ["assert area(2) == 4 * math.pi"], "test_setup_code": "import math"})
    result = score("```python\ndef area(r):\n    return math.pi * r * r\n```", tests)
    assert result.score == 1.0


def test_missing_function_is_a_fail():
    result = score("```python\ndef plus(a, b):\n    return a + b\n```", ADD_ASSERTS)
    assert result.score == 0.0 and "NameError" in result.reason


def test_sys_exit_before_asserts_is_not_a_pass():
    result = score("```python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n```", ADD_ASSERTS)
    assert result.score == 0.0 and "sys.exit" in result.reason


def test_tests_from_extra_override_ground_truth():
    req = VerifyRequest(
        "c",
        "code",
        "```python\nprint(input()[::-1])\n```",
        "",
        extra={"tests": {"inputs": ["abc\n"], "outputs": ["cba\n"]}},
    )
    assert verify_code(req, **FAST).score == 1.0


def test_bad_spec_is_reason():
    result = score("print(1)", json.dumps({"inputs": ["1"], "outputs": []}))
    assert result.score == 0.0 and "inputs" in result.reason


def test_helpers():
    assert extract_code("a\n```python\nx=1\n```\nb\n```py\nx=2\n```") == "x=2\n"
    assert extract_code("```\ny=1\n```") == "y=1\n"
    assert extract_code("z=3") == "z=3"
    assert parse_tests('["assert f()"]') == ("assert", ["assert f()"], "")
    assert parse_tests({"input_output": json.dumps({"inputs": ["1"], "outputs": ["2"]})})[0] == "io"
    assert parse_tests("assert g() == 1") == ("assert", ["assert g() == 1"], "")
    assert outputs_match("1\r\n2 \n\n", "1\n2") and not outputs_match("1\n2", "1\n3")


def test_assert_tests_compare_plain_values_outside_the_sandbox():
    """Tuples, sets, dicts with non-str keys, floats and keyword arguments cross the boundary intact."""
    program = (
        "```python\ndef stats(xs, scale=1):\n"
        "    return (min(xs) * scale, {x: str(x) for x in xs}, set(xs), sum(xs) / len(xs), float('inf'))\n```"
    )
    tests = json.dumps(
        {
            "asserts": [
                "assert stats([3, 1, 2]) == (1, {1: '1', 2: '2', 3: '3'}, {1, 2, 3}, 2.0, math.inf)",
                "assert stats([2, 4], scale=3)[0] == 6",
                "assert math.isclose(stats([1, 2])[3], 1.5)",
            ],
            "setup": "import math",
        }
    )
    assert score(program, tests).score == 1.0


def test_humaneval_style_check_function():
    tests = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\ncheck(add)\n"
    assert score("```python\ndef add(a, b):\n    return a + b\n```", tests).score == 1.0
    assert score("```python\ndef add(a, b):\n    return a - b\n```", tests).score == 0.0


def test_refuses_to_run_unisolated_without_opt_in(monkeypatch):
    from rlloop.rewards.verifiers import sandbox

    with pytest.raises(sandbox.SandboxUnavailable, match="allow_unisolated"):
        score("print(1)", ADD_ASSERTS, isolation="none")
    monkeypatch.setattr(sandbox, "_ISOLATION_CACHE", {})
    monkeypatch.setattr(sandbox, "bwrap_binary", lambda: None)  # a machine without bubblewrap
    with pytest.raises(sandbox.SandboxUnavailable, match="no bwrap binary"):
        score("print(1)", ADD_ASSERTS)
    with pytest.raises(ValueError, match="isolation"):
        score("print(1)", ADD_ASSERTS, isolation="docker")


def test_opt_in_runs_unisolated_loudly_and_says_so(monkeypatch, caplog):
    from rlloop.rewards.verifiers import sandbox

    monkeypatch.setattr(sandbox, "_ISOLATION_CACHE", {})
    monkeypatch.setattr(sandbox, "bwrap_binary", lambda: None)
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    with caplog.at_level("WARNING"):
        result = score(right, ADD_ASSERTS, allow_unisolated=True)
        io = score("```python\nprint(sum(map(int, input().split())))\n```", SUM_IO, allow_unisolated=True)
    assert result.score == 1.0 and result.scores["isolated"] == 0.0
    assert io.score == 1.0 and io.scores["isolated"] == 0.0
    assert "WITHOUT OS ISOLATION" in caplog.text
    assert sandbox.warm_up("none", allow_unisolated=True) == sandbox.UNSAFE == "none (unsafe, opted in)"
    assert sandbox.describe("bwrap") == "bwrap"
