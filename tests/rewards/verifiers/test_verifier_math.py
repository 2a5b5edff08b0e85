"""The `math` verifier on real-looking model answers (run in-process: it is a plain function)."""

from __future__ import annotations

import pytest

from rlloop.rewards.verifiers import VerifyRequest, get_verifier
from rlloop.rewards.verifiers.math import gsm8k_answer, last_boxed, normalize_gold
from rlloop.rewards.verifiers.worker import VerifierWorkerCore

# (model output, ground truth, expected correct). Written for rlloop: arithmetic (the built-in task),
# GSM8K-style, MATH-style LaTeX, fractions/decimals, sets, intervals, and near-misses that must fail.
CASES = [
    # built-in arith task: plain integer ground truths
    ("12 + 44 = 56.\n\nThe answer is \\boxed{56}.", "56", True),
    ("7 - 10 = -3\n\n\\boxed{-3}", "-3", True),
    ("7 - 10 = 3\n\n\\boxed{3}", "-3", False),
    ("First 20+5=25.\n\nThen 25*2=50.\n\n\\boxed{50}", "50", True),
    ("\\boxed{49}", "50", False),
    ("I first guessed \\boxed{12}, but rechecking gives \\boxed{13}.", "13", True),  # last box wins
    ("I first guessed \\boxed{13}, but rechecking gives \\boxed{12}.", "13", False),
    ("\\boxed{ 56 }", "56", True),
    ("\\boxed{056}", "56", True),
    ("\\boxed{56.0}", "56", True),
    ("\\boxed{5, 6}", "56", False),  # a set, not 56 ("5 6" moved to the unparsable answers)
    # GSM8K: "#### 72" in the gold solution and/or in the model output
    (
        "Natalia sold 48/2 = 24 clips in May.\n\n48+24 = 72\n\n#### 72",
        "Natalia sold ... 48+24=72.\n#### 72",
        True,
    ),
    ("She earns 12/60*50 = 10.\n\n\\boxed{10}", "Weng earns 12/60 = $0.2 per minute... #### 10", True),
    ("So he has 1,000 left.\n\n#### 1,000", "#### 1000", True),
    ("#### 71", "#### 72", False),
    # fractions and decimals
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "1/2", True),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("\\boxed{3/4}", "\\frac{3}{4}", True),
    ("\\boxed{\\frac{1}{3}}", "0.5", False),
    ("\\boxed{0.333}", "\\frac{1}{3}", False),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{-\\frac{7}{2}}", "-3.5", True),
    ("\\boxed{\\frac{7}{2}}", "-3.5", False),
    # LaTeX expressions
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{8}", False),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{x^2+1}", "(x+1)^2", False),
    ("\\boxed{\\pi}", "\\pi", True),
    ("\\boxed{3.14}", "\\pi", False),
    ("\\boxed{10^{3}}", "1000", True),
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    # sets and intervals
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", True),
    ("\\boxed{\\{1,2,3\\}}", "\\{1,2\\}", False),
    ("\\boxed{(1,2]}", "(1,2]", True),
    ("\\boxed{[1,2)}", "(1,2]", False),
    ("\\boxed{(-\\infty, 0)}", "(-\\infty,0)", True),
    ("\\boxed{(0, \\infty)}", "(-\\infty,0)", False),
    # tuples / multiple answers
    ("\\boxed{(2, 3)}", "(2,3)", True),
    ("\\boxed{(3, 2)}", "(2,3)", False),
    # the answer is inside nested braces
    ("\\boxed{\\frac{1}{\\sqrt{4}}}", "0.5", True),
]


@pytest.mark.parametrize("solution,gold,expected", CASES)
def test_math_equivalence(solution, gold, expected):
    result = get_verifier("math")(VerifyRequest("u1", "math", solution, gold))
    assert result.uid == "u1"
    assert result.score == float(expected), (solution, gold, result)
    assert result.scores["correct"] == float(expected)
    assert result.scores["format"] == 1.0
    assert result.reason == ""


