"""The controller: prompts -> rollouts -> verifier + PRM -> fusion -> advantages -> learner -> sync.

It runs in the driver process and only moves references and small metadata; the heavy work happens in
the actors (rollout workers, verifier pool, PRM service, learner ranks). Each step's seconds are
accounted per phase in `time/*`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlloop.config import to_dict
from rlloop.errors import RlloopError
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


def answer_step_value(rollout: Rollout, prompt_value: float) -> float:
    """V of the prefix before the first step containing `\\boxed` (TDRM's release); the whole completion if none."""
    values = rollout.step_values or []
    if not values:
        return prompt_value
    starts = [0, *rollout.step_char_ends[:-1]]
    for k, (s, e) in enumerate(zip(starts, rollout.step_char_ends)):
        if "\\boxed" in rollout.text[s:e]:
            return prompt_value if k == 0 else values[k - 1]
    return values[-1]


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
        self._render = render_prompt
        self._prompt_cache: dict[str, dict] = {}
        self.stream = PromptStream(self.train_set, cfg.trainer.seed)
        self.step = 0
        self._start_actors()

    # ---------------------------------------------------------------- set-up
    def _start_actors(self) -> None:
        import ray

        from rlloop.distributed.ray_setup import init_ray
        from rlloop.learner.group import LearnerGroup
        from rlloop.rewards.verifiers.pool import VerifierPool
        from rlloop.rollout.worker import RolloutWorker

        cfg = self.cfg
        init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.host)
        t0 = time.perf_counter()
        self.verifier = VerifierPool(cfg.reward.verifier)
        self.verifier.check_sources({s.data_source for s in self.train_set + self.test_set})
        r = cfg.rollout
        self.workers = [
            RolloutWorker.options(num_cpus=0.25, name=None).remote(
                self.model_path,
                engine=r.engine,
                dtype=cfg.model.dtype,
                num_threads=r.num_threads,
                seed=cfg.trainer.seed + 1000 * i,
                step_delimiter=r.step_delimiter,
                step_regex=r.step_regex,
            )
            for i in range(r.num_workers)
        ]
        self.prm = None
        if cfg.reward.prm.enabled:
            from rlloop.rewards.prm.service import PRMService

            p = cfg.reward.prm
            self.prm = PRMService.options(num_cpus=0.1).remote(
                p.path or self.model_path,
                tokenizer_path=None if p.path else self.model_path,
                num_threads=p.num_threads,
                batch_size=p.batch_size,
                step_delimiter=r.step_delimiter,
                step_regex=r.step_regex,
            )
        self.learner = LearnerGroup(
            self.model_path,
            to_dict(cfg.learner),
            to_dict(cfg.algo),
            temperature=r.temperature,
            train_batch_size=r.prompts_per_step * r.n,
            seed=cfg.trainer.seed,
            num_cpus_per_rank=0.5,
            timeout_s=cfg.trainer.call_timeout_s,
        )
        self._get([w.__ray_ready__.remote() for w in self.workers], "rollout workers start-up")
        if self.prm is not None:
            self._get(self.prm.__ray_ready__.remote(), "PRM service start-up")
        self.policy_version = 0
        logger.info("actors up in %.1f s (ray %s)", time.perf_counter() - t0, ray.__version__)

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

    def generate(self, samples: list[Sample], *, n: int, temperature: float, seed: int | None) -> list[Rollout]:
        """Split prompts over the rollout workers; rollouts come back grouped in prompt order."""
        r = self.cfg.rollout
        prompts = [self._prompt(s) for s in samples]
        shards = [prompts[i :: len(self.workers)] for i in range(len(self.workers))]
        refs = [
            w.generate.remote(
                shard,
                n=n,
                max_new_tokens=r.max_new_tokens,
                temperature=temperature,
                top_p=r.top_p,
                seed=None if seed is None else seed + i,
            )
            for i, (w, shard) in enumerate(zip(self.workers, shards))
            if shard
        ]
        by_group: dict[str, list[Rollout]] = {}
        for out in self._get(refs, "rollout workers generate"):
            for ro in out:
                by_group.setdefault(ro.group, []).append(ro)
        return [ro for p in prompts for ro in by_group[p["uid"]]]

    def verify(self, rollouts: list[Rollout]) -> dict[str, float]:
        """Attach verifier scores to each rollout (`outcome`).

        Returns the fraction of samples that scored 0 with a reason (no answer found, timeout, crash).
        """
        from rlloop.rewards.verifiers.base import VerifyRequest

        requests = [
            VerifyRequest(
                uid=ro.uid,
                data_source=ro.data_source,
                solution_str=ro.text,
                ground_truth=ro.ground_truth,
                prompt=ro.prompt_text,
            )
            for ro in rollouts
        ]
        results = self.verifier.score(requests)
        failed = 0
        for ro, res in zip(rollouts, results):
            ro.outcome = {"correct": float(res.score), **{k: float(v) for k, v in res.scores.items()}}
            ro.outcome_info = {"reason": res.reason} if res.reason else {}
            failed += bool(res.reason)
        return {"verifier/unscored_frac": failed / max(len(rollouts), 1)}

    def fuse(self, rollouts: list[Rollout], prm_out: list[dict] | None) -> tuple[np.ndarray, dict[str, float]]:
        """Per-rollout fused reward (fusion=outcome) and per-source statistics."""
        from rlloop.algos.fusion import fusion_stats, outcome_fusion

        rw = self.cfg.reward
        outcome = torch.tensor([ro.outcome["correct"] for ro in rollouts], dtype=torch.float32)
        prm_value = None
        if prm_out is not None:
            for ro, out in zip(rollouts, prm_out):
                ro.step_values = list(out["step_values"])
            prm_value = torch.tensor(
                [answer_step_value(ro, out["prompt_value"]) for ro, out in zip(rollouts, prm_out)],
                dtype=torch.float32,
            )
        if rw.fusion != "outcome":
            raise RlloopError(f"reward.fusion={rw.fusion!r} is not wired into the training loop yet; use outcome")
        total = outcome_fusion(outcome, prm_value, w_rule=rw.w_rule, w_prm=rw.w_prm, g=rw.prm.g)
        components = {"rule": outcome}
        if prm_value is not None:
            components["prm"] = prm_value
        stats = fusion_stats(components, outcome)
        return total.numpy(), stats

    def advantages(self, batch: Batch, scores: np.ndarray, groups: list[str]) -> None:
        """Fill batch.advantages / batch.returns with the configured estimator."""
        from rlloop.algos.advantages import compute_advantages
        from rlloop.algos.fusion import place_on_last_token

        a = self.cfg.algo
        mask = torch.from_numpy(batch.response_mask)
        token_rewards = place_on_last_token(torch.from_numpy(scores), mask)
        index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        group_ids = torch.tensor([index[g] for g in groups], dtype=torch.long)
        adv, ret = compute_advantages(
            a.advantage, token_rewards, mask, group_ids, gamma=a.gamma, lam=a.lam, eps=a.adv_eps
        )
        batch.token_rewards = token_rewards.numpy()
        batch.advantages = adv.numpy().astype(np.float32)
        batch.returns = ret.numpy().astype(np.float32)

    def sync_weights(self) -> None:
        ref = self.learner.state_dict_ref()
        self.policy_version += 1
        versions = self._get(
            [w.update_weights.remote(ref, self.policy_version) for w in self.workers], "rollout workers update_weights"
        )
        if any(v != self.policy_version for v in versions):
            raise RuntimeError(f"weight sync: workers report versions {versions}, expected {self.policy_version}")

    # ---------------------------------------------------------------- the loop
    def train_step(self) -> dict[str, float]:
        cfg, timer = self.cfg, StepTimer()
        t_step = time.perf_counter()
        samples = self.stream.take(cfg.rollout.prompts_per_step)
        with timer.phase("generate"):
            rollouts = self.generate(
                samples, n=cfg.rollout.n, temperature=cfg.rollout.temperature, seed=cfg.trainer.seed * 7919 + self.step
            )
        # The PRM scores while the verifier pool checks answers.
        prm_ref = None
        if self.prm is not None:
            prm_ref = self.prm.score.remote(
                [ro.prompt_text for ro in rollouts],
                [ro.text for ro in rollouts],
                [ro.step_char_ends for ro in rollouts],
            )
        with timer.phase("verify"):
            verify_stats = self.verify(rollouts)
        with timer.phase("prm"):
            prm_out = self._get(prm_ref, "PRM service score") if prm_ref is not None else None
        scores, fusion_metrics = self.fuse(rollouts, prm_out)
        batch = build_batch(rollouts, self.pad_id)
        self.advantages(batch, scores, [ro.group for ro in rollouts])
        with timer.phase("logprobs"):
            batch.old_logprobs = self.learner.compute_logprobs(batch, "policy")
            if cfg.algo.use_ref:
                batch.ref_logprobs = self.learner.compute_logprobs(batch, "ref")
        with timer.phase("learner"):
            learner_metrics = self.learner.train_step(batch)
        with timer.phase("sync"):
            self.sync_weights()
        self.step += 1
        timer.seconds["step"] = time.perf_counter() - t_step
        lengths = np.array([len(ro.response_ids) for ro in rollouts], dtype=np.float32)
        mask = batch.response_mask > 0
        mismatch = np.abs(batch.old_logprobs - batch.rollout_logprobs)[mask]
        metrics = {
            "reward/total": float(scores.mean()),
            "reward/rule": float(np.mean([ro.outcome["correct"] for ro in rollouts])),
            "accuracy": float(np.mean([ro.outcome["correct"] >= 1.0 for ro in rollouts])),
            "response_length/mean": float(lengths.mean()),
            "response_length/clip_frac": float(np.mean([ro.finish_reason == "length" for ro in rollouts])),
            "rollout/policy_version": float(min(ro.policy_version for ro in rollouts)),
            "rollout/logprob_mismatch": float(mismatch.mean()) if mismatch.size else 0.0,
            "kl": float(learner_metrics.get("actor/kl_ref", 0.0)),
            "entropy": float(learner_metrics.get("actor/entropy", float("nan"))),
            "prompts_seen": float(self.step * cfg.rollout.prompts_per_step),
            **{f"reward/{k}": v for k, v in _extra_scores(rollouts).items()},
            **{f"fusion/{k}": v for k, v in fusion_metrics.items()},
            **verify_stats,
            **learner_metrics,
            **timer.metrics(),
        }
        if prm_out is not None:
            metrics["reward/prm_value"] = float(np.mean([answer_step_value(ro, o["prompt_value"]) for ro, o in zip(rollouts, prm_out)]))
        self._last_rollouts = rollouts
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Greedy (or eval_temperature) accuracy on the held-out set with the current policy."""
        cfg = self.cfg
        t0 = time.perf_counter()
        samples = self.test_set if cfg.task.num_test <= 0 else self.test_set[: cfg.task.num_test]
        temperature = cfg.rollout.eval_temperature
        rollouts = self.generate(samples, n=1, temperature=temperature, seed=cfg.trainer.seed)
        self.verify(rollouts)
        acc = float(np.mean([ro.outcome["correct"] >= 1.0 for ro in rollouts]))
        return {
            "eval/accuracy": acc,
            "eval/num_samples": float(len(rollouts)),
            "eval/response_length": float(np.mean([len(ro.response_ids) for ro in rollouts])),
            "time/eval": time.perf_counter() - t0,
        }

    def log_samples(self, tracker: Any) -> None:
        rows = []
        for ro in getattr(self, "_last_rollouts", [])[:4]:
            rows.append(
                [ro.uid, ro.prompt_text[-200:], ro.text, ro.ground_truth, ro.outcome.get("correct"), ro.step_values]
            )
        if rows:
            tracker.log_table(
                "samples", ["uid", "prompt", "response", "ground_truth", "correct", "step_values"], rows, self.step
            )

    def run(self) -> dict[str, Any]:
        """Train for trainer.total_steps; evaluate before, every eval_every steps, and after."""
        from tqdm.auto import tqdm

        from rlloop.plotting import plot_run
        from rlloop.tracking import Tracker, redact

        cfg = self.cfg
        tracker = Tracker(list(cfg.logger), self.out_dir, config=redact(to_dict(cfg)), wandb_cfg=to_dict(cfg.wandb))
        summary: dict[str, Any] = {"out_dir": str(self.out_dir), "model_path": self.model_path}
        try:
            if cfg.trainer.eval_before:
                ev = self.evaluate()
                tracker.log(ev, step=0)
                summary["eval_before"] = ev["eval/accuracy"]
            bar = tqdm(range(cfg.trainer.total_steps), desc="RL steps", unit="step", dynamic_ncols=True)
            for _ in bar:
                metrics = self.train_step()
                every = cfg.trainer.eval_every
                if every and self.step % every == 0 and self.step < cfg.trainer.total_steps:
                    metrics.update(self.evaluate())
                tracker.log(metrics, step=self.step)
                if cfg.trainer.log_samples_every and self.step % cfg.trainer.log_samples_every == 0:
                    self.log_samples(tracker)
                bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['accuracy']:.3f}")
            ev = self.evaluate()
            tracker.log(ev, step=self.step)
            summary["eval_after"] = ev["eval/accuracy"]
            if cfg.trainer.save_final:
                ckpt = self.out_dir / "checkpoint"
                self.learner.save_hf(str(ckpt), tokenizer_path=self.model_path)
                summary["checkpoint"] = str(ckpt)
        finally:
            tracker.finish()
        if (self.out_dir / "metrics.jsonl").exists():
            summary["plot"] = str(plot_run(self.out_dir / "metrics.jsonl", self.out_dir / "training.png"))
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def shutdown(self) -> None:
        import ray

        for closer in (getattr(self, "learner", None), getattr(self, "verifier", None)):
            if closer is not None:
                try:
                    closer.shutdown()
                except Exception:  # noqa: BLE001 - best effort at exit
                    logger.exception("shutdown failed")
        for actor in [*getattr(self, "workers", []), getattr(self, "prm", None)]:
            if actor is not None:
                ray.kill(actor)


def _extra_scores(rollouts: list[Rollout]) -> dict[str, float]:
    """Means of every named verifier score besides `correct` (e.g. `format`)."""
    keys = {k for ro in rollouts for k in ro.outcome if k != "correct"}
    return {k: float(np.mean([ro.outcome.get(k, math.nan) for ro in rollouts])) for k in sorted(keys)}
