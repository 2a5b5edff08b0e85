"""What every verifier shares: the request/result records and the registry.

A verifier is a plain function `verify(request: VerifyRequest, **options) -> VerifyResult`, registered by
name with `@register_verifier("name")`. The pool routes each request to a verifier by its `data_source`
(config `reward.verifier.sources`) and passes `reward.verifier.options[name]` as keyword options, so a
verifier's keyword parameters are its config schema (unknown keys fail at start-up).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Union

VerifierFn = Callable[..., "VerifyResult"]


@dataclass
class VerifyRequest:
    """One sample to score. `extra` carries the data row's other columns (`Sample.extra`: verl's
    `extra_info`, TRL's dataset columns); `prompt` is the prompt as rendered for the model, `raw_prompt`
    the data set's own (text or chat messages; None when unknown)."""

    uid: str
    data_source: str
    solution_str: str
    ground_truth: str
    prompt: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)
    raw_prompt: Union[str, List[Dict[str, str]], None] = None


@dataclass
class VerifyResult:
    """The outcome for one sample.

    score: the reward (built-in verifiers give [0, 1]; a custom function's value is passed through).
    scores: every named score the verifier produced (all logged), e.g. {"correct": 1.0, "format": 1.0}.
    reason: "" when the check ran normally; otherwise why the score is 0 (unparsable, timeout, crash...).
    """

    uid: str
    score: float
    scores: Dict[str, float] = field(default_factory=dict)
    reason: str = ""

    @classmethod
    def failed(cls, uid: str, reason: str) -> VerifyResult:
        """The verifier could not judge the sample (timeout, crash, a ground truth that does not parse)."""
        return cls(uid=uid, score=0.0, scores={}, reason=reason)

    def info(self) -> Dict[str, str]:
        """`Rollout.outcome_info`: {} for a plain verdict; else the reason and its kind, "rejected" (judged
        0 for a reason of the sample's own: no answer found, an answer that does not parse, a failed test)
        or "unscored" (no scores: `failed`)."""
        if not self.reason:
            return {}
        return {"reason": self.reason, "kind": "rejected" if self.scores else "unscored"}


_REGISTRY: Dict[str, VerifierFn] = {}


def register_verifier(name: str) -> Callable[[VerifierFn], VerifierFn]:
    """Decorator: make `fn(request, **options) -> VerifyResult` available to the pool as `name`."""

    def decorator(fn: VerifierFn) -> VerifierFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"verifier {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_verifier(name: str) -> VerifierFn:
    """The verifier registered as `name`; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"no verifier named {name!r}; registered: {sorted(_REGISTRY)}") from None


def list_verifiers() -> list[str]:
    return sorted(_REGISTRY)


def check_options(name: str, options: Dict[str, Any]) -> None:
    """Fail fast when `reward.verifier.options[name]` has a key the verifier does not take."""
    params = inspect.signature(get_verifier(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in list(params)[1:] if params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"reward.verifier.options.{name}: unknown option(s) {unknown}; {name!r} takes {allowed}"
        )


def to_float(value: Any, what: str) -> float:
    """A finite float from a verifier's return value, or ValueError naming `what`."""
    if isinstance(value, bool):
        return float(value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} returned {value!r} ({type(value).__name__}), not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{what} returned a non-finite score {out!r}")
    return out
