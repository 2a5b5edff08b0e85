"""The controller: one RL step, read top to bottom in `Trainer.train_step`.

generate → verify and PRM-score → old/ref logprobs → KL into the reward → fusion and advantages → learner
update → weight sync, each phase timed in `time/*`. It runs in the driver process and only moves
references and small metadata; the heavy work happens in the actors, whose start-up, restarts, restores,
checkpoints and shutdown live in rlloop.distributed.lifecycle. Reward fusion is the FUSIONS registry
(rlloop.algos.fusion); rollouts become tensors in rlloop.batch.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlloop import checkpoint
from rlloop.algos.dpo import is_preference_loss
from rlloop.algos.kl import apply_kl_in_reward, make_kl_controller
from rlloop.batch import (
    build_batch,
    format_scores,
    group_index,
    implicit_prm_labels,
    oracle_step_values,
    outcomes,
    rollout_metrics,
    step_tensors,
)
from rlloop.data.stream import PromptStream
from rlloop.errors import RlloopError
from rlloop.timing import StepTimer, step_overhead
from rlloop.types import Batch, Rollout, Sample

logger = logging.getLogger(__name__)


@dataclass
class Collected:
    """One step's verified rollouts (prompt order) and sampling statistics. PRM scoring was queued per
    rollout-worker share as each returned: `prm_pending` (rollouts, request) pairs not gathered yet,
    `prm_done` results by id(rollout), `prm_stats` the replicas' packing counts and `prm_seconds`."""

    rollouts: list[Rollout]
    stats: dict[str, float] = field(default_factory=dict)
    prm_pending: list[tuple[list[Rollout], Any]] = field(default_factory=list)
    prm_done: dict[int, dict] = field(default_factory=dict)
    prm_stats: dict[str, float] = field(default_factory=dict)
    prm_seconds: float = 0.0

    def extend(self, other: Collected) -> None:
        self.rollouts += other.rollouts
        self.prm_pending += other.prm_pending
        self.prm_done |= other.prm_done


