"""`VerifierPool`: verifier worker processes as Ray actors, fed per sample so scoring overlaps generation.

A background thread in the caller's process keeps every worker busy (at most `_DEPTH` calls queued on
each, each call a small chunk of samples), watches each running call against its deadline and replaces a
worker that hung or died. The samples of the call that was running are re-queued once, alone, so a second
failure is blamed on the sample itself: it is then recorded as a 0 with the reason. Samples queued behind
it are re-queued without counting an attempt.

Two time limits protect the loop: inside the worker each sample runs under `timeout_s` (SIGALRM, a 0 with
reason "timeout"); a call that still does not return within `len(chunk) * timeout_s + grace` (stuck in C
code, a dead process) costs the worker its life.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterable, List, Optional

from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult, check_options, get_verifier
from rlloop.rewards.verifiers.custom import absolute_custom_fn, load_custom_fn
from rlloop.rewards.verifiers.worker import VerifierWorkerCore, import_plugins, route, verifier_options

logger = logging.getLogger(__name__)

_DEPTH = 2  # calls queued per worker: one running, one ready behind it
_MAX_CHUNK = 16  # samples per call: amortises the ~1 ms actor round trip without hurting streaming
_GRACE_S = 2.0  # on top of the per-sample limits before a call counts as hung
_START_TIMEOUT_S = 120.0  # default: a fresh worker must answer its first call within this


def _as_dict(cfg: Any) -> Dict[str, Any]:
    if isinstance(cfg, dict):
        return dict(cfg)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    import dataclasses

    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    raise TypeError(
        f"VerifierPool: cfg must be a VerifierConfig, DictConfig or dict, got {type(cfg).__name__}"
    )


@dataclass
class _Item:
    request: VerifyRequest
    seq: int  # which submission of this uid: a late result of an abandoned one is dropped
    failures: int = 0  # calls that hung or crashed while this sample was running
    solo: bool = False  # after a failure it runs alone so the next failure is its own


@dataclass
class _Call:
    ref: Any
    items: List[_Item]
    dispatched_at: float
    started_at: Optional[float] = None  # when it reached the head of its worker's queue

    def deadline(self, timeout_s: float) -> float:
        assert self.started_at is not None
        return self.started_at + len(self.items) * timeout_s + _GRACE_S


@dataclass
class _Worker:
    index: int
    actor: Any
    ready_ref: Any
    ready: bool = False
    started: float = field(default_factory=time.monotonic)
    calls: Deque[_Call] = field(default_factory=collections.deque)


def check_verifier_config(
    sources: Dict[str, str],
    options: Dict[str, Dict[str, Any]],
    custom_fn: Optional[str],
    plugins: List[str],
    custom_style: str = "auto",
) -> None:
    """ValueError naming the key when a verifier, its options, a plugin or the custom function is unusable.

    Imports plugins and the custom function (as the workers will), so a typo fails at start-up, in the
    caller's process, not at step 100 inside a worker.
    """
    if not sources:
        raise ValueError("reward.verifier.sources is empty: map each data_source (or '*') to a verifier")
    import_plugins(plugins)
    for source, name in sources.items():
        try:
            get_verifier(name)
        except ValueError as err:
            raise ValueError(f"reward.verifier.sources[{source!r}]: {err}") from None
    for name in options:
        try:
            get_verifier(name)  # options for an unknown verifier are a typo
        except ValueError as err:
            raise ValueError(f"reward.verifier.options.{name}: {err}") from None
    for name in set(sources.values()):
        opts = verifier_options(name, options, custom_fn, custom_style)
        check_options(name, opts)
        if name == "custom":
            load_custom_fn(opts.get("fn"), opts.get("style", "auto"))
        if name == "code":  # refuse here, before any worker starts, when code would run unisolated
            from rlloop.rewards.verifiers.sandbox import SandboxUnavailable, warm_up

            try:
                warm_up(opts.get("isolation", "bwrap"), opts.get("allow_unisolated", False))
            except SandboxUnavailable as err:
                raise ValueError(f"reward.verifier.options.code: {err}") from None
    if custom_fn and "custom" not in sources.values():
        load_custom_fn(custom_fn, custom_style)


class VerifierPool:
    """Score `VerifyRequest`s in `num_workers` Ray actors. Requires `ray.init()` to have been called.

    cfg: `rlloop.config.VerifierConfig`, or a DictConfig/dict with its keys (num_workers, timeout_s,
    sources, custom_fn, custom_style, options, plugins, worker_num_cpus). Sources, verifier names, options
    and the custom function are all checked here, in the caller's process, before any worker starts.
    `start_timeout_s`: how long a fresh worker (at start-up or replacing a dead one) may take to answer its
    first call; the trainer passes `trainer.call_timeout_s`, since a loaded machine can take minutes.
    """

    def __init__(self, cfg: Any, *, start_timeout_s: float = _START_TIMEOUT_S) -> None:
        import ray

        if not start_timeout_s > 0:
            raise ValueError(f"VerifierPool: start_timeout_s must be > 0, got {start_timeout_s!r}")
        self.start_timeout_s = float(start_timeout_s)
        c = _as_dict(cfg)
        self.num_workers = int(c.get("num_workers", 2))
        self.timeout_s = float(c.get("timeout_s", 10.0))
        self.sources: Dict[str, str] = dict(c.get("sources") or {})
        self.options: Dict[str, Dict[str, Any]] = {
            k: dict(v or {}) for k, v in (c.get("options") or {}).items()
        }
        self.custom_fn: Optional[str] = absolute_custom_fn(c.get("custom_fn"))
        self.custom_style: str = c.get("custom_style") or "auto"
        if "fn" in self.options.get("custom", {}):
            self.options["custom"]["fn"] = absolute_custom_fn(self.options["custom"]["fn"])
        self.plugins: List[str] = list(c.get("plugins") or [])
        worker_num_cpus = float(c.get("worker_num_cpus", 0.1))
        if self.num_workers < 1:
            raise ValueError(f"reward.verifier.num_workers must be >= 1, got {self.num_workers}")
        if self.timeout_s <= 0:
            raise ValueError(f"reward.verifier.timeout_s must be > 0, got {self.timeout_s}")
        self._validate()
        if not ray.is_initialized():
            raise RuntimeError("VerifierPool needs Ray: call rlloop.distributed.ray_setup.init_ray() first")

        self._actor_cls = ray.remote(num_cpus=worker_num_cpus, max_restarts=0, max_concurrency=1)(
            VerifierWorkerCore
        )
        self._worker_args = dict(
            sources=self.sources,
            options=self.options,
            custom_fn=self.custom_fn,
            timeout_s=self.timeout_s,
            plugins=self.plugins,
            sys_path=[p for p in sys.path if p],
            custom_style=self.custom_style,
        )
        self._lock = threading.Condition()
        self._pending: Deque[_Item] = collections.deque()
        self._results: Dict[str, VerifyResult] = {}
        self._outstanding: Dict[str, int] = {}  # uid -> seq, submitted and not yet collected (in order)
        self._counter = itertools.count()
        self.restarts = 0
        self._workers = [self._start_worker(i) for i in range(self.num_workers)]
        # The isolation each sandboxed verifier runs under, e.g. {"code": "bwrap"}: logged here, and the
        # code verifier's `isolated` score records it per sample in the run's metrics (reward/isolated).
        self.isolation: Dict[str, str] = self._await_start()
        self._stop = False
        self._thread = threading.Thread(target=self._pump, name="verifier-pool", daemon=True)
        self._thread.start()
        logger.info(
            "VerifierPool: %d workers, timeout %.1f s, sources %s, isolation %s",
            self.num_workers,
            self.timeout_s,
            self.sources,
            self.isolation or "n/a",
        )

    # ---- start-up checks -------------------------------------------------------------------------
    def _validate(self) -> None:
        check_verifier_config(self.sources, self.options, self.custom_fn, self.plugins, self.custom_style)

    def check_sources(self, data_sources: Iterable[str]) -> None:
        """ValueError naming the first data_source that no verifier handles."""
        for source in data_sources:
            route(self.sources, source)

    # ---- public API --------------------------------------------------------------------------------
    def submit(self, requests: List[VerifyRequest]) -> None:
        """Queue requests for scoring and return at once; uids must be unique among uncollected ones."""
        for r in requests:
            route(self.sources, r.data_source)
        with self._lock:
            seen = set()
            for r in requests:
                if r.uid in self._outstanding or r.uid in seen:
                    raise ValueError(f"VerifierPool.submit: uid {r.uid!r} is already waiting to be collected")
                seen.add(r.uid)
            for r in requests:
                seq = next(self._counter)
                self._outstanding[r.uid] = seq
                self._pending.append(_Item(r, seq))
            self._lock.notify_all()

    def collect(
        self, uids: Optional[List[str]] = None, timeout: Optional[float] = None
    ) -> List[VerifyResult]:
        """Results for `uids` (default: everything submitted and not yet collected), in that order.

        Blocks until they are scored or `timeout` seconds pass; a sample still unscored then is
        returned as a 0 with reason "not scored within ..." and dropped from the pool.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            wanted = list(self._outstanding) if uids is None else list(uids)
            for uid in wanted:
                if uid not in self._outstanding:
                    raise KeyError(
                        f"VerifierPool.collect: uid {uid!r} was not submitted (or already collected)"
                    )
            while not all(uid in self._results for uid in wanted):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                if not self._thread.is_alive():
                    raise RuntimeError("VerifierPool: the dispatch thread died; see the log")
                self._lock.wait(timeout=0.5 if remaining is None else min(remaining, 0.5))
            out = []
            for uid in wanted:
                result = self._results.pop(uid, None)
                if result is None:
                    result = VerifyResult.failed(uid, f"not scored within the collect timeout ({timeout} s)")
                    self._pending = collections.deque(i for i in self._pending if i.request.uid != uid)
                    logger.warning("sample %s: %s", uid, result.reason)
                del self._outstanding[uid]
                out.append(result)
            return out

    def score(self, requests: List[VerifyRequest]) -> List[VerifyResult]:
        """submit + collect: results in request order."""
        self.submit(requests)
        return self.collect([r.uid for r in requests])

    def shutdown(self) -> None:
        self._stop = True
        with self._lock:
            self._lock.notify_all()
        if getattr(self, "_thread", None) is not None:
            self._thread.join(timeout=5)
        self._kill_all()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def worker_pids(self) -> List[int]:
        """Process ids of the current workers (for tests and debugging)."""
        import ray

        return ray.get([w.actor.ping.remote() for w in self._workers], timeout=self.start_timeout_s)

    def peak_rss_gb(self) -> List[float]:
        """Each current worker's peak RSS in GiB (the controller's `mem/verifier_rss_gb`)."""
        import ray

        return ray.get([w.actor.peak_rss_gb.remote() for w in self._workers], timeout=self.start_timeout_s)

    # ---- the dispatch thread -----------------------------------------------------------------------
    def _start_worker(self, index: int) -> _Worker:
        actor = self._actor_cls.options(name=None).remote(**self._worker_args)
        # the first call answered = started; it returns the worker's isolations (what __init__ logs)
        return _Worker(index=index, actor=actor, ready_ref=actor.isolations.remote())

    def _await_start(self) -> Dict[str, str]:
        """Wait, within start_timeout_s, until every worker has answered its first call -> worker 0's
        isolations. A worker that dies meanwhile (a crash, a kill) is replaced, num_workers times at most
        in all; a timeout or more deaths raise RuntimeError after the workers are killed."""
        import ray

        deadline = time.monotonic() + self.start_timeout_s
        deaths = 0
        answers: List[Dict[str, str]] = []
        try:
            for i in range(self.num_workers):
                while True:
                    w = self._workers[i]
                    try:
                        answers.append(ray.get(w.ready_ref, timeout=max(1e-3, deadline - time.monotonic())))
                        w.ready = True
                        break
                    except ray.exceptions.RayActorError as err:
                        deaths += 1
                        if deaths > self.num_workers:
                            raise
                        self._replace(w, f"died while starting: {err}")
        except Exception as err:
            self._kill_all()
            raise RuntimeError(f"VerifierPool: workers failed to start: {err}") from err
        return answers[0]

    def _kill_all(self) -> None:
        import ray

        for w in getattr(self, "_workers", []):
            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:  # already dead
                pass

    def _pump(self) -> None:
        while not self._stop:
            try:
                self._pump_once()
            except Exception:  # a bug here must not silently stall every collect(): log, back off, go on
                logger.exception("VerifierPool dispatch loop error")
                time.sleep(0.5)

    def _pump_once(self) -> None:
        import ray

        with self._lock:
            self._dispatch()
            refs = [c.ref for w in self._workers for c in w.calls]
            refs += [w.ready_ref for w in self._workers if not w.ready]
            if not refs:
                self._lock.wait(timeout=0.1)
                return
        ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        with self._lock:
            self._handle(set(ready))
            self._check_deadlines()
            self._lock.notify_all()

    def _dispatch(self) -> None:
        now = time.monotonic()
        if any(self._outstanding.get(i.request.uid) != i.seq for i in self._pending):
            self._pending = collections.deque(
                i for i in self._pending if self._outstanding.get(i.request.uid) == i.seq
            )
        ready_workers = [w for w in self._workers if w.ready]
        for w in sorted(ready_workers, key=lambda w: len(w.calls)):
            while self._pending and len(w.calls) < _DEPTH:
                if self._pending[0].solo:
                    chunk = [self._pending.popleft()]
                else:
                    size = max(
                        1, min(_MAX_CHUNK, math.ceil(len(self._pending) / (_DEPTH * len(ready_workers))))
                    )
                    chunk = []
                    while self._pending and len(chunk) < size and not self._pending[0].solo:
                        chunk.append(self._pending.popleft())
                call = _Call(w.actor.verify_many.remote([i.request for i in chunk]), chunk, now)
                if not w.calls:
                    call.started_at = now
                w.calls.append(call)

    def _handle(self, ready: set) -> None:
        import ray

        for w in list(self._workers):
            if not w.ready and w.ready_ref in ready:
                try:
                    ray.get(w.ready_ref, timeout=1)
                    w.ready = True
                except Exception as err:
                    logger.error("verifier worker %d failed to start: %r", w.index, err)
                    self._replace(w, f"worker failed to start: {err}")
                continue
            while w.calls and w.calls[0].ref in ready:
                call = w.calls.popleft()
                try:
                    results = ray.get(call.ref, timeout=1)
                except Exception as err:  # RayActorError: the worker process died mid-call
                    w.calls.appendleft(call)
                    self._fail_worker(w, f"worker crashed: {type(err).__name__}")
                    break
                for item, result in zip(call.items, results, strict=True):
                    self._store(item, result)
                if w.calls and w.calls[0].started_at is None:
                    w.calls[0].started_at = time.monotonic()

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if not w.ready and now - w.started > self.start_timeout_s:
                self._replace(w, "worker did not start")
            elif w.calls and w.calls[0].started_at is not None and now > w.calls[0].deadline(self.timeout_s):
                n = len(w.calls[0].items)
                self._fail_worker(w, f"worker hung: no answer within {n * self.timeout_s + _GRACE_S:.1f} s")

    def _fail_worker(self, w: _Worker, reason: str) -> None:
        """The running call failed: blame its samples once, re-queue the rest, replace the worker."""
        running, queued = w.calls[0], list(w.calls)[1:]
        w.calls.clear()
        retry = []
        for item in running.items:
            item.failures += 1
            if item.failures >= 2:
                logger.error("sample %s: failed twice (%s); recorded as 0", item.request.uid, reason)
                self._store(item, VerifyResult.failed(item.request.uid, f"{reason} (twice)"))
            else:
                logger.warning("sample %s: %s; re-queued once", item.request.uid, reason)
                item.solo = True
                retry.append(item)
        requeue = retry + [i for call in queued for i in call.items]
        self._pending.extendleft(reversed(requeue))
        self._replace(w, reason)

    def _replace(self, w: _Worker, reason: str) -> None:
        import ray

        try:
            ray.kill(w.actor, no_restart=True)
        except Exception:
            pass
        self.restarts += 1
        logger.warning("verifier worker %d replaced (%s); %d restarts so far", w.index, reason, self.restarts)
        self._workers[self._workers.index(w)] = self._start_worker(w.index)

    def _store(self, item: _Item, result: VerifyResult) -> None:
        if self._outstanding.get(item.request.uid) == item.seq:  # else collect() gave up on it
            self._results[item.request.uid] = result
