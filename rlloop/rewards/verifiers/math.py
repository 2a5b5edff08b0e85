"""`math`: answer equivalence with math-verify (fractions, decimals, LaTeX, sets, intervals, GSM8K `#### 72`).

The model's answer is read from its last `\\boxed{...}` (or `\\fbox{...}`); a GSM8K-style `#### 72` line is
the fallback. `extract="any"` instead lets math-verify pick the answer from anywhere in the text.
The ground truth may be a plain value ("56", "-3", "1/2", "\\frac{1}{2}"), `$...$`/`\\boxed{}`-wrapped LaTeX, or a
GSM8K solution ending in `#### 72`.
"""

from __future__ import annotations

import re

from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult, register_verifier

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_GSM8K = re.compile(r"####\s*([^\n]+)")
_INT = re.compile(r"^\s*[-+]?\d{1,50}\s*$")


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
    """Gold answers need `$...$` or `\\boxed{}` for math-verify's LaTeX parser (bare `\\sqrt{8}` parses to [])."""
    text = ground_truth.strip()
    if "####" in text:
        text = gsm8k_answer(text) or text
    if "\\boxed" in text or "\\fbox" in text or text.startswith("$"):
        return text
    return f"${text}$"


def _parse(text: str):
    from math_verify import parse

    # Timeouts off: math-verify's use SIGALRM, which the pool's per-sample time limit already owns.
    return parse(text, parsing_timeout=None)


@register_verifier("math")
def verify_math(request: VerifyRequest, extract: str = "boxed") -> VerifyResult:
    """scores: correct (0/1) and format (1 if an answer was found where `extract` looks)."""
    from math_verify import verify

    if extract not in ("boxed", "any"):
        raise ValueError(f"math verifier: extract must be 'boxed' or 'any', got {extract!r}")
    gold_text = normalize_gold(request.ground_truth)
    if extract == "boxed":
        answer = last_boxed(request.solution_str)
        if answer is None:
            answer = gsm8k_answer(request.solution_str)
        if answer is None:
            return VerifyResult(request.uid, 0.0, {"correct": 0.0, "format": 0.0}, "no \\boxed{} answer")
        gold_int = _INT.match(gold_text.strip("$"))
        if gold_int and _INT.match(answer):
            # Plain integers (the built-in arith task): exact, and 10-100x cheaper than a sympy round trip.
            correct = float(int(answer) == int(gold_int.group(0)))
            return VerifyResult(request.uid, correct, {"correct": correct, "format": 1.0})
        pred = _parse(f"$\\boxed{{{answer}}}$")
    else:
        answer = request.solution_str
        pred = _parse(answer)
    gold = _parse(gold_text)
    if not gold:
        return VerifyResult.failed(request.uid, f"ground truth {request.ground_truth!r} does not parse")
    if not pred:
        reason = f"answer {answer[:80]!r} does not parse"
        return VerifyResult(request.uid, 0.0, {"correct": 0.0, "format": 0.0}, reason)
    correct = float(verify(gold, pred, timeout_seconds=None))
    return VerifyResult(request.uid, correct, {"correct": correct, "format": 1.0})
