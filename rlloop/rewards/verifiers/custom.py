"""`custom`: a user's reward function, named in `reward.verifier.custom_fn`, used unchanged.

Where it lives: `pkg.module:function` (importable; `pkg.module.function` also works) or
`/path/to/file.py:function` (loaded from the file, as verl and OpenRLHF do; a relative path is taken from
the directory the run starts in).

Three signatures, detected from the parameter names at start-up (or forced with
`reward.verifier.custom_style=verl|trl|openrlhf`); `async def` functions of each are awaited:
- verl:  `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict`, one
  call per sample. `extra_info` is the row's `extra_info` column when it has one (verl's layout), else
  all the row's other columns. A dict must hold "score"; its other numeric entries are logged as scores.
- TRL:   `reward_func(prompts, completions, **kwargs) -> list[float | None]`, one call per batch (the
  chunk of up to 16 samples a verifier worker receives). For a chat prompt, `prompts` holds its messages
  and each completion is `[{"role": "assistant", "content": text}]`; for a text prompt both are strings.
  The keyword columns are `ground_truth`, `data_source` and every other column of the row, as lists
  (only those it accepts unless it takes `**kwargs`). A `None` entry (TRL's "not applicable") scores 0
  and is recorded as unscored.
- OpenRLHF: `reward_func(queries, prompts, labels) -> list | tensor | dict`, one call per batch;
  `queries` are prompt + completion as the model saw them, `prompts` the rendered prompts, `labels` the
  gold answers. A dict gives the reward under "rewards" and per-sample logs under "extra_logs".
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult, register_verifier, to_float

STYLES = ("auto", "verl", "trl", "openrlhf")
BATCHED_STYLES = ("trl", "openrlhf")
_VERL_PARAMS = ("data_source", "solution_str", "ground_truth")
_OPENRLHF_PARAMS = ("queries", "prompts", "labels")


def signature_style(fn: Callable, path: str) -> str:
    """'verl', 'trl' or 'openrlhf' by parameter names; ValueError naming `path` when it is none."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward.verifier.custom_fn={path!r}: cannot read its signature ({err})") from None
    names = set(params)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "completions" in names:
        return "trl"
    if all(n in names for n in _OPENRLHF_PARAMS):
        return "openrlhf"
    if all(n in names for n in _VERL_PARAMS) and ("extra_info" in names or var_kw):
        return "verl"
    raise ValueError(
        f"reward.verifier.custom_fn={path!r} has signature {inspect.signature(fn)}; expected verl's "
        "compute_score(data_source, solution_str, ground_truth, extra_info), TRL's "
        "f(prompts, completions, **kwargs) -> list[float] or OpenRLHF's reward_func(queries, prompts, "
        "labels) (or set reward.verifier.custom_style)"
    )


def _split(path: str) -> Tuple[str, str]:
    """(module or file, function) of a custom_fn spec."""
    where, sep, attr = path.rpartition(":")
    if not sep:
        where, _, attr = path.rpartition(".")
    return where, attr


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def absolute_custom_fn(path: Optional[str]) -> Optional[str]:
    """`path` with a relative file made absolute (workers may start in another directory)."""
    if not path or not isinstance(path, str):
        return path
    where, attr = _split(path)
    if where and _is_file(where):
        return f"{Path(where).expanduser().resolve()}:{attr}"
    return path


def _load_file(where: str, path: str) -> Any:
    file = Path(where).expanduser().resolve()
    if not file.is_file():
        raise ValueError(f"reward.verifier.custom_fn={path!r}: no such file {str(file)!r}")
    # one module per file, under a name its path fixes (two files named reward.py do not collide)
    name = "rlloop_custom_reward_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward.verifier.custom_fn={path!r}: {str(file)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # any import-time failure is the user's to see, at start-up
        del sys.modules[name]
        raise ValueError(f"reward.verifier.custom_fn={path!r}: cannot load {str(file)!r}: {err!r}") from err
    return module


@functools.cache
def load_custom_fn(path: str, style: str = "auto") -> Tuple[Callable, str]:
    """Import `pkg.module:function` or load `/path/file.py:function`; returns (function, style).

    style: "auto" detects it from the signature; "verl", "trl" or "openrlhf" is taken as given.
    """
    if not path or not isinstance(path, str):
        raise ValueError(
            f"reward.verifier.custom_fn must be 'pkg.module:function' or '/path/file.py:function', got {path!r}"
        )
    if style not in STYLES:
        raise ValueError(f"reward.verifier.custom_style={style!r}: must be one of {list(STYLES)}")
    where, attr = _split(path)
    if not where or not attr:
        raise ValueError(
            f"reward.verifier.custom_fn={path!r}: expected 'pkg.module:function' or 'file.py:function'"
        )
    if _is_file(where):
        module = _load_file(where, path)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:  # any import-time failure is the user's to see, at start-up
            raise ValueError(f"reward.verifier.custom_fn={path!r}: cannot import {where!r}: {err!r}") from err
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"reward.verifier.custom_fn={path!r}: {where!r} has no callable {attr!r}")
    return fn, signature_style(fn, path) if style == "auto" else style


