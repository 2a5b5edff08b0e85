"""Bucketed, versioned weight sync from the learner ranks to the rollout workers.

One sync of policy version v:

1. The learner cuts the model into buckets of about `learner.sync_bucket_mb` MB (float32 bytes, whole
   tensors, in `named_parameters` order; a tensor bigger than a bucket is a bucket of its own).
   `plan_buckets` is the packing; every rank computes the same plan.
2. Bucket by bucket, the ranks gather that bucket's parameters (under ZeRO-3 one collective per bucket,
   so no rank ever holds more than one bucket of full parameters beyond its shard) and rank 0 hands the
   numpy arrays to the run's `WeightTransport` (rlloop.distributed.transport, cluster.weight_transport):
   the Ray object store (stored once, read zero-copy by every worker on the node), a /dev/shm file
   (written once, memory-mapped by every worker), a torch.distributed broadcast to every worker (gloo on
   CPU, NCCL on GPU) or CUDA IPC handles. What reaches each worker's call is the transport's payload.
3. Each worker gets one call per bucket, `load_weight_bucket(v, index, num_buckets, payload)`, turns the
   payload back into arrays and stages them in a `BucketStager`; only when all `num_buckets` buckets of
   v are there does it load them into its engine and switch its `policy_version` to v. A partial version
   is never served: a worker generates with the last complete version, whatever interleaves with the
   bucket calls.
4. Every learner gather and every worker call is waited on with `learner.sync_timeout_s`; a call that
   does not answer raises `WeightSyncError` naming the worker (or learner rank), the bucket and the
   version.

The transports only move a bucket's arrays, whichever the learner sends (every weight, or a LoRA
adapter's). With `collective` the workers' calls are queued first and wait in the group's broadcast;
rank 0's send returns once every worker has the bucket, so a worker busy generating delays the sync
(the object store and shm let the learner go on). A restarted worker is restored from the last sync's
payloads (object store, shm, CUDA IPC) or from rank 0's copy of the last buckets (collective), and the
collective group is formed again, as a new generation, before the next sync.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MB = 1 << 20


class WeightSyncError(RuntimeError):
    """A weight-sync call failed or timed out; the message names the worker/rank, bucket and version."""


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Greedy in-order packing of tensors into buckets of at most `bucket_bytes` bytes.

    sizes: bytes of each tensor, in order. Returns lists of tensor indices; every index appears once, in
    order. A bucket is closed when the next tensor would overflow it; a tensor larger than `bucket_bytes`
    gets a bucket of its own (tensors are never split).
    """
    if bucket_bytes < 1:
        raise ValueError(f"learner.sync_bucket_mb must be > 0 (got {bucket_bytes} bytes)")
    buckets: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(i)
        used += int(size)
    if current:
        buckets.append(current)
    return buckets


class BucketStager:
    """Worker-side staging of one version's buckets; hands out the whole state dict once complete.

    Arrays are kept as received (zero-copy views of the object store), so staging costs no copy.
    """

    def __init__(self) -> None:
        self.version: int | None = None
        self.num_buckets = 0
        self.parts: dict[int, dict[str, np.ndarray]] = {}

    def add(
        self, version: int, index: int, num_buckets: int, arrays: dict[str, np.ndarray], serving: int
    ) -> dict[str, np.ndarray] | None:
        """Stage bucket `index` of `num_buckets` of `version`; returns every array of the version when this
        was its last missing bucket, else None. `serving` is the version the worker serves now: an older
        version is refused, a newer one replaces a partial version left by an aborted sync."""
        if version < serving:
            raise ValueError(
                f"weight bucket {index + 1}/{num_buckets} of version {version}: the worker already serves "
                f"version {serving}"
            )
        if not 0 <= index < num_buckets:
            raise ValueError(f"weight bucket index {index} outside 0..{num_buckets - 1} (version {version})")
        if self.version != version or self.num_buckets != num_buckets:
            if self.parts:
                logger.warning(
                    "dropping %d/%d staged buckets of version %s: version %d started",
                    len(self.parts),
                    self.num_buckets,
                    self.version,
                    version,
                )
            self.version, self.num_buckets, self.parts = version, num_buckets, {}
        if index in self.parts:
            raise ValueError(f"weight bucket {index + 1}/{num_buckets} of version {version} arrived twice")
        self.parts[index] = arrays
        if len(self.parts) < num_buckets:
            return None
        merged: dict[str, np.ndarray] = {}
        for i in range(num_buckets):
            merged.update(self.parts[i])
        self.version, self.num_buckets, self.parts = None, 0, {}
        return merged

    @property
    def staged(self) -> int:
        return len(self.parts)


