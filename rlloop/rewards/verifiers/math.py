"""`math`: answer equivalence with math-verify (fractions, decimals, LaTeX, sets, intervals, GSM8K `#### 72`).

The model's answer is read from its last `\\boxed{...}` (or `\\fbox{...}`); a GSM8K-style `#### 72` line is
the fallback. `extract="any"` instead lets math-verify pick the answer from anywhere in the text.

The gold counts only as a whole (rlloop.rewards.verifiers.math_parse): LaTeX with or without `$...$` or
`\\boxed{}`, plain numbers and ASCII maths (`C(10, 5)`, `sqrt(2)/2`, `sum_(k=1)^n 1/k`), short text answers
("Yes", "no solution", "(C)"), or a GSM8K solution ending in `#### 72`. A gold no parser covers entirely is
*unverifiable*: every sample of it gets `VerifyResult.failed` (score 0, counted in verifier/unscored_frac),
never a verdict against a fragment of it. A boxed answer must likewise parse as a whole.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, List, Optional

from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult, register_verifier
from rlloop.rewards.verifiers.math_parse import clean, matches, parse_whole

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_GSM8K = re.compile(r"####\s*([^\n]+)")
_INT = re.compile(r"^\s*[-+]?\d{1,50}\s*$")


def boxed_starts(text: str) -> list[int]:
    """Where each `\\boxed` / `\\fbox` answer marker of `text` starts (character offsets, in order)."""
    return [m.start() for m in _BOXED.finditer(text)]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (braces balanced), or None if there is none."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        i = match.end()
        if i < len(text) and text[i] == "{":
            depth, start = 0, i + 1
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start:j].strip()
            continue  # unbalanced: try an earlier one
        # "\boxed 5": a single token
        token = re.match(r"[^\s$]+", text[i:])
        if token:
            return token.group(0)
    return None


def gsm8k_answer(text: str) -> str | None:
    """The value after the last `####` (commas and a trailing period dropped), or None."""
    found = _GSM8K.findall(text)
    if not found:
        return None
    return found[-1].strip().replace(",", "").rstrip(".").strip() or None


def normalize_gold(ground_truth: str) -> str:
    """The gold answer itself: a GSM8K solution's `####` value; outer `$...$`/`\\boxed{}` and a trailing
    period removed. (Not wrapped in `$...$`: that made the words of a prose gold products of letters.)"""
    text = ground_truth.strip()
    if "####" in text:
        text = gsm8k_answer(text) or text
    return clean(text)


@lru_cache(maxsize=8192)
def parse_gold(ground_truth: str) -> tuple:
    """Candidate values of a gold answer, each covering it whole (or one listed alternative); () when
    the gold is unverifiable. Cached: a data set repeats each gold once per sample of its prompt."""
    return tuple(parse_whole(normalize_gold(ground_truth), gold=True))


def _unverifiable(request: VerifyRequest) -> VerifyResult:
    return VerifyResult.failed(
        request.uid,
        f"ground truth {request.ground_truth[:120]!r} is unverifiable: no parse covers all of it "
        "(run `python -m rlloop.check_data` on the data set)",
    )


@register_verifier("math")
def verify_math(request: VerifyRequest, extract: str = "boxed") -> VerifyResult:
    """scores: correct (0/1) and format (1 if an answer was found where `extract` looks and parses)."""
    if extract not in ("boxed", "any"):
        raise ValueError(f"math verifier: extract must be 'boxed' or 'any', got {extract!r}")
    gold_core = normalize_gold(request.ground_truth)
    if extract == "boxed":
        answer = last_boxed(request.solution_str)
        if answer is None:
            answer = gsm8k_answer(request.solution_str)
        if answer is None:
            return VerifyResult(request.uid, 0.0, {"correct": 0.0, "format": 0.0}, "no \\boxed{} answer")
        if _INT.match(gold_core) and _INT.match(answer):
            # Plain integers (the built-in arith task): exact, and 10-100x cheaper than a sympy round trip.
            correct = float(int(answer) == int(gold_core))
            return VerifyResult(request.uid, correct, {"correct": correct, "format": 1.0})
        gold = parse_gold(request.ground_truth)
        if not gold:
            return _unverifiable(request)
        pred: List[Any] = parse_whole(answer, gold=False)
    else:
        gold = parse_gold(request.ground_truth)
        if not gold:
            return _unverifiable(request)
        answer = request.solution_str
        pred = _search(answer)
    if not pred:
        reason = f"answer {answer[:80]!r} does not parse"
        return VerifyResult(request.uid, 0.0, {"correct": 0.0, "format": 0.0}, reason)
    correct = float(matches(list(gold), pred))
    return VerifyResult(request.uid, correct, {"correct": correct, "format": 1.0})


def _search(text: str) -> List[Any]:
    """extract="any": math-verify finds the answer anywhere in free text (its purpose: a fragment of the
    *response* is what is wanted here)."""
    from math_verify import parse

    # Timeouts off: math-verify's use SIGALRM, which the pool's per-sample time limit already owns.
    return [p for p in parse(text, parsing_timeout=None) if not isinstance(p, str)]


def check_gold(ground_truth: str, self_check: bool = True) -> Optional[str]:
    """Why `ground_truth` cannot serve as a gold answer, or None: unverifiable (no parse covers it), or
    (self_check) one of its alternatives, boxed as a model would write it, does not score 1 against it."""
    core = normalize_gold(ground_truth)
    if _INT.match(core):
        return None
    if not parse_gold(ground_truth):
        return "unverifiable: no parse covers the whole answer (prose, or notation the parsers do not read)"
    if not self_check:
        return None
    from rlloop.rewards.verifiers.math_parse import EXPLICIT_ALTERNATIVES, split_top

    for part in split_top(core, EXPLICIT_ALTERNATIVES) or [core]:
        if not parse_whole(part, gold=False):
            continue  # an alternative in prose: the gold's other alternatives carry it
        result = verify_math(VerifyRequest("check", "math", f"\\boxed{{{part}}}", ground_truth))
        if result.score != 1.0:
            return f"does not verify against itself: the answer \\boxed{{{part}}} scores {result.score:g}"
    return None


# rlloop.data.check finds a verifier's gold check here (verifiers without one are not checked)
verify_math.check_gold = check_gold  # type: ignore[attr-defined]
