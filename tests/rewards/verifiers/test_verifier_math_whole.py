"""The `math` verifier needs the whole gold: hand-built golds in prose, ASCII and LaTeX (issue 21).

Each row is (boxed answer, gold, expected): 1 / 0 for a verdict, None for an unverifiable gold (score 0,
no scores: counted in verifier/unscored_frac). The wrong answers include fragments of the gold (a number
math-verify's search finds inside it), which scored 1 before; the right answers use another notation.
"""

from __future__ import annotations

import threading
import time

import pytest

from rlloop.rewards.verifiers import VerifyRequest, get_verifier
from rlloop.rewards.verifiers.math import check_gold

UNVERIFIABLE = None
NO_PARSE = -1  # a wrong answer that is not one expression: 0 with format 0

TABLE = [
    # --- fragments of a gold must score 0; the whole value in another notation scores 1
    ("2", "\\frac{\\sqrt{2}}{2}, or equivalently \\frac{1}{\\sqrt{2}}", 0),
    ("\\frac{1}{\\sqrt2}", "\\frac{\\sqrt{2}}{2}, or equivalently \\frac{1}{\\sqrt{2}}", 1),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{2}}{2}, or equivalently \\frac{1}{\\sqrt{2}}", 1),
    ("0.5", "\\frac{1}{2}, or equivalently 0.5", 1),
    ("10", "C(10, 5)", 0),
    ("5", "C(10, 5)", 0),
    ("252", "C(10, 5)", 1),
    ("\\binom{10}{5}", "C(10,5)", 1),
    ("\\dbinom{10}{5}", "binom(10, 5)", 1),
    ("C(10, 5)", "252", 1),
    ("252", "10C5", 1),
    ("1", "sum_(k=1)^n 1/k", 0),
    ("n", "sum_(k=1)^n 1/k", 0),
    ("\\sum_{k=1}^{n} \\frac{1}{k}", "sum_(k=1)^n 1/k", 1),
    ("1", "x = 1 \\text{ or } x = 2", 0),
    ("2", "x = 1 or x = 2", 0),
    ("1, 2", "x = 1 or x = 2", 1),
    ("x=2 \\text{ or } x=1", "x = 1 or x = 2", 1),
    ("3", "3 \\text{ and } 4", 0),
    ("\\{3, 4\\}", "3 \\text{ and } 4", 1),
    ("2", "2 \\text{ or } 3", 0),
    ("2", "\\pm 2", 0),
    ("2, -2", "\\pm 2", 1),
    ("(2, \\infty)", "(-\\infty, 1) \\cup (2, \\infty)", 0),
    ("(-\\infty,1)\\cup(2,\\infty)", "(-\\infty, 1) \\cup (2, \\infty)", 1),
    ("0", "10\\,000", 0),  # latex2sympy alone reads "10\,000" as 10*0
    ("10000", "10\\,000", 1),
    ("10{,}000", "10000", 1),
    ("2", "2ab", 0),  # math-verify's unit stripping reads "ab" as a unit
    ("2ba", "2ab", 1),
    ("2", "12 \\text{ cm}^2", 0),
    ("12", "12 \\text{ cm}^2", 1),
    # --- the answer must be whole too
    ("1 \\text{ or } 2", "2", 0),
    ("2 or 1", "2", 0),
    ("2, or equivalently 3", "2", NO_PARSE),  # a model's "equivalently" is not trusted: the values differ
    ("2, or equivalently \\frac{4}{2}", "2", 1),
    ("\\frac12 \\text{ or } 0.5", "0.5", 1),  # the same value twice is one answer
    ("5 \\text{ or } 6", "5", 0),
    # --- text answers
    ("\\text{yes}", "Yes", 1),
    ("YES", "Yes", 1),
    ("\\text{No}", "Yes", 0),
    ("\\text{No solution}", "no solution", 1),
    ("0", "no solution", 0),
    ("\\text{odd}", "odd", 1),
    ("\\text{even}", "odd", 0),
    ("\\text{Devon}", "Devon", 1),
    ("\\text{Devin}", "Devon", 0),
    # --- multiple choice
    ("C", "\\text{(C)}", 1),
    ("\\textbf{(C)}", "(C)", 1),
    ("(B)", "\\text{(C)}", 0),
    ("(C)", "C", 1),
    ("B, C, D", "\\text{B, C, D}", 1),
    ("B", "\\text{B, C, D}", 0),
    ("C", "\\textbf{(C) } 12", 1),
    ("12", "\\textbf{(C) } 12", 1),
    ("\\text{(D)}", "\\textbf{(C) } 12", 0),
    ("\\textbf{(D) } 12", "12", NO_PARSE),  # letter-or-value is a gold form only: two chances otherwise
    # --- fractions, radicals, constants in ASCII and LaTeX
    ("sqrt(2)/2", "\\frac{\\sqrt{2}}{2}", 1),
    ("\\frac{\\sqrt2}{2}", "sqrt(2)/2", 1),
    ("\\sqrt{2}", "sqrt(2)/2", 0),
    ("\\sqrt{12}", "2\\sqrt{3}", 1),
    ("(x+1)^2", "x^2 + 2*x + 1", 1),
    ("(x-1)^2", "x^2 + 2*x + 1", 0),
    ("2\\pi", "2*pi", 1),
    ("6.28", "2*pi", 0),
    ("\\pi", "3.14", 0),
    ("e^{2}", "e^2", 1),
    ("n(n+1)/2", "\\frac{n(n+1)}{2}", 1),
    ("\\frac{1}{2}", "$\\frac{1}{2}$.", 1),
    # --- percent, degrees, units, currency
    ("50", "50\\%", 1),
    ("0.5", "50\\%", 1),
    ("\\frac{1}{2}", "50 percent", 1),
    ("5", "50\\%", 0),
    ("30", "30^\\circ", 1),
    ("60", "30^\\circ", 0),
    ("45^\\circ", "45 degrees", 1),
    ("5", "5 apples", 1),
    ("18.9", "\\$18.90", 1),
    ("1000", "#### 1,000", 1),
    # --- intervals, sets, tuples, matrices, equations
    ("(-\\infty, 3)", "(-\\infty, 3]", 0),
    ("(-\\infty,3]", "(-\\infty, 3]", 1),
    ("(1,-2)", "(1, -2)", 1),
    ("(-2, 1)", "(1, -2)", 0),
    ("1, 2, 3", "\\{1, 2, 3\\}", 1),
    ("1, 2", "\\{1, 2, 3\\}", 0),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 1),
    ("\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 0),
    ("3", "x = 3", 1),
    ("4", "x = 3", 0),
    # --- unverifiable golds: flagged, never scored by the number inside them
    ("5", "The answer is 5 apples", UNVERIFIABLE),
    ("5", "5 or more", UNVERIFIABLE),
    ("2", "n = 2^k for some integer k", UNVERIFIABLE),
    ("5", "\\text{the answer is } 5", UNVERIFIABLE),
    ("2", "all integers n \\ge 2", UNVERIFIABLE),
    ("1", "There are infinitely many solutions", UNVERIFIABLE),
    ("3", "1 2", UNVERIFIABLE),  # latex2sympy reads it as 1 + 2
]


