"""`custom`: a user's reward function, named by dotted path in `reward.verifier.custom_fn`, used unchanged.

Two signatures are accepted (detected from the parameter names at start-up):
- verl:  `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict`
  (a dict must hold "score"; its other numeric entries are logged as named scores).
- TRL:   `reward_func(prompts, completions, **kwargs) -> list[float]`; called per sample with lists of
  length 1 and, as keyword columns, `ground_truth`, `data_source` and every key of the request's `extra`
  (only those it accepts unless it takes `**kwargs`). A `None` entry (TRL's "not applicable") scores 0.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Tuple

from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult, register_verifier, to_float

_VERL_PARAMS = ("data_source", "solution_str", "ground_truth")


def signature_style(fn: Callable, path: str) -> str:
    """'verl' or 'trl' by parameter names; ValueError naming `path` when it is neither."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward.verifier.custom_fn={path!r}: cannot read its signature ({err})") from None
    names = set(params)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "completions" in names:
        return "trl"
    if all(n in names for n in _VERL_PARAMS) and ("extra_info" in names or var_kw):
        return "verl"
    raise ValueError(
        f"reward.verifier.custom_fn={path!r} has signature {inspect.signature(fn)}; expected verl's "
        "compute_score(data_source, solution_str, ground_truth, extra_info) or TRL's "
        "f(prompts, completions, **kwargs) -> list[float]"
    )


@functools.cache
def load_custom_fn(path: str) -> Tuple[Callable, str]:
    """Import `pkg.module:function` (or `pkg.module.function`); returns (function, style)."""
    if not path or not isinstance(path, str):
        raise ValueError(f"reward.verifier.custom_fn must be 'pkg.module:function', got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward.verifier.custom_fn={path!r}: expected 'pkg.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure is the user's to see, at start-up
        raise ValueError(
            f"reward.verifier.custom_fn={path!r}: cannot import {module_name!r}: {err!r}"
        ) from err
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"reward.verifier.custom_fn={path!r}: {module_name!r} has no callable {attr!r}")
    return fn, signature_style(fn, path)


def _call_trl(fn: Callable, request: VerifyRequest) -> Any:
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    columns = {"ground_truth": request.ground_truth, "data_source": request.data_source, **request.extra}
    kwargs = {"prompts": [request.prompt], "completions": [request.solution_str]}
    kwargs.update({k: [v] for k, v in columns.items() if var_kw or k in params})
    if "prompts" not in params and not var_kw:
        del kwargs["prompts"]
    out = fn(**kwargs)
    if not isinstance(out, (list, tuple)) or len(out) != 1:
        raise ValueError(f"TRL reward function {fn.__name__} returned {out!r}; expected a list of 1 score")
    return out[0]


@register_verifier("custom")
def verify_custom(request: VerifyRequest, fn: str | None = None) -> VerifyResult:
    """Score with the user's function `fn` (a dotted path; the pool fills it from `custom_fn`)."""
    if fn is None:
        raise ValueError("the custom verifier needs reward.verifier.custom_fn='pkg.module:function'")
    func, style = load_custom_fn(fn)
    if style == "verl":
        out = func(
            data_source=request.data_source,
            solution_str=request.solution_str,
            ground_truth=request.ground_truth,
            extra_info=request.extra,
        )
    else:
        out = _call_trl(func, request)
    if out is None:
        return VerifyResult.failed(request.uid, f"{fn} returned None (not applicable)")
    if isinstance(out, dict):
        if "score" not in out:
            raise ValueError(f"{fn} returned a dict without 'score': {sorted(out)}")
        scores = {}
        for key, value in out.items():
            try:
                scores[key] = to_float(value, f"{fn}[{key!r}]")
            except ValueError:
                continue  # verl lets a dict carry non-numeric extras; only numbers are scores
        return VerifyResult(request.uid, to_float(out["score"], fn), scores)
    score = to_float(out, fn)
    return VerifyResult(request.uid, score, {"score": score})
