"""The controller: prompts -> rollouts -> verifier + PRM -> fusion -> advantages -> learner -> sync.

It runs in the driver process and only moves references and small metadata; the heavy work happens in
the actors (rollout workers, verifier pool, PRM service, learner ranks). Each step's seconds are
accounted per phase in `time/*`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlloop import checkpoint
from rlloop.algos.kl import apply_kl_in_reward, make_kl_controller
from rlloop.config import to_dict
from rlloop.errors import ConfigError, RlloopError
from rlloop.types import Batch, Rollout, Sample

logger = logging.getLogger(__name__)


class PromptStream:
    """Endless, seeded stream of training samples: a fresh shuffle each epoch, position kept for resume."""

    def __init__(self, samples: list[Sample], seed: int) -> None:
        if not samples:
            raise RlloopError("the training set is empty")
        self.samples = samples
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[Sample]:
        out = []
        for _ in range(k):
            if self.pos == len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._shuffle()
            out.append(self.samples[self._order[self.pos]])
            self.pos += 1
        return out


@dataclass
class StepTimer:
    """Seconds per phase of one step, reported as `time/<phase>`."""

    def __post_init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


# Controller-side phases that block on model forward/backward passes in some actor (see step_overhead).
COMPUTE_PHASES = (
    "generate",
    "prm_wait",
    "token_rewards",
    "logprobs",
    "learner",
    "prm_update",
    "implicit_prm_update",
    "critic_values",
)
# Phase keys the timer holds that are not controller wall time: `prm` is the PRM replicas' own scoring
# seconds (summed over replicas, overlapping `generate`), `step` the whole step.
_NOT_PHASES = ("prm", "step")


def step_overhead(seconds: dict[str, float]) -> dict[str, float]:
    """`time/idle` and `time/overhead_frac` of one step from its StepTimer seconds (`step` included).

    idle: step time covered by no controller phase (batch building, reward fusion, bookkeeping).
    Model compute is the controller's wall time in COMPUTE_PHASES: generation (rollout workers), the
    wait on PRM scoring that generation did not hide (`prm_wait`; the replicas' own `prm` seconds overlap
    generation and would count twice), Q-RM / implicit-PRM token scoring, old/ref logprobs, the learner's
    update and the online PRMs' updates. The actors report no compute time of their own, so each phase
    includes its call and transfer costs. Everything else (verify, weight sync, idle) is framework
    overhead: overhead_frac = 1 - compute / step, clamped to [0, 1]. A step of 0 s gives 0.
    """
    step = seconds.get("step", 0.0)
    covered = sum(v for k, v in seconds.items() if k not in _NOT_PHASES)
    compute = sum(seconds.get(k, 0.0) for k in COMPUTE_PHASES)
    frac = min(1.0, max(0.0, 1.0 - compute / step)) if step > 0 else 0.0
    return {"time/idle": max(0.0, step - covered), "time/overhead_frac": frac}


def answer_step(rollout: Rollout) -> int:
    """Index of the first step containing `\\boxed` (TDRM's answer step), or -1 when there is none."""
    starts = [0, *rollout.step_char_ends[:-1]]
    for k, (s, e) in enumerate(zip(starts, rollout.step_char_ends)):
        if "\\boxed" in rollout.text[s:e]:
            return k
    return -1


def build_batch(rollouts: list[Rollout], pad_id: int) -> Batch:
    """Right-padded [B, T] arrays of prompt+response tokens; logprob arrays aligned with input_ids."""
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    B, T = len(rollouts), max(lengths)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    response_mask = np.zeros((B, T), dtype=np.float32)
    rollout_logprobs = np.zeros((B, T), dtype=np.float32)
    for b, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.response_ids)
        input_ids[b, :p] = r.prompt_ids
        input_ids[b, p : p + n] = r.response_ids
        attention_mask[b, : p + n] = 1
        response_mask[b, p : p + n] = 1.0
        rollout_logprobs[b, p : p + n] = r.rollout_logprobs
    zeros = np.zeros((B, T), dtype=np.float32)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=zeros,
        returns=zeros.copy(),
        rollout_logprobs=rollout_logprobs,
    )