@pytest.mark.parametrize("answer,gold,expected", TABLE)
def test_whole_gold(answer, gold, expected):
    result = get_verifier("math")(VerifyRequest("u", "math", f"So \\boxed{{{answer}}}.", gold))
    if expected is UNVERIFIABLE:
        assert result.score == 0.0 and result.scores == {}, result
        assert "unverifiable" in result.reason and result.info()["kind"] == "unscored"
        assert check_gold(gold).startswith("unverifiable")
    elif expected == NO_PARSE:
        assert result.score == 0.0 and result.scores == {"correct": 0.0, "format": 0.0}, result
        assert "does not parse" in result.reason
    else:
        assert result.score == float(expected), (answer, gold, result)
        assert result.scores == {"correct": float(expected), "format": 1.0}, result


def test_table_is_wide_with_both_outcomes():
    outcomes = [e for *_, e in TABLE]
    assert len(TABLE) >= 40
    assert (
        outcomes.count(1) >= 20
        and outcomes.count(0) + outcomes.count(NO_PARSE) >= 20
        and outcomes.count(UNVERIFIABLE) >= 5
    )


@pytest.mark.parametrize("gold", sorted({g for _, g, e in TABLE if e is not UNVERIFIABLE}))
def test_every_verifiable_gold_verifies_against_itself(gold):
    assert check_gold(gold) is None


def test_fragment_answers_of_the_old_bug_score_zero():
    """The issue's examples: 6 of 8 targeted answers equal to a fragment of the gold were accepted."""
    verify = get_verifier("math")
    for answer, gold in [
        ("1", "C(10, 5)"),
        ("1", "sum_(k=1)^n 1/k"),
        ("2", "2^{10}, or equivalently 1024"),
        ("10", "2^{10}, or equivalently 1024"),
        ("1", "the number of ways is 1 or 2"),
        ("2", "$\\frac{1}{2}$ of the total"),
    ]:
        assert verify(VerifyRequest("u", "m", f"\\boxed{{{answer}}}", gold)).score == 0.0, gold


def test_gold_alternative_in_prose_keeps_the_maths_one():
    verify = get_verifier("math")
    gold = "2, or equivalently the smallest prime"
    assert verify(VerifyRequest("u", "m", "\\boxed{2}", gold)).score == 1.0
    assert verify(VerifyRequest("u", "m", "\\boxed{3}", gold)).score == 0.0
    assert check_gold(gold) is None


def test_hostile_ascii_never_reaches_eval():
    verify = get_verifier("math")
    for answer in ["__import__('os').system('true')", "(1).real", "x.__class__", "lambda: 1", "[1]*10**9"]:
        result = verify(VerifyRequest("u", "m", f"\\boxed{{{answer}}}", "1"))
        assert result.score == 0.0 and "does not parse" in result.reason, answer


def test_integer_golds_stay_fast():
    verify = get_verifier("math")
    t0 = time.perf_counter()
    for i in range(2000):
        verify(VerifyRequest(str(i), "arith", f"\\boxed{{{i % 97}}}", str(i % 89)))
    assert time.perf_counter() - t0 < 2.0


def test_runs_off_the_main_thread():
    """No SIGALRM inside: the pool runs verifiers in threads and owns the time limit."""
    out = {}

    def work():
        out["r"] = get_verifier("math")(VerifyRequest("u", "m", "\\boxed{sqrt(2)/2}", "\\frac{1}{\\sqrt{2}}"))

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert out["r"].score == 1.0, out["r"]
