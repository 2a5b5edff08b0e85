"""`format`: structure checks on the answer text; score = fraction of the configured checks passed.

Checks (option `checks`, default one_boxed + steps):
- one_boxed: exactly one `\\boxed{...}`.
- steps: at least `min_steps` non-empty reasoning steps separated by blank lines (`step_delimiter`).
- regex: `pattern` matches the whole answer (re.DOTALL), e.g. "<think>.*</think>.*".
- boxed_last: nothing but whitespace/punctuation after the last `\\boxed{...}`.
"""

from __future__ import annotations

import re
from typing import List, Optional

from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult, register_verifier
from rlloop.rewards.verifiers.math import last_boxed

_CHECKS = ("one_boxed", "steps", "regex", "boxed_last")


def _one_boxed(text: str) -> bool:
    return len(re.findall(r"\\(?:boxed|fbox)\s*\{", text)) == 1


def _boxed_last(text: str) -> bool:
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts or last_boxed(text) is None:
        return False
    depth, i = 0, text.index("{", starts[-1])
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return re.fullmatch(r"[\s.$!)\]]*", text[j + 1 :]) is not None
    return False


@register_verifier("format")
def verify_format(
    request: VerifyRequest,
    checks: Optional[List[str]] = None,
    min_steps: int = 2,
    step_delimiter: str = "\n\n",
    pattern: Optional[str] = None,
) -> VerifyResult:
    checks = list(checks or ["one_boxed", "steps"])
    unknown = sorted(set(checks) - set(_CHECKS))
    if unknown:
        raise ValueError(f"format verifier: unknown check(s) {unknown}; known: {list(_CHECKS)}")
    if "regex" in checks and not pattern:
        raise ValueError("format verifier: the 'regex' check needs option 'pattern'")
    text = request.solution_str
    results = {}
    for check in checks:
        if check == "one_boxed":
            results[check] = _one_boxed(text)
        elif check == "steps":
            steps = [s for s in text.split(step_delimiter) if s.strip()]
            results[check] = len(steps) >= min_steps
        elif check == "regex":
            results[check] = re.fullmatch(pattern, text, re.DOTALL) is not None
        elif check == "boxed_last":
            results[check] = _boxed_last(text)
    scores = {k: float(v) for k, v in results.items()}
    score = sum(scores.values()) / len(scores)
    scores["format"] = score
    failed = [k for k, v in results.items() if not v]
    return VerifyResult(request.uid, score, scores, f"failed format check(s): {failed}" if failed else "")