class Trainer:
    """Owns the actors of one run and drives the RL loop."""

    def __init__(self, cfg: Any, out_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        from rlloop.data import build_datasets, render_prompt
        from rlloop.data.loader import fit_prompt_lengths, max_positions
        from rlloop.models import resolve_model
        from rlloop.validate import validate_config

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        validate_config(cfg)
        torch.manual_seed(cfg.trainer.seed)
        # Everything that can fail on the user's input fails here, before any actor starts.
        self.train_set, self.test_set = build_datasets(cfg.task)
        if not self.train_set:
            raise RlloopError(f"task {cfg.task.name!r}: the training set is empty")
        self.model_path = resolve_model(cfg.model, cfg.task)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.train_set, self.test_set = (  # prompts too long for the context: task.overlong_prompts
            fit_prompt_lengths(
                samples,
                self.tokenizer,
                cfg.task,
                max_new_tokens=cfg.rollout.max_new_tokens,
                context=max_positions(self.model_path),
                split=split,
            )
            for split, samples in (("train", self.train_set), ("test", self.test_set))
        )
        if not self.train_set:
            raise RlloopError(f"task {cfg.task.name!r}: every training prompt is too long for the model")
        # the verifier gets each prompt's row: verl's extra_info, TRL's columns and chat messages
        self._samples = {s.uid: s for s in self.test_set + self.train_set}
        self.critic_init = None  # algo.advantage=gae: where the critic starts, checked before any actor
        if cfg.algo.advantage == "gae":
            from rlloop.learner.critic import resolve_critic_init

            c = cfg.algo.critic
            try:
                self.critic_init = resolve_critic_init(
                    c.init,
                    c.output,
                    policy_path=self.model_path,
                    prm_path=cfg.reward.prm.path,
                    qrm_path=cfg.reward.qrm.path,
                    policy_tokenizer=self.tokenizer,
                )
            except (ValueError, OSError) as err:
                raise RlloopError(str(err)) from err
        self._render = render_prompt
        self._prompt_cache: dict[str, dict] = {}
        self.stream = PromptStream(self.train_set, cfg.trainer.seed)
        self.step = 0
        self.trained_groups: list[str] = []  # prompt uids in the order they were trained on
        a = cfg.algo
        # a KL term (in the loss or the reward) always needs the reference logprobs; algo.use_ref adds
        # them without one, for the `kl` metric
        self.use_ref = bool(a.use_ref or a.kl_coef > 0)
        # the coefficient of the KL penalty in the reward: fixed, or adaptive toward algo.kl_target
        self.kl_ctl = make_kl_controller(a.kl_coef, a.kl_target, a.kl_horizon)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.resume_state: dict | None = None
        self.resume_path: Path | None = None
        if cfg.trainer.resume:
            self.resume_path = checkpoint.find(cfg.trainer.resume, self.ckpt_root)
            if self.resume_path is None:
                logger.info(
                    "trainer.resume=auto: no checkpoint under %s, starting from scratch", self.ckpt_root
                )
            else:
                self.resume_state = checkpoint.load_state(
                    self.resume_path,
                    fingerprint=checkpoint.model_fingerprint(self.model_path),
                    total_steps=cfg.trainer.total_steps,
                )
        try:
            self._start_actors()
            if self.resume_state is not None:
                self._restore(self.resume_path, self.resume_state)
        except BaseException:
            # the caller gets no Trainer to shut down: release what started (actors, placement groups),
            # or a long-lived cluster (ray job submit) keeps those CPUs/GPUs reserved after this job fails
            self.shutdown()
            raise

    # ---------------------------------------------------------------- set-up
    def _start_actors(self) -> None:
        import ray

        from rlloop.distributed.placement import place
        from rlloop.distributed.ray_setup import init_ray
        from rlloop.learner.group import LearnerGroup
        from rlloop.rewards.verifiers.pool import VerifierPool
        from rlloop.rollout.worker import RolloutWorker

        cfg = self.cfg
        init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.host)
        t0 = time.perf_counter()
        # cluster.*: every role's placement group, after checking the cluster has the CPUs/GPUs asked for
        # (ResourceError naming the role and key otherwise), before any actor starts.
        self.placement = place(cfg)
        self.verifier = VerifierPool(cfg.reward.verifier)
        self.verifier.check_sources({s.data_source for s in self.train_set + self.test_set})
        r = cfg.rollout
        self.workers = [
            # Ray restarts a dead worker (fresh process, initial weights); the controller then re-syncs
            # it to the current policy version and re-issues its in-flight prompts (see _call_worker).
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
            )
            for i in range(r.num_workers)
        ]
        self.prm = None  # the PRM replica that TD-trains in online mode (the only one otherwise)
        self.prm_pool = None
        if cfg.reward.prm.enabled and not cfg.reward.prm.oracle:
            from rlloop.rewards.prm.pool import PRMPool

            p = cfg.reward.prm
            prm_path = p.path or self.model_path
            if self.resume_path is not None and (self.resume_path / "prm").is_dir():
                prm_path = str(self.resume_path / "prm")  # the online PRM as it was at the checkpoint
            self.prm_pool = PRMPool.start(
                p.num_replicas,
                prm_path,
                actor_options=[self.placement.options("prm", i) for i in range(p.num_replicas)],
                max_restarts=cfg.trainer.max_actor_restarts,
                call=self._call_prm,
                tokenizer_path=None if prm_path != self.model_path else self.model_path,
                num_threads=p.num_threads,
                batch_size=p.batch_size,
                max_batch_tokens=p.max_batch_tokens,
                # auto: the GPU when the replica was given one, else the CPU (whatever torch sees)
                device=(
                    ("cuda" if self.placement.num_gpus("prm") else "cpu") if p.device == "auto" else p.device
                ),
                step_delimiter=r.step_delimiter,
                step_regex=r.step_regex,
                max_length=p.max_length,
            )
            self.prm = self.prm_pool.actors[0]
            if p.online:
                self._get(self.prm.enable_online.remote(**self._prm_trainer_kwargs()), "PRM enable_online")
        self._start_token_sources()
        self.learner = LearnerGroup(
            self.model_path,
            to_dict(cfg.learner),
            {**to_dict(cfg.algo), "use_ref": self.use_ref},
            temperature=r.temperature,
            train_batch_size=r.prompts_per_step * r.n,
            seed=cfg.trainer.seed,
            timeout_s=cfg.trainer.call_timeout_s,
            actor_options=[self.placement.options("learner", rank) for rank in range(cfg.learner.world_size)],
        )
        self.critic = self._start_critic() if cfg.algo.advantage == "gae" else None
        self._get([w.__ray_ready__.remote() for w in self.workers], "rollout workers start-up")
        if self.prm_pool is not None:
            self._get([a.__ray_ready__.remote() for a in self.prm_pool.actors], "PRM service start-up")
        for name, actor in (("Q-RM service", self.qrm), ("implicit PRM", self.implicit_prm)):
            if actor is not None:
                self._get(actor.__ray_ready__.remote(), f"{name} start-up")
        self._implicit_prm_weights_ref = None  # the implicit PRM's latest weights (for a restarted actor)
        self.policy_version = 0
        # the current policy's weight buckets in the object store (for restarted workers); None: initial
        self._weights_refs: list | None = None
        self._pending_sync = None  # a sync whose worker loads are not yet confirmed (async mode)
        self.pipeline = None  # rollouts generated ahead of the learner (trainer.async_mode)
        t = cfg.trainer
        if t.async_mode != "off":
            from rlloop.distributed.async_rollout import RolloutPipeline, lookahead

            ahead = lookahead(t.async_mode, t.max_staleness, t.async_lookahead)
            self.pipeline = RolloutPipeline(self._produce, ahead)
        self._prm_weights_ref = None  # the online PRM's latest weights (for a restarted PRM service)
        self._prm_version = 0
        self.restarts: dict[str, int] = {}
        logger.info("actors up in %.1f s (ray %s)", time.perf_counter() - t0, ray.__version__)

    def _start_critic(self) -> Any:
        """The value model of algo.advantage=gae: a LearnerGroup of CriticLearner ranks (rlloop.learner.critic)
        initialised from algo.critic.init (the policy, the PRM, the Q-RM or a folder); on resume its
        DeepSpeed checkpoint replaces these weights (_restore)."""
        from rlloop.learner.group import LearnerGroup

        cfg = self.cfg
        c, init = cfg.algo.critic, self.critic_init
        learner_cfg = to_dict(cfg.learner) | {
            "world_size": c.world_size,
            "lr": c.lr,
            "micro_batch_size": c.micro_batch_size or cfg.learner.micro_batch_size,
            "num_threads": c.num_threads,
            "master_port": 0,  # a free port of its own (learner.master_port belongs to the policy group)
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

    def _start_token_sources(self) -> None:
        """Q-RM (frozen) and PRIME's implicit PRM (online): the per-token reward sources of
        reward.fusion=token|prime, one actor each (validate_config has checked which may be on)."""
        cfg = self.cfg
        self.qrm = None
        if cfg.reward.qrm.enabled:
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
        self.implicit_prm = None
        if cfg.reward.implicit_prm.enabled:
            from rlloop.rewards.implicit_prm import ImplicitPRMService

            ip = cfg.reward.implicit_prm
            init = ref = ip.path or self.model_path
            if self.resume_path is not None and (self.resume_path / "implicit_prm").is_dir():
                init = str(self.resume_path / "implicit_prm")  # π_φ as it was at the checkpoint
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

    def _get(self, refs: Any, what: str) -> Any:
        from rlloop.distributed.ray_setup import get

        return get(refs, timeout=self.cfg.trainer.call_timeout_s, what=what)

    # ---------------------------------------------------------------- pieces of a step
    def _prompt(self, s: Sample) -> dict:
        cached = self._prompt_cache.get(s.uid)
        if cached is None:
            ids = self._render(s, self.tokenizer, self.cfg.task)
            cached = {
                "uid": s.uid,
                "prompt_ids": list(ids),
                "prompt_text": self.tokenizer.decode(ids, skip_special_tokens=False),
                "data_source": s.data_source,
                "ground_truth": s.ground_truth,
            }
            self._prompt_cache[s.uid] = cached
        return cached

    def generate(
        self,
        samples: list[Sample],
        *,
        n: int,
        temperature: float,
        seed: int | None,
        on_worker_done: Any = None,
    ) -> list[Rollout]:
        """Split prompts over the rollout workers; rollouts come back grouped in prompt order.

        on_worker_done(rollouts): called with each worker's rollouts as soon as that worker returns (first
        finished, first called), e.g. to queue their PRM scoring while the other workers still generate.
        """
        import ray

        r = self.cfg.rollout
        prompts = [self._prompt(s) for s in samples]
        shards = [prompts[i :: len(self.workers)] for i in range(len(self.workers))]
        kwargs = {"n": n, "max_new_tokens": r.max_new_tokens, "temperature": temperature, "top_p": r.top_p}
        refs = {
            i: self.workers[i].generate.remote(shard, **kwargs, seed=None if seed is None else seed + i)
            for i, shard in enumerate(shards)
            if shard
        }
        by_group: dict[str, list[Rollout]] = {}
        pending = {ref: i for i, ref in refs.items()}
        while pending:
            # the first worker to finish; none within the timeout: wait on the oldest (which times out)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.cfg.trainer.call_timeout_s)
            ref = ready[0] if ready else next(iter(pending))
            i = pending.pop(ref)
            out = self._call_worker(
                i,
                ref,
                lambda w, i=i: w.generate.remote(
                    shards[i], **kwargs, seed=None if seed is None else seed + i
                ),
                what=f"generate ({len(shards[i])} prompts)",
            )
            if on_worker_done is not None:
                on_worker_done(out)
            for ro in out:
                by_group.setdefault(ro.group, []).append(ro)
        return [ro for p in prompts for ro in by_group[p["uid"]]]

    def verify(self, rollouts: list[Rollout]) -> None:
        """Attach verifier scores to each rollout (`outcome`); a 0 with a reason keeps it in `outcome_info`
        (`VerifyResult.info`: "rejected" when the sample was judged, "unscored" when the verifier could not)."""
        from rlloop.rewards.verifiers.base import VerifyRequest

        requests = [
            VerifyRequest(
                uid=ro.uid,
                data_source=ro.data_source,
                solution_str=ro.text,
                ground_truth=ro.ground_truth,
                prompt=ro.prompt_text,
                extra=dict(sample.extra) if sample else {},
                raw_prompt=sample.prompt if sample else None,
            )
            for ro in rollouts
            for sample in [self._samples.get(ro.group)]
        ]
        for ro, res in zip(rollouts, self.verifier.score(requests)):
            ro.outcome = {"correct": float(res.score), **{k: float(v) for k, v in res.scores.items()}}
            ro.outcome_info = res.info()

    def score(
        self,
        rollouts: list[Rollout],
        batch: Batch,
        prm_out: list[dict] | None,
        token_scores: torch.Tensor | None = None,
        *,
        kl_rewards: torch.Tensor | None = None,
        kl_coef: float = 0.0,
    ) -> dict[str, float]:
        """Fuse verifier and PRM scores into batch.token_rewards / advantages / returns.

        reward.fusion=outcome: one scalar per rollout, R = w_rule*outcome + w_prm*g(V before the answer
        step) (TDRM's release), placed on the last token, then the configured advantage estimator.
        reward.fusion=step: PRM step rewards at each step's last token plus the outcome at the last
        token, each normalised on its own (rlloop.algos.fusion.step_fusion).
        reward.fusion=token: w_rule*outcome on the last token + w_token*r_t of the token source
        (`token_scores` [B, T], Q-RM or implicit PRM; token_norm=std divides r_t by its std over the
        batch's response tokens), then the configured advantage estimator.
        reward.fusion=min: PURE's min-form credit (rlloop.algos.fusion.min_fusion): softmin-weighted step
        rewards with leave-one-out baselines plus w_rule times the verifiable reward.
        reward.fusion=prime: PRIME's leave-one-out advantages per source (outcome, implicit-PRM r_t),
        summed with weights w_rule / w_token and whitened (rlloop.rewards.implicit_prm.prime_advantages).
        kl_rewards [B, T] (algo.kl_in_reward: -kl_coef * kl_t, from `kl_in_reward`) join the token rewards before the
        advantage estimator; fusions that compute advantages without one (step without a critic, min,
        prime) take none (validate.py refuses the combination).
        algo.advantage=gdpo gets each reward source as its own column (`gdpo_components`), normalised
        within the group apart from the others, rather than their sum.
        Returns metrics: per-source statistics and the mean fused reward before any KL penalty
        (`reward/total`).
        """
        from rlloop.algos.advantages import compute_advantages
        from rlloop.algos.fusion import (
            first_error_fusion,
            fusion_stats,
            min_fusion,
            outcome_fusion,
            place_on_last_token,
            prm_transform,
            step_fusion,
            step_token_rewards,
            token_fusion,
            value_before_answer_step,
        )
        from rlloop.algos.sampling import overlong_penalty
        from rlloop.rewards.implicit_prm import prime_advantages

        rw, a = self.cfg.reward, self.cfg.algo
        mask = torch.from_numpy(batch.response_mask)
        group_ids = group_index([ro.group for ro in rollouts])
        outcome = torch.tensor([ro.outcome["correct"] for ro in rollouts], dtype=torch.float32)
        metrics: dict[str, float] = {}
        values = None if batch.values is None else torch.from_numpy(batch.values)  # the critic's (gae)

        # gdpo: each source of the reward [B] with the weight it has in the fused sum
        components: dict[str, tuple[torch.Tensor, float]] = {"correct": (outcome, rw.w_rule)}
        trained: dict[str, torch.Tensor] = {}  # the token rewards the estimator saw, KL penalty included

        def advantages(token_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if kl_rewards is not None:
                token_rewards = token_rewards + kl_rewards
                components["kl"] = (-kl_rewards.sum(-1) / kl_coef, -kl_coef)  # sum_t kl_t, weight -beta
            trained["token_rewards"] = token_rewards
            extra = gdpo_components(components) if a.advantage == "gdpo" else {}
            return compute_advantages(
                a.advantage, token_rewards, mask, group_ids, values=values, gamma=a.gamma, lam=a.lam, eps=a.adv_eps,
                **extra,
            )  # fmt: skip

        if a.overlong_buffer > 0:
            lengths = torch.tensor([len(ro.response_ids) for ro in rollouts])
            penalty = overlong_penalty(
                lengths, self.cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty
            )
            components["overlong"] = (penalty, rw.w_rule)
            outcome = outcome + penalty
            metrics["reward/overlong_penalty"] = float(penalty.mean())
        if rw.w_format > 0:
            fmt = torch.tensor(format_scores(rollouts), dtype=torch.float32)
            components["format"] = (fmt, rw.w_rule * rw.w_format)
            outcome = outcome + rw.w_format * fmt
            metrics["reward/format_bonus"] = float(rw.w_format * fmt.mean())
        steps = self._step_tensors(rollouts, prm_out) if prm_out is not None else None
        if rw.fusion == "outcome":
            prm_value = None
            if steps is not None:
                prm_value = value_before_answer_step(
                    steps["values"], steps["mask"], steps["answer_step"], steps["prompt_value"]
                )
                metrics["reward/prm_value"] = float(prm_value.mean())
                components["prm"] = (prm_transform(prm_value, rw.prm.g), rw.w_prm)
            total = outcome_fusion(
                outcome, prm_value, w_rule=rw.w_rule, w_prm=rw.w_prm, g=rw.prm.g, metrics=metrics
            )
            token_rewards = place_on_last_token(total, mask)
            adv, ret = advantages(token_rewards)
        elif rw.fusion in ("step", "min", "first_error"):
            if steps is None:
                raise RlloopError(f"reward.fusion={rw.fusion} needs the PRM: set reward.prm.enabled=true")
            positions = steps["ends"] + torch.tensor([len(ro.prompt_ids) for ro in rollouts])[:, None]
            step_args = (outcome, steps["values"], positions * steps["mask"].long(), steps["mask"], mask, group_ids)
            # these fusions give advantages directly; the learner's token rewards are the outcome alone
            token_rewards = place_on_last_token(outcome, mask)
            total = outcome
            if rw.fusion == "min":
                adv, ret = min_fusion(*step_args, w_rule=rw.w_rule, w_prm=rw.w_prm, temperature=rw.min_temperature,
                                      metrics=metrics)  # fmt: skip
            elif rw.fusion == "first_error":
                adv, ret = first_error_fusion(*step_args, w_prm=rw.w_prm, threshold=rw.first_error_threshold,
                                              eps=a.adv_eps, metrics=metrics)  # fmt: skip
            else:
                step_kw = {
                    "w_rule": rw.w_rule,
                    "w_prm": rw.w_prm,
                    "gamma": a.gamma,
                    "process": rw.step_process,
                    "prompt_value": steps["prompt_value"],
                    "metrics": metrics,
                }
                if values is not None:  # gae: raw step rewards as token rewards, credited through the critic
                    token_rewards = step_token_rewards(*step_args, **step_kw)
                    adv, ret = advantages(token_rewards)
                    total = token_rewards.sum(-1)
                else:
                    adv, ret = step_fusion(*step_args, norm=rw.step_norm, eps=a.adv_eps, **step_kw)
        elif token_scores is None:
            raise RlloopError(
                f"reward.fusion={rw.fusion!r} needs a token-reward source, which is not configured"
            )
        elif rw.fusion == "token":
            components["token"] = ((token_scores * mask).sum(-1), rw.w_token)
            token_rewards = token_fusion(
                outcome,
                token_scores,
                mask,
                w_rule=rw.w_rule,
                w_token=rw.w_token,
                token_norm=rw.token_norm,
                metrics=metrics,
            )
            adv, ret = advantages(token_rewards)
            total = token_rewards.sum(-1)
        else:  # prime
            adv, ret = prime_advantages(
                outcome, token_scores, mask, group_ids, w_rule=rw.w_rule, w_process=rw.w_token, eps=a.adv_eps
            )
            token_sum = (token_scores * mask).sum(-1)
            stats = fusion_stats({"outcome": outcome, "token_sum": token_sum}, outcome)
            metrics.update({f"fusion/{k}": v for k, v in stats.items()})
            token_rewards = rw.w_rule * place_on_last_token(outcome, mask) + rw.w_token * token_scores * mask
            total = rw.w_rule * outcome + rw.w_token * token_sum
        if kl_rewards is not None and not trained:
            raise RlloopError(f"algo.kl_in_reward: reward.fusion={rw.fusion} takes no token rewards")
        token_rewards = trained.get("token_rewards", token_rewards)
        batch.token_rewards = token_rewards.numpy().astype(np.float32)
        batch.advantages = adv.numpy().astype(np.float32)
        batch.returns = ret.numpy().astype(np.float32)
        metrics["reward/total"] = float(total.mean())
        if values is not None:
            metrics.update(critic_metrics(values, ret, mask))
        return metrics

    def _score_tokens(
        self, rollouts: list[Rollout], batch: Batch, timer: StepTimer
    ) -> tuple[torch.Tensor | None, dict[str, float], Any]:
        """Per-token rewards [B, T] of the configured token source (None without one), their metrics
        (`<source>/token_mean|std` over response tokens, raw), and the implicit PRM's online update,
        already queued behind the scoring call (the actor runs calls in order: it scores with π_φ as it
        was, then learns from these outcomes while the policy trains)."""
        from rlloop.algos.fusion import place_response_rewards

        if self.qrm is None and self.implicit_prm is None:
            return None, {}, None
        mask = torch.from_numpy(batch.response_mask)
        update = None
        with timer.phase("token_rewards"):
            if self.qrm is not None:
                source = "qrm"
                values = self._call_actor(
                    "Q-RM service",
                    lambda: self.qrm,
                    self.qrm.score_rollouts.remote(rollouts),
                    lambda a: a.score_rollouts.remote(rollouts),
                    what=f"score ({len(rollouts)} rollouts)",
                    restore=lambda: None,  # frozen: a restarted service reloads the same weights
                )
                for ro, v in zip(rollouts, values, strict=True):
                    if len(v) != len(ro.response_ids):
                        raise RlloopError(
                            f"rollout {ro.uid}: the Q-RM returned {len(v)} token rewards for "
                            f"{len(ro.response_ids)} response tokens"
                        )
                scores = place_response_rewards(values, mask)
            else:
                source = "implicit_prm"
                import ray

                batch_ref = ray.put(batch)
                scores = torch.from_numpy(
                    self._call_actor(
                        "implicit PRM",
                        lambda: self.implicit_prm,
                        self.implicit_prm.token_rewards.remote(batch_ref),
                        lambda a: a.token_rewards.remote(batch_ref),
                        what=f"token_rewards ({len(rollouts)} rollouts)",
                        restore=self._restore_implicit_prm,
                    )
                )
                if self.cfg.reward.implicit_prm.online:
                    update = self.implicit_prm.update.remote(batch_ref, self._implicit_prm_labels(rollouts))
        for ro, row, m in zip(rollouts, scores, mask):
            ro.token_rewards = row[m > 0].tolist()
        on = scores[mask > 0]
        metrics = {
            f"{source}/token_mean": float(on.mean()) if on.numel() else float("nan"),
            f"{source}/token_std": float(on.std()) if on.numel() > 1 else float("nan"),
        }
        return scores, metrics, update

    @staticmethod
    def _implicit_prm_labels(rollouts: list[Rollout]) -> np.ndarray:
        """The verified outcome of each rollout as the implicit PRM's CE target, which must lie in [0, 1]."""
        labels = np.array([ro.outcome["correct"] for ro in rollouts], dtype=np.float32)
        bad = np.flatnonzero(~((labels >= 0) & (labels <= 1)))
        if bad.size:
            ro = rollouts[int(bad[0])]
            raise RlloopError(
                f"rollout {ro.uid}: verifier score {ro.outcome['correct']} is outside [0, 1]; the implicit "
                "PRM learns from σ(β Σ r_t) against the outcome, so its verifier must score in [0, 1]"
            )
        return labels

    def _prime_filter(
        self, rollouts: list[Rollout], prm_out: list[dict] | None
    ) -> tuple[list[Rollout], list[dict] | None, dict[str, float]]:
        """PRIME's prompt filter: keep groups whose mean outcome lies in [filter_low, filter_high]."""
        from rlloop.rewards.implicit_prm import prime_prompt_filter

        ip = self.cfg.reward.implicit_prm
        if not ip.prompt_filter or not rollouts:
            return rollouts, prm_out, {}
        group_ids = group_index([ro.group for ro in rollouts])
        outcome = torch.tensor([ro.outcome["correct"] for ro in rollouts], dtype=torch.float32)
        keep = prime_prompt_filter(outcome, group_ids, ip.filter_low, ip.filter_high).tolist()
        n_groups = len(set(group_ids.tolist()))
        kept = [ro for ro, k in zip(rollouts, keep) if k]
        stats = {"implicit_prm/filtered_frac": 1.0 - len({ro.group for ro in kept}) / max(n_groups, 1)}
        if prm_out is not None:
            prm_out = [o for o, k in zip(prm_out, keep) if k]
        return kept, prm_out, stats

    def _restore_implicit_prm(self) -> None:
        """A restarted implicit PRM reloads its initial weights; give it back its latest π_φ (its
        optimizer state starts afresh, as the online PRM's)."""
        if self._implicit_prm_weights_ref is not None:
            self._get(
                self.implicit_prm.load_state_numpy.remote(self._implicit_prm_weights_ref),
                "implicit PRM reload",
            )

    def _oracle_step_values(self, rollouts: list[Rollout]) -> list[dict]:
        """reward.prm.oracle: a perfect PRM's outputs from the task's exact step checker (V_k = 1 before
        the first wrong step, 0 from it on; the prompt's value 1), in the PRM service's format."""
        from rlloop.tasks import BUILTIN

        task = BUILTIN[self.cfg.task.name]
        if not hasattr(self, "_samples_by_uid"):
            self._samples_by_uid = {s.uid: s for s in self.train_set + self.test_set}
        out = []
        for ro in rollouts:
            values = task.oracle_step_values(self._samples_by_uid[ro.group], ro.text)
            if len(values) != len(ro.step_ends):
                raise RlloopError(
                    f"rollout {ro.uid}: the step checker found {len(values)} steps, the rollout "
                    f"{len(ro.step_ends)}; reward.prm.oracle needs rollout.step_delimiter={task.STEP_DELIMITER!r}"
                )
            out.append({"step_values": values, "prompt_value": 1.0})
        return out

    @staticmethod
    def _step_tensors(rollouts: list[Rollout], prm_out: list[dict]) -> dict[str, torch.Tensor]:
        """Padded [B, K] step values/ends/mask, prompt values [B] and the answer step [B] (-1: none)."""
        B, K = len(rollouts), max(1, max(len(o["step_values"]) for o in prm_out))
        values = torch.zeros(B, K)
        ends = torch.zeros(B, K, dtype=torch.long)
        step_mask = torch.zeros(B, K)
        answer_steps = torch.full((B,), -1, dtype=torch.long)
        for b, (ro, out) in enumerate(zip(rollouts, prm_out)):
            v = out["step_values"]
            if len(v) != len(ro.step_ends):
                raise RuntimeError(
                    f"rollout {ro.uid}: PRM returned {len(v)} step values for {len(ro.step_ends)} steps"
                )
            ro.step_values = list(v)
            values[b, : len(v)] = torch.tensor(v, dtype=torch.float32)
            ends[b, : len(v)] = torch.tensor(ro.step_ends, dtype=torch.long)
            step_mask[b, : len(v)] = 1.0
            answer_steps[b] = answer_step(ro)
        prompt_value = torch.tensor([float(o["prompt_value"]) for o in prm_out])
        return {
            "values": values,
            "ends": ends,
            "mask": step_mask,
            "answer_step": answer_steps,
            "prompt_value": prompt_value,
        }

    def _call_worker(self, i: int, ref: Any, reissue: Any, *, what: str) -> Any:
        """Result of rollout worker i's call `ref`, surviving the worker's death (see _call_actor)."""
        return self._call_actor(
            f"rollout worker {i}",
            lambda: self.workers[i],
            ref,
            reissue,
            what=what,
            restore=lambda: self._restore_worker(i),
        )

    def _call_actor(self, name: str, actor: Any, ref: Any, reissue: Any, *, what: str, restore: Any) -> Any:
        """Result of a call `ref` on `actor()`. If the actor died (or hung past trainer.call_timeout_s),
        Ray restarts it (max_restarts), `restore()` brings its state back (current policy weights), and
        `reissue(actor)` runs the same work again, so no prompt is lost and none is counted twice."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        limit = self.cfg.trainer.max_actor_restarts
        for attempt in range(limit + 1):
            try:
                return ray.get(ref, timeout=self.cfg.trainer.call_timeout_s)
            except (RayActorError, GetTimeoutError) as err:
                if attempt == limit:
                    raise RuntimeError(f"{name}: {what} failed after {attempt} restarts: {err}") from err
                hung = isinstance(err, GetTimeoutError)
                logger.warning(
                    "%s %s during %s at step %d; restarting it and re-issuing its work",
                    name,
                    "hung" if hung else "died",
                    what,
                    self.step + 1,
                )
                if hung:
                    ray.kill(actor(), no_restart=False)
                self.restarts[name] = self.restarts.get(name, 0) + 1
                _wait_ready(actor(), self.cfg.trainer.call_timeout_s)
                restore()
                ref = reissue(actor())
        raise AssertionError("unreachable")

    def _restore_worker(self, i: int) -> None:
        """Load the current policy version into a restarted rollout worker."""
        from rlloop.distributed.weight_sync import send_buckets

        if self._weights_refs is None:
            return  # still at the initial weights, which the restarted process loaded itself
        version = self._get(
            send_buckets(self.workers[i], self._weights_refs, self.policy_version),
            f"rollout worker {i} weight buckets after restart",
        )[-1]
        if version != self.policy_version:
            raise RuntimeError(
                f"rollout worker {i} restored to version {version}, expected {self.policy_version}"
            )

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of the whole run at the current step (see rlloop.checkpoint)."""
        self._quiesce()
        # async: prompts already drawn for batches not yet trained on are drawn again after a resume
        queued = self.pipeline.drain() if self.pipeline is not None else []
        stream = (
            queued[0]["stream"]
            if queued
            else {"epoch": self.stream.epoch, "pos": self.stream.pos, "seed": self.stream.seed}
        )
        tmp = checkpoint.begin(self.ckpt_root, self.step)
        self.learner.save_checkpoint(str(tmp / "learner"))
        if self.critic is not None:
            self.critic.save_checkpoint(str(tmp / "critic"))
        if self.prm is not None and self.cfg.reward.prm.online:
            self._get(self.prm.save.remote(str(tmp / "prm")), "PRM save")
        if self.implicit_prm is not None and self.cfg.reward.implicit_prm.online:
            self._save_implicit_prm(tmp / "implicit_prm")
        state = {
            "step": self.step,
            "policy_version": self.policy_version,
            "prm_version": self._prm_version,
            "stream": stream,
            "trained_groups": self.trained_groups,
            "restarts": self.restarts,
            "kl_coef": self.kl_ctl.value,  # adaptive KL: the coefficient as it has moved so far
            "model_fingerprint": checkpoint.model_fingerprint(self.model_path),
            "model_path": self.model_path,
        }
        return checkpoint.commit(tmp, state, self.model_path, keep_last=self.cfg.trainer.keep_last)

    def _save_implicit_prm(self, path: Path) -> None:
        """π_φ as an HF causal-LM folder with the policy's tokenizer (reloadable as implicit_prm.path)."""
        self._get(self.implicit_prm.save.remote(str(path)), "implicit PRM save")
        self.tokenizer.save_pretrained(str(path))

    def _restore(self, path: Path, state: dict) -> None:
        """Continue from a checkpoint: learner (weights + optimizer), data position, versions, workers."""
        version = self.learner.load_checkpoint(str(path / "learner"))
        if self.critic is not None:
            if not (path / "critic").is_dir():
                raise RlloopError(
                    f"{path}: no critic state to resume algo.advantage=gae from (was the run started with another "
                    "algo.advantage?); resume with that config, or start afresh"
                )
            self.critic.load_checkpoint(str(path / "critic"))
        self.step = int(state["step"])
        self.policy_version = int(state["policy_version"])
        self._prm_version = int(state.get("prm_version", 0))
        if self.prm_pool is not None:  # the replicas loaded the checkpoint's PRM; they continue its version
            self._get(
                [a.load_state_numpy.remote({}, self._prm_version) for a in self.prm_pool.actors],
                "PRM version (resume)",
            )
        self.stream.seed = int(state["stream"]["seed"])
        self.stream.epoch = int(state["stream"]["epoch"])
        self.stream._order = self.stream._shuffle()
        self.stream.pos = int(state["stream"]["pos"])
        self.trained_groups = list(state.get("trained_groups", []))
        self.restarts = dict(state.get("restarts", {}))
        self.kl_ctl.value = float(state.get("kl_coef", self.kl_ctl.value))
        self.sync_weights(version=self.policy_version)
        versions = self._get([w.get_policy_version.remote() for w in self.workers], "policy versions")
        logger.info(
            "resumed from %s: step %d, policy version %d (learner optimizer steps %d), workers at %s",
            path,
            self.step,
            self.policy_version,
            version,
            versions,
        )

    def _prm_trainer_kwargs(self) -> dict:
        p = self.cfg.reward.prm
        return {
            "lr": p.lr,
            "td": p.td,
            "gamma": p.gamma,
            "n": p.n,
            "lam": p.lam,
            "ema": p.ema,
            "micro_batch_size": p.micro_batch_size,
        }

    def _restore_prm(self, i: int = 0) -> None:
        """A restarted PRM replica reloads its initial weights; in online mode it gets the latest weights
        back, and the trainer replica (0) its TD trainer (whose optimizer state starts afresh)."""
        actor = self.prm_pool.actors[i]
        if self.cfg.reward.prm.online and i == 0:
            self._get(
                actor.enable_online.remote(**self._prm_trainer_kwargs()), "PRM enable_online after restart"
            )
        if self._prm_weights_ref is not None:
            self._get(actor.load_state_numpy.remote(self._prm_weights_ref, self._prm_version), "PRM reload")

    def _call_prm(self, i: int, ref: Any, reissue: Any, what: str) -> Any:
        """Result of PRM replica i's call, surviving the replica's death (see _call_actor)."""
        return self._call_actor(
            self.prm_pool.name(i),
            lambda: self.prm_pool.actors[i],
            ref,
            reissue,
            what=what,
            restore=lambda: self._restore_prm(i),
        )

    def sync_weights(self, *, version: int | None = None, wait: bool = True) -> dict[str, float]:
        """Push the learner's weights to every rollout worker as policy `version` (default: the next one),
        bucketed (learner.sync_bucket_mb) and versioned (rlloop.distributed.weight_sync). wait=False
        returns once every bucket is queued; `finish_sync` then confirms the workers' loads (async mode:
        a worker busy generating the next batch loads after it). Returns sync/buckets, sync/mb."""
        from rlloop.distributed.weight_sync import push_weights

        self.finish_sync()
        lc = self.cfg.learner
        version = self.policy_version + 1 if version is None else int(version)
        result = push_weights(
            self.learner, self.workers, version, bucket_mb=lc.sync_bucket_mb, timeout_s=lc.sync_timeout_s
        )
        # a worker restarted from here on is restored to this version (_restore_worker)
        self.policy_version, self._weights_refs = version, result.bucket_refs
        self._pending_sync = result
        if wait:
            self.finish_sync()
        return result.metrics()

    def finish_sync(self) -> None:
        """Wait until every worker serves the last pushed version (WeightSyncError naming the worker and
        bucket on a timeout); a worker that died mid-sync is restarted and restored to it."""
        from rlloop.distributed.weight_sync import wait_loaded

        result, self._pending_sync = self._pending_sync, None
        if result is None:
            return

        def on_dead(i: int, err: Exception) -> int:
            return self._call_worker(
                i, result.pending[i][-1], lambda w: w.get_policy_version.remote(), what="weight sync"
            )

        wait_loaded(result, timeout_s=self.cfg.learner.sync_timeout_s, on_dead=on_dead)

    def sync_probe(self) -> dict[str, float]:
        """`sync/probe_logprob_mismatch`: every rollout worker samples a small fixed probe batch (the first
        held-out prompts, fixed seed) and the learner scores the same tokens; the mean |difference| of
        their logprobs over response tokens, the worst worker's. Near 0 when the sync was exact (float
        noise, or the bf16/vLLM kernels' own mismatch); a wrong or partial sync shows as a jump."""
        r = self.cfg.rollout
        self.finish_sync()
        samples = (self.test_set or self.train_set)[:4]
        prompts = [self._prompt(s) for s in samples]
        gen = {"n": 1, "max_new_tokens": min(16, r.max_new_tokens), "temperature": r.temperature}
        outs = self._get(
            [w.generate.remote(prompts, **gen, seed=self.cfg.trainer.seed) for w in self.workers],
            "sync probe",
        )
        flat = [ro for out in outs for ro in out]
        stale = sorted({ro.policy_version for ro in flat} - {self.policy_version})
        if stale:
            raise RuntimeError(f"sync probe: workers serve versions {stale}, expected {self.policy_version}")
        batch = build_batch(flat, self.pad_id)
        diff = np.abs(self.learner.compute_logprobs(batch, "policy") - batch.rollout_logprobs)
        mask = batch.response_mask > 0
        per_worker, start = [], 0
        for out in outs:
            rows = slice(start, start + len(out))
            start += len(out)
            per_worker.append(float(diff[rows][mask[rows]].mean()) if mask[rows].any() else 0.0)
        return {"sync/probe_logprob_mismatch": max(per_worker)}

    # ---------------------------------------------------------------- the loop
    def _sample_round(
        self,
        samples: list[Sample],
        timer: StepTimer,
        seed: int,
        prm_stats: dict | None = None,
        after_verify: Callable[[list[Rollout]], None] | None = None,
    ) -> tuple[list[Rollout], list[dict] | None]:
        """Generate n samples per prompt, then verify while the PRM scores them.

        Each rollout worker's share is queued on the PRM replicas as soon as that worker returns, so
        scoring overlaps the other workers' generation and the verification; `time/prm_wait` is what the
        loop still blocks on the PRM afterwards, `time/prm` the replicas' scoring seconds (summed).
        `after_verify(rollouts)` runs before that wait (train_step starts the reference-logprob pass there,
        so the learner ranks work while the PRM scores).
        """
        r = self.cfg.rollout
        submitted: list[tuple[list[Rollout], Any]] = []

        def submit(out: list[Rollout]) -> None:
            submitted.append(
                (
                    out,
                    self.prm_pool.submit(
                        [ro.prompt_text for ro in out],
                        [ro.text for ro in out],
                        [ro.step_char_ends for ro in out],
                        weights=[len(ro.prompt_ids) + len(ro.response_ids) for ro in out],
                    ),
                )
            )

        with timer.phase("generate"):
            rollouts = self.generate(
                samples,
                n=r.n,
                temperature=r.temperature,
                seed=seed,
                on_worker_done=submit if self.prm_pool is not None else None,
            )
        with timer.phase("verify"):
            self.verify(rollouts)
        if after_verify is not None:
            after_verify(rollouts)
        if self.prm_pool is None:
            return rollouts, (self._oracle_step_values(rollouts) if self.cfg.reward.prm.oracle else None)
        by_rollout: dict[int, dict] = {}
        prm_stats = self._prm_stats if prm_stats is None else prm_stats
        with timer.phase("prm_wait"):
            for out, pending in submitted:
                results, stats = self.prm_pool.gather(pending)
                by_rollout.update({id(ro): res for ro, res in zip(out, results, strict=True)})
                timer.seconds["prm"] = timer.seconds.get("prm", 0.0) + stats.pop("seconds")
                for key, value in stats.items():  # tokens, padded_tokens, batches of this step
                    prm_stats[key] = prm_stats.get(key, 0.0) + value
        return rollouts, [by_rollout[id(ro)] for ro in rollouts]

    def collect(
        self,
        timer: StepTimer,
        *,
        step: int | None = None,
        prm_stats: dict | None = None,
        after_verify: Callable[[list[Rollout]], None] | None = None,
    ) -> tuple[list[Rollout], list[dict] | None, dict[str, float]]:
        """One step's rollouts; with algo.dynamic_sampling, groups whose outcomes all tie are dropped
        and refilled by up to dynamic_sampling_max_rounds extra rounds (DAPO). `step`: the training
        step they are for (default the next); `prm_stats`: where PRM packing counts go (default
        self._prm_stats) — both given by the async producer thread. `after_verify`: see _sample_round
        (first round only)."""
        from rlloop.algos.sampling import filter_tied_groups, select_groups

        cfg, a = self.cfg, self.cfg.algo
        want = cfg.rollout.prompts_per_step
        seed = cfg.trainer.seed * 7919 + (self.step if step is None else step - 1) * 101
        rollouts, prm_out = self._sample_round(
            self.stream.take(want), timer, seed, prm_stats, after_verify=after_verify
        )
        if not a.dynamic_sampling:
            return rollouts, prm_out, {}
        kept_ro: list[Rollout] = []
        kept_prm: list[dict] = []
        drawn = dropped = 0
        for round_ in range(a.dynamic_sampling_max_rounds + 1):
            if round_ > 0:
                missing = want - len({ro.group for ro in kept_ro})
                if missing <= 0:
                    break
                rollouts, prm_out = self._sample_round(
                    self.stream.take(missing), timer, seed + round_, prm_stats
                )
            group_ids = group_index([ro.group for ro in rollouts])
            outcome = torch.tensor([ro.outcome["correct"] for ro in rollouts])
            keep, _ = filter_tied_groups(outcome, group_ids, keep_singletons=False)
            n_groups = len(set(group_ids.tolist()))
            drawn += n_groups
            dropped += n_groups - len(set(group_ids[keep].tolist()))
            idx = keep.nonzero().flatten().tolist()
            kept_ro += [rollouts[i] for i in idx]
            if prm_out is not None:
                kept_prm += [prm_out[i] for i in idx]
        if kept_ro:
            rows = select_groups(
                torch.ones(len(kept_ro), dtype=torch.bool), group_index([ro.group for ro in kept_ro]), want
            )
            kept_ro = [kept_ro[i] for i in rows.tolist()]
            kept_prm = [kept_prm[i] for i in rows.tolist()] if kept_prm else []
        stats = {
            "dynamic_sampling/dropped_frac": dropped / max(drawn, 1),
            "dynamic_sampling/groups": float(len({ro.group for ro in kept_ro})),
        }
        return kept_ro, (kept_prm if prm_out is not None else None), stats

    def train_step(self) -> dict[str, float]:
        cfg, timer = self.cfg, StepTimer()
        t_step = time.perf_counter()
        self._prm_stats: dict[str, float] = {}
        early: dict[str, Any] = {}
        if self.pipeline is None:
            rollouts, prm_out, sampling_stats = self.collect(timer, after_verify=self._early_ref(early))
        else:
            rollouts, prm_out, sampling_stats = self._collect_async(timer)
        rollouts, prm_out, filter_stats = self._prime_filter(rollouts, prm_out)
        sampling_stats.update(filter_stats)
        self.step += 1
        base = {"prompts_seen": float(self.stream_seen()), **sampling_stats}
        if not rollouts:
            # Every group tied and no refill found a signal: nothing to learn from this step.
            logger.warning("step %d: every group's rewards tie; skipping the update", self.step)
            timer.seconds["step"] = time.perf_counter() - t_step
            return {
                **base,
                "reward/total": float("nan"),
                "accuracy": float("nan"),
                "skipped": 1.0,
                **timer.metrics(),
                **step_overhead(timer.seconds),
            }
        prm_update = None
        if self.prm is not None and cfg.reward.prm.online:
            # Actor-critic: the PRM takes a TD step on these verified rollouts while the policy updates.
            prm_update = self.prm.td_update.remote(
                [ro.prompt_text for ro in rollouts],
                [ro.text for ro in rollouts],
                [ro.step_char_ends for ro in rollouts],
                [ro.outcome["correct"] for ro in rollouts],
            )
        if early.get("rollouts") is rollouts:  # the reference pass already runs on this batch
            batch = early["batch"]
        else:
            batch = build_batch(rollouts, self.pad_id)
            if "ref" in early:  # filtered since: collect the stale pass (errors surface), then redo it
                self.learner.gather_logprobs(early.pop("ref"))
        # gae: the critic's values of this batch, and the reference pass on the learner ranks, computed
        # while the token sources score it
        values_pending = self.critic.submit_values(batch) if self.critic is not None else None
        ref_pending = early.get("ref")
        if ref_pending is None and self.use_ref:
            ref_pending = self.learner.submit_logprobs(batch, "ref")
        token_scores, token_metrics, implicit_prm_update = self._score_tokens(rollouts, batch, timer)
        if values_pending is not None:
            with timer.phase("critic_values"):
                batch.values = self.critic.gather_values(values_pending)
        with timer.phase("logprobs"):
            if not self._fused_old_logprobs:
                batch.old_logprobs = self.learner.compute_logprobs(batch, "policy")
            if ref_pending is not None:
                batch.ref_logprobs = self.learner.gather_logprobs(ref_pending)
        kl_rewards, kl_metrics = self.kl_in_reward(batch)
        fusion_metrics = {
            **token_metrics,
            **kl_metrics,
            **self.score(
                rollouts, batch, prm_out, token_scores, kl_rewards=kl_rewards, kl_coef=kl_metrics.get("algo/kl_coef", 0.0)
            ),
        }
        with timer.phase("learner"):
            # the critic (its own processes) regresses toward the GAE returns while the policy updates
            critic_pending = self.critic.submit_train_step(batch) if self.critic is not None else None
            learner_metrics = self.learner.train_step(batch)
            if critic_pending is not None:
                learner_metrics.update(self.critic.gather_train_step(critic_pending))
        with timer.phase("sync"):
            # async: the workers load the buckets after the batch they are generating (finish_sync)
            sync_metrics = self.sync_weights(wait=self.pipeline is None)
        every = cfg.learner.sync_probe_every
        if every and self.step % every == 0:
            with timer.phase("sync_probe"):
                sync_metrics.update(self.sync_probe())
        prm_metrics: dict[str, float] = {}
        if prm_update is not None:
            with timer.phase("prm_update"):
                prm_metrics = self._get(prm_update, "PRM service td_update")
                self._prm_version = int(prm_metrics.get("prm/version", self._prm_version))
                self._prm_weights_ref = self.prm.state_dict_numpy.remote()
                if len(self.prm_pool.actors) > 1:  # the other replicas score the next batch with these
                    self.prm_pool.broadcast(self._prm_weights_ref, self._prm_version)
        if self._prm_stats.get("padded_tokens"):
            tokens, padded = self._prm_stats["tokens"], self._prm_stats["padded_tokens"]
            prm_metrics.update(
                {
                    "prm/tokens": tokens,
                    "prm/pad_frac": 1.0 - tokens / padded,
                    "prm/batches": self._prm_stats["batches"],
                }
            )
        if implicit_prm_update is not None:
            with timer.phase("implicit_prm_update"):
                prm_metrics.update(self._get(implicit_prm_update, "implicit PRM update"))
                self._implicit_prm_weights_ref = self.implicit_prm.state_dict_numpy.remote()
        self.trained_groups += list(dict.fromkeys(ro.group for ro in rollouts))
        timer.seconds["step"] = time.perf_counter() - t_step
        timing = {**timer.metrics(), **step_overhead(timer.seconds)}
        lengths = np.array([len(ro.response_ids) for ro in rollouts], dtype=np.float32)
        # learner vs rollout engine logprobs on the sampled tokens, measured by the update itself
        mismatch = learner_metrics.pop("actor/rollout_logprob_mismatch", 0.0)
        self._last_rollouts = rollouts
        return {
            **base,
            "reward/rule": float(np.mean([ro.outcome["correct"] for ro in rollouts])),
            "accuracy": float(np.mean([ro.outcome["correct"] >= 1.0 for ro in rollouts])),
            "response_length/mean": float(lengths.mean()),
            "response_length/clip_frac": float(np.mean([ro.finish_reason == "length" for ro in rollouts])),
            "rollout/policy_version": float(min(ro.policy_version for ro in rollouts)),
            "rollout/logprob_mismatch": float(mismatch),
            "kl": float(learner_metrics.get("actor/kl_ref", 0.0)),
            "entropy": float(learner_metrics.get("actor/entropy", float("nan"))),
            **verifier_metrics(rollouts),
            "faults/actor_restarts": float(sum(self.restarts.values())),
            **{f"reward/{k}": v for k, v in _extra_scores(rollouts).items()},
            **fusion_metrics,
            **prm_metrics,
            **learner_metrics,
            **sync_metrics,
            **timing,
        }

    def kl_in_reward(self, batch: Batch) -> tuple[torch.Tensor | None, dict[str, float]]:
        """algo.kl_in_reward: the KL penalty -beta * kl_t per response token [B, T] (None when off), for
        score() to add to the token rewards before the advantages, and its metrics.

        kl_t is algo.kl_estimator of log pi_old(y_t) - log pi_ref(y_t). pi_old is batch.old_logprobs when
        the update recomputes them; a one-epoch update (algo.old_logprobs=auto) takes them from its own
        forward, after this point, so the rollout engine's logprobs stand in: the same weights in sync mode
        (their gap is rollout/logprob_mismatch), the sampling policy in async mode. beta is the KL
        controller's value, updated once per step from this batch's KL (adaptive with algo.kl_target).
        Metrics: reward/kl_penalty, the mean over sequences of beta * sum_t kl_t (what each sequence's
        return loses); reward/kl, the mean over sequences of the per-token mean kl_t (the controller's
        measure); algo/kl_coef, the beta used for this batch.
        """
        a = self.cfg.algo
        if not a.kl_in_reward or a.kl_coef == 0:
            return None, {}
        if batch.ref_logprobs is None:
            raise RlloopError("algo.kl_in_reward: the reference logprobs were not computed for this batch")
        old = batch.old_logprobs if batch.old_logprobs is not None else batch.rollout_logprobs
        mask = torch.from_numpy(batch.response_mask)
        beta = self.kl_ctl.value
        penalty, current_kl = apply_kl_in_reward(
            torch.zeros(mask.shape),
            torch.from_numpy(old),
            torch.from_numpy(batch.ref_logprobs),
            mask,
            kl_coef=beta,
            estimator=a.kl_estimator,
        )
        self.kl_ctl.update(current_kl, n_steps=len(batch))
        return penalty, {
            "reward/kl_penalty": float(-penalty.sum(-1).mean()),
            "reward/kl": current_kl,
            "algo/kl_coef": beta,
        }

    @property
    def _fused_old_logprobs(self) -> bool:
        """The update takes the PPO ratio's old logprobs from its own forward (see AlgoConfig.old_logprobs)."""
        a = self.cfg.algo
        return a.old_logprobs == "auto" and a.ppo_epochs == 1

    def _early_ref(self, early: dict[str, Any]) -> Callable[[list[Rollout]], None] | None:
        """Sync mode with a PRM and a reference model: a hook for collect() that builds the batch and
        starts the reference-logprob pass on the learner ranks before the loop blocks on PRM scoring, so
        both run at once (two processes, two cores). Dynamic sampling replaces rows after the first
        round, so it gets no hook."""
        if not self.use_ref or self.prm_pool is None or self.cfg.algo.dynamic_sampling:
            return None

        def start(rollouts: list[Rollout]) -> None:
            early["rollouts"], early["batch"] = rollouts, build_batch(rollouts, self.pad_id)
            early["ref"] = self.learner.submit_logprobs(early["batch"], "ref")

        return start

    # ---------------------------------------------------------------- off-policy (trainer.async_mode)
    def _produce(self, step: int) -> dict[str, Any]:
        """The batch of training step `step`, built in the producer thread (RolloutPipeline): its own
        timer and PRM counts, and the stream position before its prompts were drawn (for checkpoints)."""
        timer, prm_stats = StepTimer(), {}
        stream = {"epoch": self.stream.epoch, "pos": self.stream.pos, "seed": self.stream.seed}
        rollouts, prm_out, stats = self.collect(timer, step=step, prm_stats=prm_stats)
        return {
            "rollouts": rollouts,
            "prm_out": prm_out,
            "stats": stats,
            "seconds": timer.seconds,
            "prm_stats": prm_stats,
            "stream": stream,
        }

    def _collect_async(self, timer: StepTimer) -> tuple[list[Rollout], list[dict] | None, dict[str, float]]:
        """The next step's batch from the pipeline (generated ahead with older weights), then the batches
        of later steps queued so that they generate during this update. Groups older than
        trainer.max_staleness versions are dropped or regenerated (trainer.stale_policy); `time/generate`
        is the wait on generation that the learner's update did not hide, `async/rollout_s` the
        producer's own seconds for this batch."""
        from rlloop.distributed.async_rollout import stale_groups, staleness

        t = self.cfg.trainer
        with timer.phase("generate"):
            job = self.pipeline.take(self.step + 1)
        with timer.phase("sync_wait"):
            self.finish_sync()  # the last update's weights are loaded: later batches sample from them
        self.pipeline.fill(self.step + 2)
        for key, value in job["prm_stats"].items():
            self._prm_stats[key] = self._prm_stats.get(key, 0.0) + value
        timer.seconds["prm"] = timer.seconds.get("prm", 0.0) + job["seconds"].get("prm", 0.0)
        rollouts, prm_out = job["rollouts"], job["prm_out"]
        version = self.policy_version  # the learner's weights that this update starts from
        stale = set(
            stale_groups(
                [ro.group for ro in rollouts],
                [ro.policy_version for ro in rollouts],
                version,
                t.max_staleness,
            )
        )
        keep = [k for k, ro in enumerate(rollouts) if ro.group not in stale]
        dropped = len(rollouts) - len(keep)
        if stale:
            logger.info(
                "step %d: %d groups older than %d versions (learner at %d): %s",
                self.step + 1,
                len(stale),
                t.max_staleness,
                version,
                "regenerating them" if t.stale_policy == "wait" else "dropped",
            )
            refill = list(stale) if t.stale_policy == "wait" or not keep else []
            rollouts = [rollouts[k] for k in keep]
            prm_out = None if prm_out is None else [prm_out[k] for k in keep]
            if refill:
                by_uid = {s.uid: s for s in self.train_set}
                seed = t.seed * 7919 + self.step * 101 + 50_000
                fresh, fresh_prm = self._sample_round([by_uid[g] for g in refill], timer, seed)
                rollouts += fresh
                if prm_out is not None and fresh_prm is not None:
                    prm_out += fresh_prm
        ages = staleness([ro.policy_version for ro in rollouts], version)
        if ages.size and int(ages.max()) > t.max_staleness:  # the guarantee, checked
            raise RuntimeError(f"async: about to train on samples {int(ages.max())} versions old")
        return (
            rollouts,
            prm_out,
            {
                **job["stats"],
                "async/staleness_mean": float(ages.mean()) if ages.size else 0.0,
                "async/staleness_max": float(ages.max()) if ages.size else 0.0,
                "async/dropped": float(dropped),
                "async/learner_version": float(version),
                "async/rollout_s": float(sum(v for k, v in job["seconds"].items() if k != "prm")),
            },
        )

    def _quiesce(self) -> None:
        """Async mode: wait for the batches generated ahead and the last sync (before evaluation and
        checkpoints, which must not interleave with the producer thread's calls)."""
        if self.pipeline is not None:
            self.pipeline.drain()
        self.finish_sync()

    def stream_seen(self) -> int:
        """Training prompts drawn so far (refill rounds included)."""
        return self.stream.epoch * len(self.stream.samples) + self.stream.pos

    def evaluate(self) -> dict[str, float]:
        """Greedy (or eval_temperature) accuracy on the held-out set with the current policy."""
        cfg = self.cfg
        self._quiesce()
        t0 = time.perf_counter()
        samples = self.test_set if cfg.task.num_test <= 0 else self.test_set[: cfg.task.num_test]
        temperature = cfg.rollout.eval_temperature
        rollouts = self.generate(samples, n=1, temperature=temperature, seed=cfg.trainer.seed)
        self.verify(rollouts)
        acc = float(np.mean([ro.outcome["correct"] >= 1.0 for ro in rollouts]))
        out = {
            "eval/accuracy": acc,
            "eval/num_samples": float(len(rollouts)),
            "eval/response_length": float(np.mean([len(ro.response_ids) for ro in rollouts])),
        }
        k = cfg.trainer.eval_samples
        if k > 0:
            # pass@1 of the sampling distribution RL trains, averaged over k samples per prompt: it moves
            # before the greedy answer flips, and k samples cut its variance k-fold
            sampled = self.generate(samples, n=k, temperature=cfg.rollout.temperature, seed=cfg.trainer.seed)
            self.verify(sampled)
            out["eval/accuracy_sampled"] = float(np.mean([ro.outcome["correct"] >= 1.0 for ro in sampled]))
            # pass@k: the share of prompts with at least one right answer among their k samples
            hit: dict[str, bool] = {}
            for ro in sampled:
                hit[ro.group] = hit.get(ro.group, False) or ro.outcome["correct"] >= 1.0
            out[f"eval/pass_at_{k}"] = float(np.mean(list(hit.values())))
        return out | {"time/eval": time.perf_counter() - t0}

    def memory_metrics(self) -> dict[str, float]:
        """`mem/<role>_rss_gb`: peak RSS in GiB, the max over each role's actors, plus the controller's.

        One cheap remote call per actor (getrusage), so run() asks only every log_samples_every steps and
        at the last step, not every step. A role whose actors do not answer is left out (logged), so a
        dying actor costs a metric, not the run.
        """
        from rlloop.distributed.procmem import peak_rss_gb

        out = {"mem/controller_rss_gb": peak_rss_gb()}
        roles: list[tuple[str, Any]] = [
            ("rollout", lambda: self._get([w.peak_rss_gb.remote() for w in self.workers], "peak_rss_gb")),
            ("learner", self.learner.peak_rss_gb),
            ("verifier", self.verifier.peak_rss_gb),
        ]
        if self.critic is not None:
            roles.append(("critic", self.critic.peak_rss_gb))
        if self.prm_pool is not None:
            actors = self.prm_pool.actors
            roles.append(("prm", lambda: self._get([a.peak_rss_gb.remote() for a in actors], "peak_rss_gb")))
        for role, ask in roles:
            try:
                values = ask()
            except Exception as err:  # noqa: BLE001 - a metric must not end a run
                logger.warning("mem/%s_rss_gb: %s", role, err)
                continue
            if values:
                out[f"mem/{role}_rss_gb"] = float(max(values))
        return out

    def log_samples(self, tracker: Any) -> None:
        rows = []
        for ro in getattr(self, "_last_rollouts", [])[:4]:
            rows.append(
                [
                    ro.uid,
                    ro.prompt_text[-200:],
                    ro.text,
                    ro.ground_truth,
                    ro.outcome.get("correct"),
                    ro.step_values,
                ]
            )
        if rows:
            tracker.log_table(
                "samples",
                ["uid", "prompt", "response", "ground_truth", "correct", "step_values"],
                rows,
                self.step,
            )
        if "console" in tracker.backends:
            # one wrong solution (else the first) step by step with its PRM values: where does V drop?
            shown = [ro for ro in getattr(self, "_last_rollouts", []) if ro.step_values]
            wrong = [ro for ro in shown if not ro.outcome.get("correct")]
            if wrong or shown:
                logger.info("%s", format_step_values((wrong or shown)[0]))

    def run(self) -> dict[str, Any]:
        """Train for trainer.total_steps; evaluate before, every eval_every steps, and after."""
        from tqdm.auto import tqdm

        from rlloop.plotting import plot_run
        from rlloop.tracking import Tracker, redact

        cfg = self.cfg
        if self.resume_state is not None:
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
        tracker = Tracker(
            list(cfg.logger), self.out_dir, config=redact(to_dict(cfg)), wandb_cfg=to_dict(cfg.wandb)
        )
        summary: dict[str, Any] = {"out_dir": str(self.out_dir), "model_path": self.model_path}
        if self.resume_state is not None:
            summary["resumed_from"] = str(self.resume_path)
        try:
            if cfg.trainer.eval_before and self.resume_state is None:
                ev = self.evaluate()
                tracker.log(ev, step=0)
                summary["eval_before"] = ev["eval/accuracy"]
                if "eval/accuracy_sampled" in ev:
                    summary["eval_before_sampled"] = ev["eval/accuracy_sampled"]
                    summary["eval_before_pass_at_k"] = ev[f"eval/pass_at_{cfg.trainer.eval_samples}"]
            bar = tqdm(
                range(self.step, cfg.trainer.total_steps),
                initial=self.step,
                total=cfg.trainer.total_steps,
                desc="RL steps",
                unit="step",
                dynamic_ncols=True,
            )
            for _ in bar:
                metrics = self.train_step()
                every = cfg.trainer.eval_every
                if every and self.step % every == 0 and self.step < cfg.trainer.total_steps:
                    metrics.update(self.evaluate())
                every = cfg.trainer.log_samples_every
                sample_now = bool(every) and self.step % every == 0
                if sample_now or self.step == cfg.trainer.total_steps:
                    metrics.update(self.memory_metrics())
                tracker.log(metrics, step=self.step)
                if sample_now:
                    self.log_samples(tracker)
                every = cfg.trainer.save_every
                if every and self.step % every == 0 and self.step < cfg.trainer.total_steps:
                    self.save_checkpoint()
                bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['accuracy']:.3f}")
            ev = self.evaluate()
            tracker.log(ev, step=self.step)
            summary["eval_after"] = ev["eval/accuracy"]
            if "eval/accuracy_sampled" in ev:
                summary["eval_after_sampled"] = ev["eval/accuracy_sampled"]
                summary["eval_after_pass_at_k"] = ev[f"eval/pass_at_{cfg.trainer.eval_samples}"]
            if cfg.trainer.save_final:
                ckpt = self.out_dir / "checkpoint"
                self.learner.save_hf(str(ckpt), tokenizer_path=self.model_path)
                summary["checkpoint"] = str(ckpt)
                if self.prm is not None and cfg.reward.prm.online:
                    self._get(self.prm.save.remote(str(self.out_dir / "prm")), "PRM save")
                    summary["prm_checkpoint"] = str(self.out_dir / "prm")
                if self.implicit_prm is not None and cfg.reward.implicit_prm.online:
                    self._save_implicit_prm(self.out_dir / "implicit_prm")
                    summary["implicit_prm_checkpoint"] = str(self.out_dir / "implicit_prm")
                if self.critic is not None:  # a value-head folder (a PRM folder when its output is sigmoid)
                    self.critic.save_value_model(str(self.out_dir / "critic"))
                    summary["critic_checkpoint"] = str(self.out_dir / "critic")
        finally:
            tracker.finish()
        if (self.out_dir / "metrics.jsonl").exists():
            summary["plot"] = str(plot_run(self.out_dir / "metrics.jsonl", self.out_dir / "training.png"))
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def shutdown(self) -> None:
        import ray

        if getattr(self, "pipeline", None) is not None:
            self.pipeline.close()

        for closer in (
            getattr(self, "learner", None),
            getattr(self, "critic", None),
            getattr(self, "verifier", None),
        ):
            if closer is not None:
                try:
                    closer.shutdown()
                except Exception:  # noqa: BLE001 - best effort at exit
                    logger.exception("shutdown failed")
        prm_pool = getattr(self, "prm_pool", None)
        extra = [
            *(prm_pool.actors if prm_pool else []),
            getattr(self, "qrm", None),
            getattr(self, "implicit_prm", None),
        ]
        for actor in [*getattr(self, "workers", []), *extra]:
            if actor is not None:
                ray.kill(actor)
        if getattr(self, "placement", None) is not None:
            self.placement.remove()


def format_step_values(ro: Rollout, width: int = 72) -> str:
    """A rollout's steps, one per line, each with the PRM's value V_k after it (for the console)."""
    verdict = "right" if ro.outcome.get("correct") else "wrong"
    lines = [f"PRM step values of {ro.uid} ({verdict}, gold {ro.ground_truth}):"]
    start = 0
    for end, value in zip(ro.step_char_ends, ro.step_values or [], strict=False):
        text = " ".join(ro.text[start:end].split())
        text = text if len(text) <= width else text[: width - 3] + "..."
        lines.append(f"  V={value:.3f} | {text}")
        start = end
    return "\n".join(lines)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after `step` (by a run killed after its last checkpoint), so the resumed run's
    metrics continue without gaps or duplicates."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _wait_ready(actor: Any, timeout: float) -> None:
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


def critic_metrics(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How well the critic's values (before its update) predict the GAE returns on the response tokens:
    critic/values, critic/returns (means) and critic/explained_var = 1 - Var(R - V) / Var(R) (1 = perfect,
    0 = no better than a constant, as OpenAI baselines / verl log it; NaN when the returns are constant)."""
    m = mask.bool()
    v, r = values[m].double(), returns[m].double()
    if v.numel() == 0:
        return {}
    var_r = float(r.var()) if r.numel() > 1 else 0.0
    explained = 1.0 - float((r - v).var()) / var_r if var_r > 1e-12 else float("nan")
    return {"critic/values": float(v.mean()), "critic/returns": float(r.mean()), "critic/explained_var": explained}


def gdpo_components(components: dict[str, tuple[torch.Tensor, float]]) -> dict[str, Any]:
    """algo.advantage=gdpo's inputs: the reward sources [B] as columns `reward_components` [B, S] and
    their weights in the fused reward `reward_weights` [S]. A source of weight 0 is left out (it adds
    nothing to the sum, and GDPO weights each source after normalising it)."""
    kept = {name: (c, w) for name, (c, w) in components.items() if w != 0}
    if not kept:
        raise ConfigError("algo.advantage=gdpo: every reward source has weight 0 (reward.w_rule, w_prm, ...)")
    return {
        "reward_components": torch.stack([c.to(torch.float32) for c, _ in kept.values()], dim=1),
        "reward_weights": [float(w) for _, w in kept.values()],
    }


def group_index(groups: list[str]) -> torch.Tensor:
    """Integer group ids [B] (in order of first appearance) for prompt uids."""
    index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    return torch.tensor([index[g] for g in groups], dtype=torch.long)


def format_scores(rollouts: list[Rollout]) -> list[float]:
    """The verifier's `format` score of each rollout (1 when it found an answer where it looks).

    A rollout the verifier could not score (timeout, crash) has none and gets 0. A batch in which no
    rollout has one means the verifier never reports it (code, a custom function): reward.w_format needs
    one that does, so that is an error naming a sample rather than a silent 0.
    """
    if rollouts and not any("format" in ro.outcome for ro in rollouts):
        raise ConfigError(
            f"reward.w_format > 0 but the verifier reports no `format` score (sample {rollouts[0].uid} "
            f"has {sorted(rollouts[0].outcome)}); use the math or format verifier, or set reward.w_format=0"
        )
    return [float(ro.outcome.get("format", 0.0)) for ro in rollouts]


def verifier_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """verifier/unscored_frac: samples the verifier could not judge (infrastructure or data: worth an
    alert); verifier/rejected_frac: samples judged 0 for a reason of their own (no answer, ...)."""
    kinds = [ro.outcome_info.get("kind") for ro in rollouts]
    return {
        "verifier/unscored_frac": float(np.mean([k == "unscored" for k in kinds])),
        "verifier/rejected_frac": float(np.mean([k == "rejected" for k in kinds])),
    }


def _extra_scores(rollouts: list[Rollout]) -> dict[str, float]:
    """Means of every named verifier score besides `correct` (e.g. `format`)."""
    keys = {k for ro in rollouts for k in ro.outcome if k != "correct"}
    return {k: float(np.mean([ro.outcome.get(k, math.nan) for ro in rollouts])) for k in sorted(keys)}
