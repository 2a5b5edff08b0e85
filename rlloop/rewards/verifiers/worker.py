"""The plain class a verifier worker process runs (the pool wraps it in a Ray actor; tests use it bare).

Every sample runs under the per-sample time limit; any exception becomes a 0 with its reason, so one bad
sample never takes the worker down. Only a hang the time limit cannot interrupt, or a crash of the whole
process, is left to the pool (which replaces the worker).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, Dict, List, Mapping, Optional

from rlloop.distributed.actor import ActorCore
from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult, check_options, get_verifier
from rlloop.rewards.verifiers.timeouts import SampleTimeout, time_limit

logger = logging.getLogger(__name__)


def route(sources: Mapping[str, str], data_source: str) -> str:
    """The verifier name for `data_source` ("*" is the fallback); ValueError naming it when unmapped."""
    name = sources.get(data_source, sources.get("*"))
    if name is None:
        raise ValueError(
            f"data_source {data_source!r} has no verifier: add it to reward.verifier.sources "
            f"(mapped: {sorted(sources)}) or set a '*' fallback"
        )
    return name


def verifier_options(
    name: str, options: Mapping[str, Any], custom_fn: Optional[str], custom_style: str = "auto"
) -> Dict[str, Any]:
    """`reward.verifier.options[name]`, with custom_fn/custom_style as the custom verifier's fn/style."""
    opts = dict(options.get(name) or {})
    if name == "custom":
        if custom_fn and "fn" not in opts:
            opts["fn"] = custom_fn
        if custom_style and custom_style != "auto" and "style" not in opts:
            opts["style"] = custom_style
    return opts