class Trainer:
    """Owns one run: its data, its actors (`self.actors`) and the loop that sequences each step."""

    def __init__(self, cfg: Any, out_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        from rlloop.data import build_datasets, render_prompt
        from rlloop.data.loader import fit_prompt_lengths, max_positions
        from rlloop.distributed.lifecycle import Actors
        from rlloop.evaluation import load_eval_sets
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
        # read once: the model the run starts from, recorded in every checkpoint and checked on resume
        self.model_identity = checkpoint.model_identity(self.model_path)
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
        # the held-out split and eval.sets, fitted to the context like it (rlloop.evaluation: eval/<set>/...)
        test = self.test_set if cfg.task.num_test <= 0 else self.test_set[: cfg.task.num_test]
        self.eval_sets = {
            name: fit_prompt_lengths(samples, self.tokenizer, cfg.task, max_new_tokens=cfg.rollout.max_new_tokens,
                                     context=max_positions(self.model_path), split=name)
            for name, samples in load_eval_sets(cfg, test, taken=self.train_set + self.test_set).items()
        }  # fmt: skip
        # the verifier gets each prompt's row: verl's extra_info, TRL's columns and chat messages
        self._samples = {s.uid: s for s in self.test_set + self.train_set}
        self._samples |= {s.uid: s for samples in self.eval_sets.values() for s in samples}
        critic_init = self._critic_init() if cfg.algo.advantage == "gae" else None
        self._render = render_prompt
        self._prompt_cache: dict[str, dict] = {}
        self.stream = PromptStream(self.train_set, cfg.trainer.seed)
        self.step = 0
        self.trained_groups: list[str] = []  # prompt uids in the order they were trained on
        a = cfg.algo
        # algo.policy_loss=dpo|tgdpo: a DPO-family loss on pairs of each group's answers (or a pairs file),
        # against the reference, instead of advantages (rlloop.algos.dpo, rlloop.learner.preference)
        self.preference = is_preference_loss(a.policy_loss)
        self._pair_rng = torch.Generator().manual_seed(cfg.trainer.seed)
        self.offline_pairs = None
        if self.preference and a.dpo.pairs_path:
            from rlloop.rewards.qrm.data import load_pairs

            self.offline_pairs = PromptStream(load_pairs(a.dpo.pairs_path), cfg.trainer.seed)
        # a KL term (in the loss or the reward) and the DPO family always need the reference logprobs;
        # algo.use_ref adds them without one, for the `kl` metric
        self.use_ref = bool(a.use_ref or a.kl_coef > 0 or self.preference)
        # vLLM's sleep mode: the engines sleep from the end of generation to the weight sync, so a learner
        # colocated on their GPUs has the memory of their weights and KV cache (async mode refused: validate)
        self.rollout_sleeps = cfg.rollout.engine == "vllm" and bool(cfg.rollout.vllm.enable_sleep_mode)
        # the coefficient of the KL penalty in the reward: fixed, or adaptive toward algo.kl_target
        self.kl_ctl = make_kl_controller(a.kl_coef, a.kl_target, a.kl_horizon)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.resume_state: dict | None = None
        self.resume_path: Path | None = None
        if cfg.trainer.resume:
            self.resume_path = checkpoint.find(cfg.trainer.resume, self.ckpt_root)
            if self.resume_path is None:
                logger.info("trainer.resume=auto: no checkpoint under %s, starting from scratch", self.ckpt_root)
            else:
                self.resume_state = checkpoint.load_state(
                    self.resume_path,
                    fingerprint=self.model_identity,
                    total_steps=cfg.trainer.total_steps,
                )
        self.pipeline = None  # rollouts generated ahead of the learner (trainer.async_mode)
        self.actors = Actors(
            cfg, model_path=self.model_path, data_sources={s.data_source for s in self._samples.values()},
            use_ref=self.use_ref, critic_init=critic_init, resume_path=self.resume_path,
        )  # fmt: skip
        try:
            t = cfg.trainer
            if t.async_mode != "off":
                from rlloop.distributed.async_rollout import RolloutPipeline, lookahead

                self.pipeline = RolloutPipeline(self._produce, lookahead(t.async_mode, t.max_staleness, t.async_lookahead))
            if self.resume_state is not None:
                self._restore(self.resume_path, self.resume_state)
        except BaseException:
            self.shutdown()
            raise

    def _critic_init(self) -> Any:
        """algo.advantage=gae: where the critic starts, checked before any actor."""
        from rlloop.learner.critic import resolve_critic_init

        c, rw = self.cfg.algo.critic, self.cfg.reward
        try:
            return resolve_critic_init(c.init, c.output, policy_path=self.model_path, prm_path=rw.prm.path,
                                       qrm_path=rw.qrm.path, policy_tokenizer=self.tokenizer)  # fmt: skip
        except (ValueError, OSError) as err:
            raise RlloopError(str(err)) from err

    # the actors most callers ask for (tests, benchmarks)
    workers = property(lambda self: self.actors.workers)
    learner = property(lambda self: self.actors.learner)
    critic = property(lambda self: self.actors.critic)
    prm = property(lambda self: self.actors.prm)
    prm_pool = property(lambda self: self.actors.prm_pool)
    restarts = property(lambda self: self.actors.restarts)
    policy_version = property(lambda self: self.actors.policy_version)

    # ---------------------------------------------------------------- the step
    def train_step(self) -> dict[str, float]:
        """One RL step; each phase takes explicit inputs, returns new values and is timed (`time/<phase>`)."""
        cfg, timer, t_step = self.cfg, StepTimer(), time.perf_counter()
        self.actors.supervisor.step = self.step + 1
        # 1. generate → verify (PRM scoring queued per worker share; DAPO refills; async: made ahead)
        if self.offline_pairs is not None:
            got = self._offline_pairs(timer)
        else:
            got = self.collect(timer) if self.pipeline is None else self._collect_async(timer)
        rollouts, _, prime_stats = self._prime_filter(got.rollouts)
        self.step += 1
        base = {"prompts_seen": float(self.stream_seen()), **got.stats, **prime_stats}
        if not rollouts:  # every group tied and no refill found a signal: nothing to learn from
            logger.warning("step %d: every group's rewards tie; skipping the update", self.step)
            timer.seconds["step"] = time.perf_counter() - t_step
            nan = float("nan")
            return {**base, "reward/total": nan, "accuracy": nan, "skipped": 1.0, **timer.metrics(),
                    **step_overhead(timer.seconds)}  # fmt: skip
        batch = build_batch(rollouts, self.pad_id)
        # DPO family: the update trains on (chosen, rejected) row pairs of the batch, `train`
        pair_rows, pair_metrics = self._pair_rows(rollouts) if self.preference else (None, {})
        if pair_rows is not None and not len(pair_rows):
            logger.warning("step %d: no group has a better and a worse answer; skipping the update", self.step)
            timer.seconds["step"] = time.perf_counter() - t_step
            return {**base, **rollout_metrics(rollouts), **pair_metrics, "skipped": 1.0, **timer.metrics(),
                    **step_overhead(timer.seconds)}  # fmt: skip
        train = batch if pair_rows is None else batch.select(pair_rows.numpy())
        sleep_metrics = {}
        if self.rollout_sleeps:  # generation is over until the sync: the engines give their memory back
            with timer.phase("rollout_sleep"):
                sleep_metrics["rollout/asleep_workers"] = float(self.actors.set_rollout_asleep(True))
        # 2. the reference pass and the critic's values start on their ranks while the PRM finishes
        ref_pending = self.learner.submit_logprobs(train, "ref") if self.use_ref else None
        values_pending = self.critic.submit_values(batch) if self.critic is not None else None
        prm_out = self._prm_scores(got, rollouts, timer)
        prm_update = self._prm_td_update(rollouts)  # online PRM: TD-learns while the policy updates
        token_scores, token_metrics, implicit_prm_update = self._score_tokens(rollouts, batch, timer)
        if values_pending is not None:
            with timer.phase("critic_values"):
                batch.values = self.critic.gather_values(values_pending)
        # 3. old / reference logprobs
        with timer.phase("logprobs"):
            if not self._fused_old_logprobs and not self.preference:
                batch.old_logprobs = self.learner.compute_logprobs(batch, "policy")
            if ref_pending is not None:
                train.ref_logprobs = self.learner.gather_logprobs(ref_pending)
        # 4. KL into the token rewards (algo.kl_in_reward) → 5. fusion and advantages
        with timer.phase("fusion"):
            kl_rewards, kl_metrics = self.kl_in_reward(batch)
            kl_coef = kl_metrics.get("algo/kl_coef", 0.0)
            if pair_rows is None:
                fusion_metrics = self.score(rollouts, batch, prm_out, token_scores, kl_rewards=kl_rewards, kl_coef=kl_coef)
            else:  # no advantages: TGDPO's token guidance on the pair rows instead
                fusion_metrics = self._guidance(train, pair_rows, batch, rollouts, prm_out, token_scores)
        # 6. learner update (the critic, in its own processes, regresses toward the returns meanwhile)
        with timer.phase("learner"):
            critic_pending = self.critic.submit_train_step(batch) if self.critic is not None else None
            learner_metrics = self.learner.train_step(train)
            if critic_pending is not None:
                learner_metrics.update(self.critic.gather_train_step(critic_pending))
        # 7. weight sync (async: the workers load the buckets after the batch they are generating)
        if self.rollout_sleeps:  # awake first: a sleeping engine refuses weights
            with timer.phase("rollout_wake"):
                self.actors.set_rollout_asleep(False)
        with timer.phase("sync"):
            sync_metrics = self.sync_weights(wait=self.pipeline is None)
        every = cfg.learner.sync_probe_every
        if every and self.step % every == 0:
            with timer.phase("sync_probe"):
                sync_metrics.update(self.sync_probe())
        # the reward models' own updates, queued above, finish
        prm_metrics = self._prm_metrics(got.prm_stats)
        if prm_update is not None:
            with timer.phase("prm_update"):
                prm_metrics.update(self.prm_pool.updated(prm_update))
        if implicit_prm_update is not None:
            with timer.phase("implicit_prm_update"):
                prm_metrics.update(self.actors.implicit_prm_updated(implicit_prm_update))
        self.trained_groups += list(dict.fromkeys(ro.group for ro in rollouts))
        self._last_rollouts = rollouts
        timer.seconds["step"] = time.perf_counter() - t_step
        # learner vs rollout engine logprobs on the sampled tokens, measured by the update itself
        mismatch = learner_metrics.pop("actor/rollout_logprob_mismatch", 0.0)
        return {
            **base,
            **(rollout_metrics(rollouts) if self.offline_pairs is None else {"accuracy": float("nan")}),
            **pair_metrics,
            "rollout/logprob_mismatch": float(mismatch),
            "kl": float(learner_metrics.get("actor/kl_ref", 0.0)),
            "entropy": float(learner_metrics.get("actor/entropy", float("nan"))),
            "faults/actor_restarts": float(sum(self.restarts.values())),
            **token_metrics, **kl_metrics, **fusion_metrics, **prm_metrics, **learner_metrics, **sync_metrics,
            **sleep_metrics, **timer.metrics(), **step_overhead(timer.seconds),
        }  # fmt: skip

    # ---------------------------------------------------------------- 1. generate, verify, PRM-score
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

    def generate(self, samples: list[Sample], *, n: int, temperature: float, seed: int | None) -> Iterator[list[Rollout]]:
        """n rollouts per prompt, split over the rollout workers: each worker's rollouts as it returns."""
        r = self.cfg.rollout
        prompts = [self._prompt(s) for s in samples]
        kwargs = {"n": n, "max_new_tokens": r.max_new_tokens, "temperature": temperature, "top_p": r.top_p}
        yield from self.actors.generate(prompts, seed=seed, **kwargs)

    def generate_all(self, samples: list[Sample], **kwargs: Any) -> list[Rollout]:
        """`generate`, gathered: rollouts grouped in prompt order."""
        return _in_prompt_order(samples, [ro for share in self.generate(samples, **kwargs) for ro in share])

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
        for ro, res in zip(rollouts, self.actors.verifier.score(requests)):
            ro.outcome = {"correct": float(res.score), **{k: float(v) for k, v in res.scores.items()}}
            ro.outcome_info = res.info()

    def _sample_round(self, samples: list[Sample], timer: StepTimer, seed: int) -> Collected:
        """Generate n samples per prompt and verify them; each rollout worker's share is queued on the PRM
        replicas as soon as that worker returns, so scoring overlaps generation and verification."""
        r, pool = self.cfg.rollout, self.prm_pool
        got = Collected([])
        with timer.phase("generate"):
            for share in self.generate(samples, n=r.n, temperature=r.temperature, seed=seed):
                got.rollouts += share
                if pool is not None:
                    texts = ([ro.prompt_text for ro in share], [ro.text for ro in share], [ro.step_char_ends for ro in share])
                    weights = [len(ro.prompt_ids) + len(ro.response_ids) for ro in share]
                    got.prm_pending.append((share, pool.submit(*texts, weights=weights)))
        got.rollouts = _in_prompt_order(samples, got.rollouts)
        with timer.phase("verify"):
            self.verify(got.rollouts)
        return got

    def _prm_scores(self, got: Collected, rollouts: list[Rollout], timer: StepTimer) -> list[dict] | None:
        """The PRM's outputs of `rollouts` (step values, prompt value), attached to them as step_values:
        the queued requests gathered (`time/prm_wait`: what generation did not hide; `time/prm`: the
        replicas' own seconds), or the task's exact step checker (reward.prm.oracle); None without a PRM."""
        if self.prm_pool is None:
            samples = {s.uid: s for s in self.train_set + self.test_set}
            out = oracle_step_values(self.cfg.task.name, samples, rollouts) if self.cfg.reward.prm.oracle else None
        else:
            with timer.phase("prm_wait") if got.prm_pending else contextlib.nullcontext():
                for share, pending in got.prm_pending:
                    results, stats = self.prm_pool.gather(pending)
                    got.prm_done.update({id(ro): res for ro, res in zip(share, results, strict=True)})
                    got.prm_seconds += stats.pop("seconds")
                    for key, value in stats.items():  # tokens, padded_tokens, batches of this step
                        got.prm_stats[key] = got.prm_stats.get(key, 0.0) + value
                got.prm_pending = []
            timer.seconds["prm"] = timer.seconds.get("prm", 0.0) + got.prm_seconds
            out = [got.prm_done[id(ro)] for ro in rollouts]
        for ro, o in zip(rollouts, out or []):
            if len(o["step_values"]) == len(ro.step_ends):
                ro.step_values = list(o["step_values"])
        return out

    def collect(self, timer: StepTimer, *, step: int | None = None) -> Collected:
        """One step's rollouts; with algo.dynamic_sampling, groups whose outcomes all tie are dropped and
        refilled by up to dynamic_sampling_max_rounds extra rounds (DAPO). `step`: the training step
        they are for (default the next; the async producer gives it)."""
        from rlloop.algos.sampling import filter_tied_groups, select_groups

        cfg, a = self.cfg, self.cfg.algo
        want = cfg.rollout.prompts_per_step
        seed = cfg.trainer.seed * 7919 + (self.step if step is None else step - 1) * 101
        got = self._sample_round(self.stream.take(want), timer, seed)
        if not a.dynamic_sampling:
            return got
        kept = Collected([])
        drawn = dropped = 0
        for round_ in range(a.dynamic_sampling_max_rounds + 1):
            if round_ > 0:
                missing = want - len({ro.group for ro in kept.rollouts})
                if missing <= 0:
                    break
                got = self._sample_round(self.stream.take(missing), timer, seed + round_)
            group_ids = group_index([ro.group for ro in got.rollouts])
            keep, _ = filter_tied_groups(outcomes(got.rollouts), group_ids, keep_singletons=False)
            n_groups = len(set(group_ids.tolist()))
            drawn += n_groups
            dropped += n_groups - len(set(group_ids[keep].tolist()))
            rows = keep.nonzero().flatten().tolist()  # (the PRM's outputs of dropped rows go unread)
            kept.extend(Collected([got.rollouts[i] for i in rows], prm_pending=got.prm_pending))
        if kept.rollouts:
            rows = select_groups(
                torch.ones(len(kept.rollouts), dtype=torch.bool), group_index([ro.group for ro in kept.rollouts]), want
            )
            kept.rollouts = [kept.rollouts[i] for i in rows.tolist()]
        kept.stats = {
            "dynamic_sampling/dropped_frac": dropped / max(drawn, 1),
            "dynamic_sampling/groups": float(len({ro.group for ro in kept.rollouts})),
        }
        return kept

    def _prime_filter(
        self, rollouts: list[Rollout], prm_out: list[dict] | None = None
    ) -> tuple[list[Rollout], list[dict] | None, dict[str, float]]:
        """PRIME's prompt filter: keep groups whose mean outcome lies in [filter_low, filter_high] (and
        the same rows of `prm_out`, when given)."""
        from rlloop.algos.fusion import prime_prompt_filter

        ip = self.cfg.reward.implicit_prm
        if not ip.prompt_filter or not rollouts:
            return rollouts, prm_out, {}
        group_ids = group_index([ro.group for ro in rollouts])
        keep = prime_prompt_filter(outcomes(rollouts), group_ids, ip.filter_low, ip.filter_high).tolist()
        n_groups = len(set(group_ids.tolist()))
        kept = [ro for ro, k in zip(rollouts, keep) if k]
        stats = {"implicit_prm/filtered_frac": 1.0 - len({ro.group for ro in kept}) / max(n_groups, 1)}
        if prm_out is not None:
            prm_out = [o for o, k in zip(prm_out, keep) if k]
        return kept, prm_out, stats

    def _prm_td_update(self, rollouts: list[Rollout]) -> Any:
        """reward.prm.online (actor-critic): queue the PRM's TD step on these verified rollouts."""
        if self.prm_pool is None or not self.cfg.reward.prm.online:
            return None
        return self.prm_pool.td_update(
            [ro.prompt_text for ro in rollouts], [ro.text for ro in rollouts],
            [ro.step_char_ends for ro in rollouts], [ro.outcome["correct"] for ro in rollouts],
        )  # fmt: skip

    @staticmethod
    def _prm_metrics(stats: dict[str, float]) -> dict[str, float]:
        if not stats.get("padded_tokens"):
            return {}
        tokens, padded = stats["tokens"], stats["padded_tokens"]
        return {"prm/tokens": tokens, "prm/pad_frac": 1.0 - tokens / padded, "prm/batches": stats["batches"]}

    def _score_tokens(
        self, rollouts: list[Rollout], batch: Batch, timer: StepTimer
    ) -> tuple[torch.Tensor | None, dict[str, float], Any]:
        """Per-token rewards [B, T] of the configured token source (None without one), their metrics
        (`<source>/token_mean|std` over response tokens, raw), and the implicit PRM's online update,
        already queued behind the scoring call (the actor runs calls in order: it scores with π_φ as it
        was, then learns from these outcomes while the policy trains)."""
        from rlloop.algos.fusion import place_response_rewards

        actors = self.actors
        if actors.qrm is None and actors.implicit_prm is None:
            return None, {}, None
        mask = torch.from_numpy(batch.response_mask)
        update = None
        with timer.phase("token_rewards"):
            if actors.qrm is not None:
                source, values = "qrm", actors.qrm_scores(rollouts)
                for ro, v in zip(rollouts, values, strict=True):
                    if len(v) != len(ro.response_ids):
                        raise RlloopError(
                            f"rollout {ro.uid}: the Q-RM returned {len(v)} token rewards for "
                            f"{len(ro.response_ids)} response tokens"
                        )
                scores = place_response_rewards(values, mask)
            else:
                import ray

                source, batch_ref = "implicit_prm", ray.put(batch)
                scores = torch.from_numpy(actors.implicit_prm_scores(batch_ref, len(rollouts)))
                if self.cfg.reward.implicit_prm.online:
                    update = actors.implicit_prm.update.remote(batch_ref, implicit_prm_labels(rollouts))
        for ro, row, m in zip(rollouts, scores, mask):
            ro.token_rewards = row[m > 0].tolist()
        on = scores[mask > 0]
        metrics = {
            f"{source}/token_mean": float(on.mean()) if on.numel() else float("nan"),
            f"{source}/token_std": float(on.std()) if on.numel() > 1 else float("nan"),
        }
        return scores, metrics, update

    # ---------------------------------------------------------------- the DPO family's pairs and guidance
    def _pair_rows(self, rollouts: list[Rollout]) -> tuple[torch.Tensor, dict[str, float]]:
        """algo=dpo|tgdpo: the batch rows of the step's pairs, (chosen_0, rejected_0, chosen_1, ...) [2P]:
        per group a best- against a worst-verified answer by algo.dpo.pair_rule (offline: the file's
        pairs as they come). Metrics: dpo/pairs, dpo/groups_paired, dpo/groups_skipped (all answers
        scored the same), reward/total (the verifier's mean score)."""
        from rlloop.algos.dpo import interleave_pairs, preference_pairs

        d, scores = self.cfg.algo.dpo, outcomes(rollouts)
        groups = group_index([ro.group for ro in rollouts])
        if self.offline_pairs is not None:
            rows = torch.arange(len(rollouts))
        else:
            chosen, rejected = preference_pairs(
                scores, groups, rule=d.pair_rule, max_pairs_per_group=d.max_pairs_per_group, min_gap=d.min_gap,
                generator=self._pair_rng,
            )  # fmt: skip
            rows = interleave_pairs(chosen, rejected)
        paired, total = len(set(groups[rows].tolist())), len(set(groups.tolist()))
        metrics = {"dpo/pairs": len(rows) / 2, "dpo/groups_paired": float(paired),
                   "dpo/groups_skipped": float(total - paired), "reward/total": float(scores.mean())}  # fmt: skip
        return rows, metrics

    def _guidance(
        self,
        train: Batch,
        pair_rows: torch.Tensor,
        batch: Batch,
        rollouts: list[Rollout],
        prm_out: list[dict] | None,
        token_scores: torch.Tensor | None,
    ) -> dict[str, float]:
        """algo=tgdpo: the token guidance r^ of the pair rows into train.token_rewards [2P, T], from
        algo.dpo.guidance: the implicit PRM's or the Q-RM's token rewards (`_score_tokens`), or the
        TD-PRM's step values, each step's V_k - V_{k-1} on its tokens (rlloop.algos.dpo.spread_step_rewards).
        Nothing for algo=dpo."""
        from rlloop.algos.dpo import guidance_source, spread_step_rewards

        source = guidance_source(self.cfg.algo)
        if source is None:
            return {}
        if source == "prm":
            if prm_out is None:
                raise RlloopError("algo.dpo.guidance=prm: the PRM returned no step values this step")
            steps = step_tensors(rollouts, prm_out)
            mask = steps["mask"]
            positions = (steps["ends"] + torch.tensor([len(ro.prompt_ids) for ro in rollouts])[:, None]) * mask.long()
            full = spread_step_rewards(
                steps["values"], mask, positions, steps["prompt_value"], torch.from_numpy(batch.response_mask)
            )
        elif token_scores is None:
            raise RlloopError(f"algo.dpo.guidance={source}: the source returned no token rewards this step")
        else:
            full = token_scores
        train.token_rewards = full[pair_rows].numpy().astype(np.float32)
        return {}

    def _offline_pairs(self, timer: StepTimer) -> Collected:
        """algo.dpo.pairs_path: the next rollout.prompts_per_step pairs of the file as (chosen, rejected)
        rollouts (rlloop.pairs); no generation. The file is reshuffled every pass."""
        from rlloop.pairs import pair_rollouts

        with timer.phase("generate"):
            rollouts = [
                ro
                for pair in self.offline_pairs.take(self.cfg.rollout.prompts_per_step)
                for ro in pair_rollouts(pair, self.tokenizer, max_new_tokens=self.cfg.rollout.max_new_tokens,
                                        policy_version=self.policy_version)  # fmt: skip
            ]
        return Collected(rollouts)

    # ---------------------------------------------------------------- 4. KL, 5. fusion
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
            torch.zeros(mask.shape), torch.from_numpy(old), torch.from_numpy(batch.ref_logprobs), mask, kl_coef=beta,
            estimator=a.kl_estimator,
        )  # fmt: skip
        self.kl_ctl.update(current_kl, n_steps=len(batch))
        return penalty, {"reward/kl_penalty": float(-penalty.sum(-1).mean()), "reward/kl": current_kl, "algo/kl_coef": beta}

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
        """Fuse the reward sources into batch.token_rewards / advantages / returns with
        FUSIONS[reward.fusion] (rlloop.algos.fusion), and return its metrics.

        The outcome is the verifier's score plus DAPO's overlong penalty (algo.overlong_buffer) and
        reward.w_format times the verifier's format score; gdpo gets each of them as its own column.
        prm_out: the PRM's outputs per rollout; token_scores [B, T]: Q-RM or implicit PRM; kl_rewards
        [B, T]: -kl_coef * kl_t (algo.kl_in_reward), added to the token rewards before the estimator.
        """
        from rlloop.algos.fusion import FUSIONS, FusionInputs
        from rlloop.algos.sampling import overlong_penalty

        rw, a = self.cfg.reward, self.cfg.algo
        mask = torch.from_numpy(batch.response_mask)
        outcome = outcomes(rollouts)
        components: dict[str, tuple[torch.Tensor, float]] = {"correct": (outcome, rw.w_rule)}
        metrics: dict[str, float] = {}
        if a.overlong_buffer > 0:
            lengths = torch.tensor([len(ro.response_ids) for ro in rollouts])
            penalty = overlong_penalty(lengths, self.cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
            components["overlong"] = (penalty, rw.w_rule)
            outcome = outcome + penalty
            metrics["reward/overlong_penalty"] = float(penalty.mean())
        if rw.w_format > 0:
            fmt = torch.tensor(format_scores(rollouts), dtype=torch.float32)
            components["format"] = (fmt, rw.w_rule * rw.w_format)
            outcome = outcome + rw.w_format * fmt
            metrics["reward/format_bonus"] = float(rw.w_format * fmt.mean())
        x = FusionInputs(
            mask, group_index([ro.group for ro in rollouts]), outcome, components, token_scores=token_scores,
            values=None if batch.values is None else torch.from_numpy(batch.values),
            kl_rewards=kl_rewards, kl_coef=kl_coef,
        )  # fmt: skip
        if prm_out is not None:
            steps = step_tensors(rollouts, prm_out)
            positions = steps["ends"] + torch.tensor([len(ro.prompt_ids) for ro in rollouts])[:, None]
            x.step_values, x.step_mask, x.step_positions = steps["values"], steps["mask"], positions * steps["mask"].long()
            x.answer_step, x.prompt_value = steps["answer_step"], steps["prompt_value"]
        fused = FUSIONS[rw.fusion](x, rw, a)
        batch.token_rewards = fused.token_rewards.numpy().astype(np.float32)
        batch.advantages = fused.advantages.numpy().astype(np.float32)
        batch.returns = fused.returns.numpy().astype(np.float32)
        return {**metrics, **fused.metrics}

    @property
    def _fused_old_logprobs(self) -> bool:
        """The update takes the PPO ratio's old logprobs from its own forward (see AlgoConfig.old_logprobs)."""
        a = self.cfg.algo
        return a.old_logprobs == "auto" and a.ppo_epochs == 1

    # ---------------------------------------------------------------- 7. weight sync
    def sync_weights(self, *, version: int | None = None, wait: bool = True) -> dict[str, float]:
        """Push the learner's weights to the rollout workers (rlloop.distributed.lifecycle.Actors.sync_weights)."""
        return self.actors.sync_weights(version=version, wait=wait)

    def finish_sync(self) -> None:
        self.actors.finish_sync()

    def sync_probe(self) -> dict[str, float]:
        """`sync/probe_logprob_mismatch` on the first held-out prompts (Actors.sync_probe)."""
        prompts = [self._prompt(s) for s in (self.test_set or self.train_set)[:4]]
        return self.actors.sync_probe(prompts, self.pad_id)

    # ---------------------------------------------------------------- off-policy (trainer.async_mode)
    def _produce(self, step: int) -> dict[str, Any]:
        """The batch of training step `step`, built in the producer thread (RolloutPipeline), PRM scores
        gathered there: its own timer, and the stream position before its prompts were drawn (for checkpoints)."""
        timer = StepTimer()
        stream = {"epoch": self.stream.epoch, "pos": self.stream.pos, "seed": self.stream.seed}
        got = self.collect(timer, step=step)
        if got.prm_pending:
            self._prm_scores(got, got.rollouts, timer)
        return {"collected": got, "seconds": timer.seconds, "stream": stream}

    def _collect_async(self, timer: StepTimer) -> Collected:
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
        got: Collected = job["collected"]
        timer.seconds["prm"] = timer.seconds.get("prm", 0.0) + got.prm_seconds
        got.prm_seconds = 0.0  # counted once (a refill below adds its own)
        version = self.policy_version  # the learner's weights that this update starts from
        versions = [ro.policy_version for ro in got.rollouts]
        stale = set(stale_groups([ro.group for ro in got.rollouts], versions, version, t.max_staleness))
        kept = [ro for ro in got.rollouts if ro.group not in stale]
        dropped = len(got.rollouts) - len(kept)
        if stale:
            logger.info(
                "step %d: %d groups older than %d versions (learner at %d): %s", self.step + 1, len(stale),
                t.max_staleness, version, "regenerating them" if t.stale_policy == "wait" else "dropped",
            )  # fmt: skip
            refill = list(stale) if t.stale_policy == "wait" or not kept else []
            got.rollouts = kept
            if refill:
                by_uid = {s.uid: s for s in self.train_set}
                seed = t.seed * 7919 + self.step * 101 + 50_000
                got.extend(self._sample_round([by_uid[g] for g in refill], timer, seed))
        ages = staleness([ro.policy_version for ro in got.rollouts], version)
        if ages.size and int(ages.max()) > t.max_staleness:  # the guarantee, checked
            raise RuntimeError(f"async: about to train on samples {int(ages.max())} versions old")
        got.stats = {
            **got.stats,
            "async/staleness_mean": float(ages.mean()) if ages.size else 0.0,
            "async/staleness_max": float(ages.max()) if ages.size else 0.0,
            "async/dropped": float(dropped),
            "async/learner_version": float(version),
            "async/rollout_s": float(sum(v for k, v in job["seconds"].items() if k != "prm")),
        }
        return got

    def _quiesce(self) -> None:
        """Async mode: wait for the batches generated ahead and the last sync (before evaluation and
        checkpoints, which must not interleave with the producer thread's calls)."""
        if self.pipeline is not None:
            self.pipeline.drain()
        self.finish_sync()

    def stream_seen(self) -> int:
        """Training prompts drawn so far (refill rounds included; offline DPO: pairs)."""
        s = self.stream if self.offline_pairs is None else self.offline_pairs
        return s.epoch * len(s.samples) + s.pos

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of the whole run at the current step (see rlloop.checkpoint)."""
        self._quiesce()
        # async: prompts already drawn for batches not yet trained on are drawn again after a resume
        queued = self.pipeline.drain() if self.pipeline is not None else []
        s = self.stream
        stream = queued[0]["stream"] if queued else {"epoch": s.epoch, "pos": s.pos, "seed": s.seed}
        tmp = checkpoint.begin(self.ckpt_root, self.step)
        self.actors.save(tmp, self.tokenizer)
        state = {
            "step": self.step,
            **self.actors.state(),  # policy_version, prm_version, restarts
            "stream": stream,
            "trained_groups": self.trained_groups,
            "kl_coef": self.kl_ctl.value,  # adaptive KL: the coefficient as it has moved so far
            # algo=dpo|tgdpo, pair_rule=random: the tie-breaking draws continue where they stopped
            "pair_rng": base64.b64encode(self._pair_rng.get_state().numpy().tobytes()).decode("ascii"),
            **self.model_identity,  # model_fingerprint, model_revision, model_weights
            "model_path": self.model_path,
        }
        return checkpoint.commit(tmp, state, self.model_path, keep_last=self.cfg.trainer.keep_last)

    def _restore(self, path: Path, state: dict) -> None:
        """Continue from a checkpoint: the actors (learner, critic, PRM, workers), data position, KL, the DPO
        pair draws."""
        self.step = int(state["step"])
        self.stream.seed = int(state["stream"]["seed"])
        self.stream.epoch = int(state["stream"]["epoch"])
        self.stream._order = self.stream._shuffle()
        self.stream.pos = int(state["stream"]["pos"])
        self.trained_groups = list(state.get("trained_groups", []))
        self.kl_ctl.value = float(state.get("kl_coef", self.kl_ctl.value))
        if "pair_rng" in state:  # checkpoints written before it was saved restart the draws from the seed
            raw = np.frombuffer(base64.b64decode(state["pair_rng"]), dtype=np.uint8).copy()
            self._pair_rng.set_state(torch.from_numpy(raw))
        optimizer_steps = self.actors.restore(path, state)
        versions = self.actors.get([w.get_policy_version.remote() for w in self.workers], "policy versions")
        logger.info(
            "resumed from %s: step %d, policy version %d (learner optimizer steps %d), workers at %s",
            path, self.step, self.policy_version, optimizer_steps, versions,
        )  # fmt: skip

    # ---------------------------------------------------------------- evaluation, logging, the run
    def evaluate(self) -> dict[str, float]:
        """The current policy on every eval set (the held-out split as `test`, eval.sets): one greedy
        (rollout.eval_temperature) answer per prompt and, with trainer.eval_samples = k > 0, k samples at
        rollout.temperature, PRM-scored when a PRM runs -> eval/<set>/<data_source>/{accuracy, mean,
        pass@k, maj@k, bon@k} (rlloop.evaluation). eval/accuracy, eval/accuracy_sampled, eval/pass_at_<k>:
        the test set's."""
        from rlloop.evaluation import evaluate_sets

        cfg = self.cfg
        self._quiesce()
        t0 = time.perf_counter()
        k = cfg.trainer.eval_samples

        def generate(samples: list[Sample], n: int, temperature: float) -> list[Rollout]:
            rollouts = self.generate_all(samples, n=n, temperature=temperature, seed=cfg.trainer.seed)
            self.verify(rollouts)
            return rollouts

        def score(rollouts: list[Rollout]) -> None:
            texts = ([ro.prompt_text for ro in rollouts], [ro.text for ro in rollouts], [ro.step_char_ends for ro in rollouts])
            for ro, res in zip(rollouts, self.prm_pool.score(*texts), strict=True):
                ro.step_values = list(res["step_values"])

        out, per_set = evaluate_sets(
            self.eval_sets, generate, n=k, ks=cfg.eval.ks, greedy_temperature=cfg.rollout.eval_temperature,
            temperature=cfg.rollout.temperature, score=score if self.prm_pool is not None else None,
            bon_aggregation=cfg.eval.bon_aggregation,
        )  # fmt: skip
        test = per_set.get("test", [])
        out |= {
            "eval/accuracy": float(np.mean([r.greedy_correct for r in test])),
            "eval/num_samples": float(len(test)),
            "eval/response_length": float(np.mean([r.greedy_length for r in test])),
        }
        formats = [r.greedy_format for r in test if r.greedy_format is not None]
        if formats:
            out["eval/format"] = float(np.mean(formats))
        if k > 0:
            # pass@1 of the sampling distribution RL trains, averaged over k samples per prompt: it moves
            # before the greedy answer flips, and k samples cut its variance k-fold
            out["eval/accuracy_sampled"] = float(np.mean([c for r in test for c in r.correct]))
            # pass@k: the share of prompts with at least one right answer among their k samples
            out[f"eval/pass_at_{k}"] = float(np.mean([max(r.correct) for r in test]))
        return out | {"time/eval": time.perf_counter() - t0}

    def memory_metrics(self) -> dict[str, float]:
        """`mem/<role>_rss_gb` (rlloop.distributed.lifecycle.Actors.memory_metrics)."""
        return self.actors.memory_metrics()

    def run(self) -> dict[str, Any]:
        """Train for trainer.total_steps; evaluate before, every eval_every steps, and after (rlloop.loop)."""
        from rlloop.loop import fit

        return fit(self)

    def shutdown(self) -> None:
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.close()
        if getattr(self, "actors", None) is not None:
            self.actors.shutdown()


def _in_prompt_order(samples: list[Sample], rollouts: list[Rollout]) -> list[Rollout]:
    """Rollouts grouped by prompt, in the order of `samples` (workers return their shares in any order)."""
    by_group: dict[str, list[Rollout]] = {}
    for ro in rollouts:
        by_group.setdefault(ro.group, []).append(ro)
    return [ro for s in samples for ro in by_group[s.uid]]
