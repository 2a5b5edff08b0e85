"""The policy learner's Ray side: one actor per DeepSpeed rank, packed in a placement group.

`LearnerActor` is a thin shell over `rlloop.learner.policy.PolicyLearner`; `LearnerGroup` shards
batches over the ranks, gathers results, and turns a hung or dead rank into an error that names the
rank and the method it was running.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlloop.distributed.actor import ActorCore
from rlloop.types import Batch

logger = logging.getLogger(__name__)


class LearnerError(RuntimeError):
    """A learner rank failed, died or timed out; the message names the rank and the method.

    `lost` is True when a rank is dead or stopped answering: the group cannot go on, but the run can
    restart from a checkpoint (rlloop.train). False: every rank is alive and one raised, so a restart
    would only raise again.
    """

    def __init__(self, message: str, *, lost: bool = False) -> None:
        super().__init__(message)
        self.lost = lost


class LearnerActor(ActorCore):
    """Ray shell: builds the PolicyLearner on `setup` and forwards calls to it."""

    def __init__(self) -> None:
        self.learner: Any = None

    def node_ip(self) -> str:
        """The address Ray registered this actor's node under (127.0.0.1 on a loopback-bound local
        cluster, the node's cluster address otherwise); `ray.util.get_node_ip_address()` would give the
        machine's eth0 address even when Ray itself is bound to loopback."""
        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node["NodeID"] == node_id:
                return node["NodeManagerAddress"]
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("", 0))
            return int(sock.getsockname()[1])

    def setup(self, *args: Any, role: str = "policy", **kwargs: Any) -> None:
        if role == "critic":
            from rlloop.learner.critic import CriticLearner as cls
        else:
            from rlloop.learner.policy import PolicyLearner as cls
        self.learner = cls(*args, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        attr = getattr(self.learner, method)
        return attr(*args, **kwargs) if callable(attr) else attr

    def train_pairs(self, batch: Batch, loss_scale: float) -> dict[str, float]:
        """The update under a preference loss (algo.policy_loss=dpo|tgdpo), rlloop.learner.preference."""
        from rlloop.learner.preference import preference_train_step

        return preference_train_step(self.learner, batch, loss_scale)

    def send_weight_bucket(self, index: int, version: int, transport: str) -> tuple[int, Any]:
        """(number of arrays, the bucket's payload for `transport`; rlloop.distributed.transport) — called
        with num_returns=2, so the controller waits on the small first value and hands the second, still
        in the object store, to the rollout workers. Every rank gathers; rank 0 sends. For `collective`
        rank 0 keeps the bucket's arrays (`cached_weight_bucket`) to restore a restarted worker."""
        arrays = self.learner.gather_weight_bucket(index)
        if arrays is None:
            return 0, None
        if transport == "collective":
            if getattr(self, "_cached_version", None) != version:
                self._cached_version, self._cached_buckets = version, {}
            self._cached_buckets[index] = arrays
        return len(arrays), self.weight_endpoint.send(transport, arrays, version, index)

    def cached_weight_bucket(self, index: int) -> Any:
        """Bucket `index` of the last collective sync, as arrays (restoring a restarted worker)."""
        buckets = getattr(self, "_cached_buckets", {})
        if index not in buckets:
            raise KeyError(f"cached_weight_bucket({index}): rank 0 holds buckets {sorted(buckets)} of the last sync")
        return buckets[index]


def pad_rows(batch: Batch, multiple: int) -> tuple[Batch, int]:
    """Pad `batch` to a multiple of `multiple` rows by repeating its last rows with response_mask 0.

    Returns (padded batch, original number of rows); padded rows train on nothing and are dropped from
    outputs.
    """
    n = len(batch)
    if n == 0:
        raise ValueError("LearnerGroup: empty batch")
    extra = (-n) % multiple
    if extra == 0:
        return batch, n
    index = np.concatenate([np.arange(n), np.arange(n - extra, n) % n])
    padded = batch.select(index)
    padded.response_mask = padded.response_mask.copy()
    padded.response_mask[n:] = 0
    return padded, n


def shard_slices(num_rows: int, world_size: int) -> list[slice]:
    """Contiguous equal shards (num_rows must be a multiple of world_size)."""
    per_rank = num_rows // world_size
    return [slice(r * per_rank, (r + 1) * per_rank) for r in range(world_size)]


def rank_loss_scales(
    response_mask: np.ndarray, num_real: int, shards: list[slice], loss_agg: str
) -> list[float]:
    """Per-rank loss multipliers so that DeepSpeed's mean of rank losses is the global batch loss.

    DeepSpeed averages gradients over ranks: grad = 1/W sum_r grad L_r. With L_r scaled by
    W * agg(1[rows of r], mask_global) / agg(1, mask_r) (see micro_batch_weight), the sum is the loss of
    the whole (unpadded) batch, whatever the token counts per rank. response_mask: [B_padded, T].
    """
    import torch

    from rlloop.algos.losses import aggregate_loss

    world_size = len(shards)
    mask = torch.as_tensor(response_mask, dtype=torch.float32)
    real = mask[:num_real]
    scales = []
    for rows in shards:
        indicator = torch.zeros_like(real)
        indicator[rows] = 1.0  # padding rows (>= num_real) fall outside
        whole = float(aggregate_loss(indicator, real, loss_agg))
        own = float(aggregate_loss(torch.ones_like(mask[rows]), mask[rows], loss_agg))
        scales.append(world_size * whole / own if own != 0.0 and np.isfinite(own) else 0.0)
    return scales


def merge_rank_metrics(
    results: list[dict[str, float]], scales: list[float], tokens: list[float]
) -> dict[str, float]:
    """Whole-batch metrics from per-rank ones.

    actor/pg_loss, critic/vf_loss: mean over ranks of loss_r * scale_r (= the global loss, see
    rank_loss_scales);
    grad_norm and lr are global already (plain mean); perf/* (tokens, FLOPs): summed; per-token
    statistics: token-weighted mean.
    """
    total = sum(tokens)
    merged = {}
    for key in results[0]:
        values = [r[key] for r in results]
        if key in ("actor/pg_loss", "critic/vf_loss"):
            merged[key] = float(np.mean([v * s for v, s in zip(values, scales, strict=True)]))
        elif key.startswith("perf/"):  # work done: each rank's own, summed
            merged[key] = float(sum(values))
        elif key in ("actor/grad_norm", "actor/lr", "critic/grad_norm", "critic/lr") or total == 0:
            merged[key] = float(np.mean(values))
        else:
            merged[key] = float(sum(v * t for v, t in zip(values, tokens, strict=True)) / total)
    return merged


class LearnerGroup:
    """`learner_cfg["world_size"]` PolicyLearner ranks as Ray actors in one PACK placement group
    (`role="critic"`: CriticLearner ranks, the value model of algo.advantage=gae)."""

    def __init__(
        self,
        model_path: str,
        learner_cfg: dict,
        algo_cfg: dict,
        *,
        temperature: float,
        train_batch_size: int,
        seed: int = 0,
        num_cpus_per_rank: float = 0.5,
        timeout_s: float = 600,
        actor_options: list[dict[str, Any]] | None = None,
        role: str = "policy",
    ) -> None:
        """actor_options: per rank Ray options (resources and placement-group bundle, from
        rlloop.distributed.placement, which owns that group); None = a PACK group of its own with
        `num_cpus_per_rank` CPUs per rank."""
        if role not in ("policy", "critic"):
            raise ValueError(f"LearnerGroup: role must be policy or critic, got {role!r}")
        self.role = role
        self.world_size = int(learner_cfg["world_size"])
        if self.world_size < 1:
            raise ValueError(f"learner.world_size must be >= 1, got {self.world_size}")
        from rlloop.config import AlgoConfig, LearnerConfig, with_defaults

        self.learner_cfg = with_defaults(LearnerConfig, learner_cfg)
        self.algo_cfg = with_defaults(AlgoConfig, algo_cfg)
        self.timeout_s = float(timeout_s)
        self.version = 0
        self.pg = None
        if actor_options is None:
            self.pg = placement_group([{"CPU": num_cpus_per_rank}] * self.world_size, strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError as err:
                remove_placement_group(self.pg)
                raise LearnerError(
                    f"LearnerGroup: placement group of {self.world_size} x {num_cpus_per_rank} CPU not ready "
                    f"within {self.timeout_s:.0f} s (cluster resources: {ray.available_resources()})"
                ) from err
            actor_options = [
                {
                    "num_cpus": num_cpus_per_rank,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        placement_group=self.pg, placement_group_bundle_index=rank
                    ),
                }
                for rank in range(self.world_size)
            ]
        actor_cls = ray.remote(LearnerActor)
        self.actors = [
            actor_cls.options(**actor_options[rank], name=None).remote() for rank in range(self.world_size)
        ]
        try:
            # Rank 0 hosts the torch.distributed store: its node's address, a port free there.
            master_addr, free_port = self._gather(
                [self.actors[0].node_ip.remote(), self.actors[0].free_port.remote()], "node_ip", ranks=[0, 0]
            )
            if self.world_size == 1:
                master_addr = "127.0.0.1"
            master_port = int(self.learner_cfg["master_port"] or 0) or free_port
            start = time.perf_counter()
            self._gather(
                [
                    actor.setup.remote(
                        model_path,
                        self.learner_cfg,
                        self.algo_cfg,
                        rank=rank,
                        world_size=self.world_size,
                        master_addr=master_addr,
                        master_port=master_port,
                        temperature=temperature,
                        train_batch_size=train_batch_size,
                        seed=seed,
                        role=role,
                    )
                    for rank, actor in enumerate(self.actors)
                ],
                "setup",
            )
        except Exception:
            self.shutdown()
            raise
        logger.info(
            "%s learner group up: %d ranks, ZeRO-%s, %s:%d, %.1f s; rank 0 init phases %s",
            role,
            self.world_size,
            self.learner_cfg["zero_stage"],
            master_addr,
            master_port,
            time.perf_counter() - start,
            self._gather([self.actors[0].call.remote("init_timings")], "init_timings")[0],
        )

    # ------------------------------------------------------------------ plumbing

    def _gather(
        self,
        refs: list[ray.ObjectRef],
        method: str,
        ranks: list[int] | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """Results of `refs` (one per rank) in order; the first failure or a timeout raises LearnerError."""
        ranks = list(range(len(refs))) if ranks is None else ranks
        rank_of = {ref: rank for ref, rank in zip(refs, ranks, strict=True)}
        pending = list(refs)
        timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                names = ", ".join(f"rank {rank_of[r]}" for r in pending)
                raise LearnerError(
                    f"learner {names} running {method!r}: no answer within {timeout_s:.0f} s", lost=True
                )
            for ref in ready:
                try:
                    ray.get(ref, timeout=timeout_s)
                except RayActorError as err:
                    raise LearnerError(
                        f"learner rank {rank_of[ref]} died running {method!r}: {err}", lost=True
                    ) from err
                except RayTaskError as err:
                    cause = getattr(err, "cause", None) or err  # the rank's own exception; traceback chained
                    what = f"learner rank {rank_of[ref]} failed running {method!r}: {type(cause).__name__}: {cause}"
                    # A peer's death often shows first as a collective error on a live rank
                    # (gloo: "Connection closed by peer"): blame the dead rank when there is one.
                    gone = self.unresponsive_ranks()
                    if gone:
                        raise LearnerError(
                            f"learner rank(s) {gone} died or hung ({what})", lost=True
                        ) from err
                    raise LearnerError(what) from err
        return ray.get(refs, timeout=timeout_s)

    def unresponsive_ranks(self, timeout_s: float = 10.0) -> list[int]:
        """Ranks that are dead or do not answer a ping within `timeout_s` (busy in a stuck collective)."""
        pings = {actor.__ray_ready__.remote(): rank for rank, actor in enumerate(self.actors)}
        ready, pending = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
        gone = [pings[ref] for ref in pending]
        for ref in ready:
            try:
                ray.get(ref, timeout=timeout_s)
            except RayActorError:
                gone.append(pings[ref])
        return sorted(gone)

    def _call_all(self, method: str, per_rank_args: list[tuple] | None = None, **kwargs: Any) -> list[Any]:
        refs = [
            actor.call.remote(method, *(per_rank_args[rank] if per_rank_args else ()), **kwargs)
            for rank, actor in enumerate(self.actors)
        ]
        return self._gather(refs, method)

    # ------------------------------------------------------------------ API

    def peak_rss_gb(self) -> list[float]:
        """Each rank's peak RSS in GiB (the controller's `mem/learner_rss_gb`)."""
        return self._gather([actor.peak_rss_gb.remote() for actor in self.actors], "peak_rss_gb")

    def compute_logprobs(self, batch: Batch, which: str = "policy") -> np.ndarray:
        """[B, T] float32 logprobs of `batch` (rows sharded evenly over the ranks, results in order)."""
        return self.gather_logprobs(self.submit_logprobs(batch, which))

    def submit_logprobs(self, batch: Batch, which: str = "policy") -> tuple[list[ray.ObjectRef], int]:
        """Start compute_logprobs on every rank without waiting; `gather_logprobs` collects it. The
        controller overlaps this pass with PRM scoring in other processes. Calls to a rank run in order,
        so a train_step submitted afterwards sees the same weights."""
        return self._submit_rows("compute_logprobs", batch, which)

    def gather_logprobs(self, pending: tuple[list[ray.ObjectRef], int]) -> np.ndarray:
        return self._gather_rows(pending, "compute_logprobs")

    def submit_values(self, batch: Batch) -> tuple[list[ray.ObjectRef], int]:
        """Critic: start compute_values ([B, T] V before each token) on every rank; `gather_values`."""
        return self._submit_rows("compute_values", batch)

    def gather_values(self, pending: tuple[list[ray.ObjectRef], int]) -> np.ndarray:
        return self._gather_rows(pending, "compute_values")

    def _submit_rows(self, method: str, batch: Batch, *args: Any) -> tuple[list[ray.ObjectRef], int]:
        padded, n = pad_rows(batch, self.world_size)
        shards = shard_slices(len(padded), self.world_size)
        refs = [
            actor.call.remote(method, padded.select(s), *args) for actor, s in zip(self.actors, shards, strict=True)
        ]
        return refs, n

    def _gather_rows(self, pending: tuple[list[ray.ObjectRef], int], method: str) -> np.ndarray:
        refs, n = pending
        return np.concatenate(self._gather(refs, method), axis=0)[:n]

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One update (ppo_epochs optimizer steps) on `batch`; returns metrics of the whole batch."""
        return self.gather_train_step(self.submit_train_step(batch))

    def submit_train_step(self, batch: Batch) -> tuple[list[ray.ObjectRef], list[float], list[float]]:
        """Start train_step on every rank without waiting (the critic's update runs while the policy's
        does); `gather_train_step` collects the metrics."""
        from rlloop.algos.dpo import is_preference_loss

        if is_preference_loss(self.algo_cfg["policy_loss"]):
            return self._submit_pairs(batch)
        padded, n = pad_rows(batch, self.world_size)
        shards = shard_slices(len(padded), self.world_size)
        scales = rank_loss_scales(
            padded.response_mask, n, shards, self.algo_cfg["loss_agg"]
        )
        refs = [
            actor.call.remote("train_step", padded.select(s), scale)
            for actor, s, scale in zip(self.actors, shards, scales, strict=True)
        ]
        return refs, scales, [float(padded.response_mask[s].sum()) for s in shards]

    def _submit_pairs(self, batch: Batch) -> tuple[list[ray.ObjectRef], list[float], list[float]]:
        """submit_train_step for a batch of (chosen, rejected) row pairs: padded by whole pairs so that no
        pair straddles two ranks, each rank's loss scaled by world_size x its share of the pairs (the mean
        over ranks is then the mean over all pairs); metrics merge weighted by pairs."""
        from rlloop.learner.preference import pair_counts

        padded, _ = pad_rows(batch, 2 * self.world_size)
        shards = shard_slices(len(padded), self.world_size)
        counts = pair_counts(padded.response_mask, shards)
        total = max(sum(counts), 1)
        scales = [self.world_size * c / total for c in counts]
        refs = [
            actor.train_pairs.remote(padded.select(s), scale)
            for actor, s, scale in zip(self.actors, shards, scales, strict=True)
        ]
        return refs, scales, [float(c) for c in counts]

    def gather_train_step(self, pending: tuple[list[ray.ObjectRef], list[float], list[float]]) -> dict[str, float]:
        refs, scales, tokens = pending
        results = self._gather(refs, "train_step")
        self.version = int(self._gather([self.actors[0].call.remote("version")], "version")[0])
        key = "actor/policy_version" if self.role == "policy" else "critic/version"
        return merge_rank_metrics(results, scales, tokens) | {key: float(self.version)}

    def state_dict_ref(self) -> ray.ObjectRef:
        """ObjectRef of rank 0's full numpy state dict; every rank takes part in the gather.

        The reference is the actor's return value, stored once in the object store and shared by every
        rollout worker that gets it. Pair it with `self.version` for versioned weight sync.
        """
        refs = [actor.call.remote("full_state_dict") for actor in self.actors]
        self._gather(refs, "full_state_dict")
        return refs[0]

    def weight_bucket_plan(self, bucket_mb: float, timeout_s: float | None = None) -> list[int]:
        """Plan weight-sync buckets of about `bucket_mb` MB on every rank; returns each bucket's bytes.

        The ranks must agree (same model, same order); a disagreement is an error naming both plans.
        """
        from rlloop.distributed.weight_sync import MB

        plans = self._gather(
            [a.call.remote("weight_bucket_plan", int(bucket_mb * MB)) for a in self.actors],
            "weight_bucket_plan",
            timeout_s=timeout_s,
        )
        if any(p != plans[0] for p in plans[1:]):
            raise LearnerError(f"weight_bucket_plan: ranks planned different buckets {plans}")
        self._bucket_ranks = self.actors if self.learner_cfg["zero_stage"] == 3 else self.actors[:1]
        return plans[0]

    def gather_weight_bucket(
        self, index: int, num_buckets: int, timeout_s: float | None = None
    ) -> ray.ObjectRef:
        """ObjectRef of bucket `index`'s full arrays (rank 0's return value, stored once in the object
        store, shared by every rollout worker): `send_weight_bucket` by the object store."""
        return self.send_weight_bucket(index, num_buckets, self.version, "object_store", timeout_s)

    def send_weight_bucket(
        self, index: int, num_buckets: int, version: int, transport: str, timeout_s: float | None = None
    ) -> ray.ObjectRef:
        """ObjectRef of bucket `index`'s payload for `transport` (rlloop.distributed.transport): rank 0's
        return value. Under ZeRO-3 every rank takes part in the gather; below, rank 0 holds full
        parameters and answers alone. Waits for the gather (and, `collective`, the broadcast) with
        `timeout_s`."""
        ranks = getattr(self, "_bucket_ranks", None)
        if ranks is None:
            raise LearnerError("send_weight_bucket: call weight_bucket_plan first")
        pairs = [a.send_weight_bucket.options(num_returns=2).remote(index, version, transport) for a in ranks]
        self._gather(
            [count for count, _ in pairs],
            f"send_weight_bucket {index + 1}/{num_buckets} ({transport})",
            timeout_s=timeout_s,
        )
        return pairs[0][1]

    def cached_weight_buckets(self, num_buckets: int) -> list[ray.ObjectRef]:
        """Refs of rank 0's arrays of the last collective sync, one per bucket (a worker's restore)."""
        return [self.actors[0].cached_weight_bucket.remote(b) for b in range(num_buckets)]

    def save_hf(self, path: str, tokenizer_path: str | None = None) -> None:
        self._call_all("save_hf", [(path, tokenizer_path)] * self.world_size)

    def save_value_model(self, path: str) -> None:
        """Critic: write it as a PRM folder (CriticLearner.save_pretrained); every rank takes part."""
        self._call_all("save_pretrained", [(path,)] * self.world_size)

    def save_checkpoint(self, path: str) -> None:
        """Every rank writes its DeepSpeed state (weights, optimizer, ZeRO partitions) into `path`."""
        self._call_all("save_checkpoint", [(path,)] * self.world_size)

    def load_checkpoint(self, path: str) -> int:
        versions = self._call_all("load_checkpoint", [(path,)] * self.world_size)
        if len(set(versions)) != 1:
            raise LearnerError(f"{path}: ranks restored different versions {versions}")
        self.version = int(versions[0])
        return self.version

    def shutdown(self) -> None:
        if getattr(self, "actors", []):
            try:  # rank 0's /dev/shm weight files (cluster.weight_transport=shm)
                ray.get(self.actors[0].weight_close.remote(), timeout=10)
            except Exception:  # dead or hung: its files stay (named rlloop-<run>-<pid>-v<version>-b<bucket>)
                pass
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass
        self.actors = []
        if getattr(self, "pg", None) is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