def test_at_least_40_cases_with_both_outcomes():
    assert len(CASES) >= 40
    assert sum(e for *_, e in CASES) >= 15 and sum(not e for *_, e in CASES) >= 15


@pytest.mark.parametrize(
    "solution,reason",
    [
        ("The answer is 56.", "no \\boxed{} answer"),  # boxed is the default extraction
        ("", "no \\boxed{} answer"),
        ("\\boxed{}", "does not parse"),
        ("\\boxed{\\frac{1}{2}", "no \\boxed{} answer"),  # unbalanced braces
        # not one expression (latex2sympy alone reads it as 5 + 6 = 11); was a CASES row with format 1
        ("\\boxed{5 6}", "does not parse"),
    ],
)
def test_unparsable_answers_score_zero_with_reason(solution, reason):
    result = get_verifier("math")(VerifyRequest("u", "math", solution, "56"))
    assert result.score == 0.0 and result.scores["format"] == 0.0
    assert reason in result.reason


def test_extract_any_reads_unboxed_answers():
    verify = get_verifier("math")
    assert verify(VerifyRequest("u", "m", "I think it's 42", "42"), extract="any").score == 1.0
    assert verify(VerifyRequest("u", "m", "I think it's 41", "42"), extract="any").score == 0.0
    with pytest.raises(ValueError, match="extract"):
        verify(VerifyRequest("u", "m", "\\boxed{1}", "1"), extract="first")


def test_bad_ground_truth_is_a_reason_not_a_crash():
    result = get_verifier("math")(VerifyRequest("u", "m", "\\boxed{1}", ""))
    assert result.score == 0.0 and "ground truth" in result.reason


def test_helpers():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed 7 apples") == "7"
    assert last_boxed("no box") is None
    assert gsm8k_answer("blah\n#### 1,234.") == "1234"
    # the gold itself, unwrapped: wrapping it in $...$ made a prose gold's words products of letters
    assert normalize_gold("56") == "56"
    assert normalize_gold("\\boxed{2}") == "2"
    assert normalize_gold("$\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert normalize_gold("text #### 72") == "72"


def test_worker_core_times_out_a_slow_sample():
    """The per-sample limit interrupts a verifier and records 0 with reason 'timeout' (worker survives)."""
    import time

    from rlloop.rewards.verifiers.base import VerifyResult, register_verifier

    @register_verifier("test_slow")
    def slow(request):
        time.sleep(5)
        return VerifyResult(request.uid, 1.0)

    core = VerifierWorkerCore(sources={"slow": "test_slow", "*": "math"}, timeout_s=0.3)
    t0 = time.monotonic()
    result = core.verify(VerifyRequest("s1", "slow", "", ""))
    assert time.monotonic() - t0 < 2
    assert result.score == 0.0 and result.reason.startswith("timeout")
    assert core.verify(VerifyRequest("m1", "arith", "\\boxed{4}", "4")).score == 1.0  # still serving


def test_worker_core_records_unrouted_source():
    core = VerifierWorkerCore(sources={"arith": "math"}, timeout_s=5)
    result = core.verify(VerifyRequest("x", "nope", "\\boxed{1}", "1"))
    assert result.score == 0.0 and "'nope'" in result.reason


@pytest.mark.parametrize(
    "answer,gold",
    [("56", "56"), ("-3", "-3"), ("3", "-3"), ("007", "7"), ("+5", "5"), ("-0", "0"), ("12", "21")],
)
def test_integer_fast_path_agrees_with_math_verify(answer, gold):
    from math_verify import parse, verify

    fast = get_verifier("math")(VerifyRequest("i", "arith", f"\\boxed{{{answer}}}", gold)).score
    slow = float(verify(parse(f"${gold}$"), parse(f"$\\boxed{{{answer}}}$")))
    assert fast == slow