@dataclass
class SyncResult:
    """What one sync moved: the buckets' payload refs (kept for restarted workers; for `collective`
    tickets, useless for a restore: see `restore_refs`), their size and time, and the transport."""

    version: int
    bucket_refs: list[Any]
    bucket_bytes: list[int]
    gather_s: float  # learner side: gathering and sending every bucket
    pending: list[list[Any]]  # per worker: its load_weight_bucket refs, in bucket order
    transport: str = "object_store"

    def metrics(self) -> dict[str, float]:
        return {"sync/buckets": float(len(self.bucket_refs)), "sync/mb": sum(self.bucket_bytes) / MB}

    def restore_refs(self, learner: Any) -> list[Any]:
        """Payload refs that bring a restarted worker to this version: the sync's own, or for
        `collective` (whose tickets name a group the new process is not in) rank 0's copy of the buckets
        through the object store."""
        if self.transport == "collective":
            return learner.cached_weight_buckets(len(self.bucket_refs))
        return self.bucket_refs


def send_buckets(worker: Any, bucket_refs: list[Any], version: int) -> list[Any]:
    """One `load_weight_bucket` call per bucket on `worker`; returns the call refs in bucket order."""
    n = len(bucket_refs)
    return [worker.load_weight_bucket.remote(version, b, n, ref) for b, ref in enumerate(bucket_refs)]


def push_weights(
    learner: Any,
    workers: list[Any],
    version: int,
    *,
    bucket_mb: float,
    timeout_s: float,
    transport: str = "object_store",
    group: Any = None,
) -> SyncResult:
    """Gather the learner's weights bucket by bucket and send each bucket to every worker by `transport`
    (`group`: the formed `rlloop.distributed.transport.CollectiveGroup` for `collective`).

    Returns after the last bucket is sent (object store, shm: queued; the workers load in the
    background); `wait_loaded` checks their answers. Bucket b+1 is gathered while the workers receive b.
    """
    from rlloop.distributed.transport import CollectiveTicket

    t0 = time.perf_counter()
    plan = learner.weight_bucket_plan(bucket_mb, timeout_s=timeout_s)
    refs, sizes = [], []
    pending: list[list[Any]] = [[] for _ in workers]
    for b, nbytes in enumerate(plan):
        sizes.append(int(nbytes))
        if transport == "collective":
            if group is None or group.stale:
                raise WeightSyncError(f"weight sync to version {version}: the collective group is not formed")
            # the workers wait in the broadcast; rank 0's send returns when all of them have the bucket
            ticket = CollectiveTicket(group.generation)
            for i, worker in enumerate(workers):
                pending[i].append(worker.load_weight_bucket.remote(version, b, len(plan), ticket))
            refs.append(learner.send_weight_bucket(b, len(plan), version, transport, timeout_s=timeout_s))
            continue
        ref = learner.send_weight_bucket(b, len(plan), version, transport, timeout_s=timeout_s)
        refs.append(ref)
        for i, worker in enumerate(workers):
            pending[i].append(worker.load_weight_bucket.remote(version, b, len(plan), ref))
    return SyncResult(version, refs, sizes, time.perf_counter() - t0, pending, transport)


def wait_loaded(result: SyncResult, *, timeout_s: float, on_dead: Any = None) -> list[int]:
    """Each worker's serving version after its last bucket; raises WeightSyncError naming the worker and
    bucket whose call timed out or failed. `on_dead(i, err)` (optional) recovers a worker that died
    mid-sync (restart + reload) and returns its version; without it a death raises too."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    n = len(result.bucket_refs)
    versions = []
    for i, refs in enumerate(result.pending):
        version = None
        for b, ref in enumerate(refs):
            where = (
                f"weight sync to version {result.version}: rollout worker {i}, bucket {b + 1}/{n} "
                f"({result.bucket_bytes[b] / MB:.1f} MB)"
            )
            try:
                version = ray.get(ref, timeout=timeout_s)
            except GetTimeoutError as err:
                raise WeightSyncError(f"{where}: no answer within {timeout_s:.0f} s") from err
            except RayActorError as err:
                if on_dead is None:
                    raise WeightSyncError(f"{where}: the worker died ({err})") from err
                version = on_dead(i, err)
                break
            except RayTaskError as err:
                cause = getattr(err, "cause", None) or err
                raise WeightSyncError(f"{where}: {type(cause).__name__}: {cause}") from err
        if version != result.version:
            raise WeightSyncError(
                f"weight sync to version {result.version}: rollout worker {i} serves version {version} "
                f"after its last bucket"
            )
        versions.append(int(version))
    return versions