def _awaited(out: Any) -> Any:
    """The value of an async reward function's coroutine (a sync function's value unchanged)."""
    if not inspect.isawaitable(out):
        return out

    async def wait() -> Any:
        return await out

    return asyncio.run(wait())


def _verl_extra_info(request: VerifyRequest) -> Any:
    # verl's layout keeps it in its own column; other layouts hand over the row's columns
    return request.extra["extra_info"] if "extra_info" in request.extra else request.extra


def _call_trl(fn: Callable, requests: List[VerifyRequest]) -> List[Any]:
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    chat = [isinstance(r.raw_prompt, list) for r in requests]
    kwargs: Dict[str, Any] = {
        "prompts": [r.prompt if r.raw_prompt is None else r.raw_prompt for r in requests],
        "completions": [
            [{"role": "assistant", "content": r.solution_str}] if is_chat else r.solution_str
            for r, is_chat in zip(requests, chat)
        ],
    }
    columns = ["ground_truth", "data_source"]
    for r in requests:  # the union of the rows' columns, in first-seen order; a row without one gets None
        columns += [k for k in r.extra if k not in columns]
    for key in columns:
        if key not in kwargs and (var_kw or key in params):
            kwargs[key] = [
                {"ground_truth": r.ground_truth, "data_source": r.data_source, **r.extra}.get(key)
                for r in requests
            ]
    if "prompts" not in params and not var_kw:
        del kwargs["prompts"]
    out = _awaited(fn(**kwargs))
    if not isinstance(out, (list, tuple)) or len(out) != len(requests):
        raise ValueError(
            f"TRL reward function {fn.__name__} returned {out!r}; expected a list of {len(requests)} scores"
        )
    return list(out)


def _per_sample(value: Any, n: int, what: str) -> List[Any]:
    if hasattr(value, "tolist"):  # a tensor or array
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{what} is {value!r}; expected {n} values, one per sample")
    return list(value)


def _call_openrlhf(fn: Callable, requests: List[VerifyRequest]) -> List[Any]:
    out = _awaited(
        fn(
            queries=[r.prompt + r.solution_str for r in requests],
            prompts=[r.prompt for r in requests],
            labels=[r.ground_truth for r in requests],
        )
    )
    name = f"OpenRLHF reward function {fn.__name__}"
    if not isinstance(out, dict):
        return _per_sample(out, len(requests), f"{name}'s return value")
    if "rewards" not in out:
        raise ValueError(f"{name} returned a dict without 'rewards': {sorted(out)}")
    rewards = _per_sample(out["rewards"], len(requests), f"{name}'s 'rewards'")
    logs = {
        key: _per_sample(value, len(requests), f"{name}'s extra_logs[{key!r}]")
        for key, value in (out.get("extra_logs") or {}).items()
    }
    # per sample, as a verl-style dict: the reward under "score", each log under its own name
    return [{"score": r, **{k: v[i] for k, v in logs.items()}} for i, r in enumerate(rewards)]


def _to_result(uid: str, out: Any, fn: str) -> VerifyResult:
    if out is None:
        return VerifyResult.failed(uid, f"{fn} returned None (not applicable)")
    if isinstance(out, dict):
        if "score" not in out:
            raise ValueError(f"{fn} returned a dict without 'score': {sorted(out)}")
        scores = {}
        for key, value in out.items():
            try:
                scores[key] = to_float(value, f"{fn}[{key!r}]")
            except ValueError:
                continue  # verl lets a dict carry non-numeric extras; only numbers are scores
        return VerifyResult(uid, to_float(out["score"], fn), scores)
    score = to_float(out, fn)
    return VerifyResult(uid, score, {"score": score})


def verify_custom_batch(
    requests: List[VerifyRequest], fn: Optional[str] = None, style: str = "auto"
) -> Optional[List[VerifyResult]]:
    """One call of a batched (TRL or OpenRLHF) function for all `requests`, in order; None for a verl
    function (called per sample). Any error is the whole batch's: the worker then scores it per sample."""
    if fn is None:
        raise ValueError("the custom verifier needs reward.verifier.custom_fn='pkg.module:function'")
    func, style = load_custom_fn(fn, style)
    if style not in BATCHED_STYLES:
        return None
    outs = _call_trl(func, requests) if style == "trl" else _call_openrlhf(func, requests)
    return [_to_result(r.uid, out, fn) for r, out in zip(requests, outs)]


@register_verifier("custom")
def verify_custom(request: VerifyRequest, fn: Optional[str] = None, style: str = "auto") -> VerifyResult:
    """Score one sample with the user's function `fn` (the pool fills it from `custom_fn`, and `style`
    from `custom_style`); a batched function gets a batch of one."""
    if fn is None:
        raise ValueError("the custom verifier needs reward.verifier.custom_fn='pkg.module:function'")
    func, style = load_custom_fn(fn, style)
    if style == "verl":
        out = _awaited(
            func(
                data_source=request.data_source,
                solution_str=request.solution_str,
                ground_truth=request.ground_truth,
                extra_info=_verl_extra_info(request),
            )
        )
    elif style == "trl":
        out = _call_trl(func, [request])[0]
    else:
        out = _call_openrlhf(func, [request])[0]
    return _to_result(request.uid, out, fn)


verify_custom.verify_batch = verify_custom_batch  # type: ignore[attr-defined]  (the worker's batched path)