def import_plugins(modules: List[str]) -> None:
    """Import modules that register extra verifiers (`reward.verifier.plugins`); ValueError naming one."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:
            raise ValueError(f"reward.verifier.plugins: cannot import {module!r}: {err!r}") from err


class VerifierWorkerCore(ActorCore):
    """Scores requests one by one; `verify_many` is the unit of work the pool sends."""

    @classmethod
    def from_config(cls, verifier_cfg: Any) -> VerifierWorkerCore:
        """An in-process worker from `reward.verifier` (what `rlloop eval` and `verify-reward` score with)."""
        from rlloop.config import to_dict
        from rlloop.rewards.verifiers.custom import absolute_custom_fn

        v = to_dict(verifier_cfg)
        return cls(
            sources=v.get("sources") or {},
            options=v.get("options") or {},
            custom_fn=absolute_custom_fn(v.get("custom_fn")),
            timeout_s=float(v.get("timeout_s", 10.0)),
            plugins=list(v.get("plugins") or []),
            custom_style=v.get("custom_style") or "auto",
        )

    def __init__(
        self,
        sources: Mapping[str, str],
        options: Mapping[str, Mapping[str, Any]] | None = None,
        custom_fn: Optional[str] = None,
        timeout_s: float = 10.0,
        plugins: Optional[List[str]] = None,
        sys_path: Optional[List[str]] = None,
        custom_style: str = "auto",
    ) -> None:
        # The driver's sys.path, so a user's custom_fn/plugin module imports here as it did there.
        for entry in reversed(sys_path or []):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        from rlloop.rewards.verifiers import code, custom, format, math  # noqa: F401  (registers the built-ins)

        import_plugins(list(plugins or []))
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning
        self.sources = dict(sources)
        self.options = {k: dict(v or {}) for k, v in (options or {}).items()}
        self.custom_fn = custom_fn
        self.timeout_s = timeout_s
        self._fns = {}
        for name in set(self.sources.values()):
            opts = verifier_options(name, self.options, custom_fn, custom_style)
            check_options(name, opts)
            self._fns[name] = (get_verifier(name), opts)
        self.isolation: Dict[str, str] = {}
        if "code" in self._fns:
            # Refuses (SandboxUnavailable) when bwrap cannot run here and the user did not opt out of it.
            from rlloop.rewards.verifiers.sandbox import warm_up

            opts = self._fns["code"][1]
            self.isolation["code"] = warm_up(
                opts.get("isolation", "bwrap"), opts.get("allow_unisolated", False)
            )
            log = logger.info if self.isolation["code"] == "bwrap" else logger.warning
            log("code sandbox isolation: %s", self.isolation["code"])
        if "math" in self._fns:
            # math-verify's first call builds its parsers (~0.1-1 s): pay it here, not in a sample's limit.
            fn, opts = self._fns["math"]
            fn(VerifyRequest("warm-up", "", "\\boxed{\\frac{1}{2}}", "0.5"), **opts)

    def ping(self) -> int:
        return os.getpid()

    def isolations(self) -> Dict[str, str]:
        """{verifier: isolation in force}, e.g. {"code": "bwrap"} (see sandbox.describe)."""
        return dict(self.isolation)

    def verify(self, request: VerifyRequest) -> VerifyResult:
        try:
            name = route(self.sources, request.data_source)
            fn, opts = self._fns.get(name) or (get_verifier(name), {})
            with time_limit(self.timeout_s):
                result = fn(request, **opts)
            if not isinstance(result, VerifyResult):
                raise TypeError(f"verifier {name!r} returned {type(result).__name__}, not VerifyResult")
            result.uid = request.uid
            return result
        except SampleTimeout as err:
            logger.warning("sample %s: %s", request.uid, err)
            return VerifyResult.failed(request.uid, f"timeout: {err}")
        except Exception as err:
            logger.warning("sample %s: verifier raised %r", request.uid, err)
            return VerifyResult.failed(request.uid, f"verifier error: {type(err).__name__}: {err}"[:500])

    def verify_many(self, requests: List[VerifyRequest]) -> List[VerifyResult]:
        """Results in request order. A verifier with a batched path (`verify_batch`, e.g. a TRL-style
        custom function) gets all of its requests in one call; the others run per sample."""
        results: List[Optional[VerifyResult]] = [None] * len(requests)
        by_verifier: Dict[str, List[int]] = {}
        for i, r in enumerate(requests):
            try:
                by_verifier.setdefault(route(self.sources, r.data_source), []).append(i)
            except ValueError:
                results[i] = self.verify(r)  # reports the unrouted data_source
        for name, indices in by_verifier.items():
            fn, opts = self._fns.get(name) or (get_verifier(name), {})
            batched = (
                self._verify_batch(fn, opts, [requests[i] for i in indices]) if len(indices) > 1 else None
            )
            for i, result in zip(indices, batched or [self.verify(requests[i]) for i in indices]):
                results[i] = result
        return results  # type: ignore[return-value]

    def _verify_batch(
        self, fn: Any, opts: Dict[str, Any], requests: List[VerifyRequest]
    ) -> Optional[List[VerifyResult]]:
        """One batched call under the batch's time limit (timeout_s per sample, as the pool allows);
        None when the verifier has no batched path, or the call failed other than by timing out (the
        caller then scores per sample, so a failure is reported against the sample that causes it)."""
        verify_batch = getattr(fn, "verify_batch", None)
        if verify_batch is None:
            return None
        uids = [r.uid for r in requests]
        try:
            with time_limit(self.timeout_s * len(requests)):
                results = verify_batch(requests, **opts)
            if results is None:
                return None
            if len(results) != len(requests) or not all(isinstance(x, VerifyResult) for x in results):
                raise TypeError(f"verify_batch returned {len(results)} items for {len(requests)} requests")
        except SampleTimeout as err:
            logger.warning("samples %s: batch %s", uids, err)
            return [VerifyResult.failed(uid, f"timeout: batch of {len(uids)}: {err}") for uid in uids]
        except Exception as err:
            logger.warning("samples %s: batched verifier raised %r; scoring them one by one", uids, err)
            return None
        for uid, result in zip(uids, results):
            result.uid = uid
        return results
