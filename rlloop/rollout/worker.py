"""The rollout worker: prompts in, `Rollout`s out (tokens, sampling log-probs, step boundaries).

`RolloutWorkerCore` is a plain class (tested without Ray); `RolloutWorker` is its Ray actor, created on
first access so that importing this module does not import Ray.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from rlloop.distributed.actor import ActorCore, lazy_actors
from rlloop.rollout.engine import HFEngine, RolloutEngine
from rlloop.rollout.steps import decode_with_offsets, find_step_ends
from rlloop.rollout.vllm_engine import VLLMEngine  # imports vllm only when an engine is built
from rlloop.types import Rollout

logger = logging.getLogger(__name__)

ENGINES: dict[str, type[RolloutEngine]] = {"hf": HFEngine, "vllm": VLLMEngine}


class RolloutWorkerCore(ActorCore):
    """Samples `n` completions per prompt with an engine and finds their reasoning steps.

    Prompts are dicts `{"uid", "prompt_ids", "prompt_text", "data_source", "ground_truth"}`; the response
    text is decoded without special tokens, and its steps (delimiter or regex) are mapped to response
    tokens through per-token character offsets.
    """

    def __init__(
        self,
        model_path: str,
        *,
        engine: str = "hf",
        dtype: str = "float32",
        num_threads: int = 1,
        seed: int = 0,
        step_delimiter: str = "\n\n",
        step_regex: str | None = None,
        tokenizer_path: str | None = None,
        **engine_kwargs: Any,
    ):
        from transformers import AutoTokenizer

        if engine not in ENGINES:
            raise ValueError(f"RolloutWorkerCore: unknown engine {engine!r}; known: {sorted(ENGINES)}")
        self.engine = ENGINES[engine](
            model_path, dtype=dtype, num_threads=num_threads, seed=seed, **engine_kwargs
        )
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        self.step_delimiter = step_delimiter
        self.step_regex = step_regex
        self._policy_version = 0

    @property
    def policy_version(self) -> int:
        return self._policy_version

    def get_policy_version(self) -> int:
        """`policy_version` as a method (Ray actors expose methods, not properties)."""
        return self._policy_version

    def generate(
        self,
        prompts: list[dict],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Rollout]:
        """`len(prompts) * n` rollouts, grouped by prompt in input order; uid `f"{prompt uid}/{i}"`."""
        for k, p in enumerate(prompts):
            for key in ("uid", "prompt_ids"):
                if key not in p:
                    raise KeyError(
                        f"RolloutWorkerCore.generate: prompt {k} (uid {p.get('uid')!r}) has no {key!r}"
                    )
        t0 = time.perf_counter()
        outputs = self.engine.generate(
            [list(p["prompt_ids"]) for p in prompts],
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        rollouts = []
        for p, samples in zip(prompts, outputs, strict=True):
            for i, out in enumerate(samples):
                uid = f"{p['uid']}/{i}"
                try:
                    text, offsets = decode_with_offsets(self.tokenizer, out.response_ids)
                    step_ends, step_char_ends = find_step_ends(
                        text, offsets, self.step_delimiter, self.step_regex
                    )
                except Exception as e:  # name the sample; a silent bad boundary would corrupt rewards
                    raise RuntimeError(
                        f"RolloutWorkerCore: finding steps failed for rollout {uid}: {e}"
                    ) from e
                rollouts.append(
                    Rollout(
                        uid=uid,
                        group=str(p["uid"]),
                        prompt_ids=[int(t) for t in p["prompt_ids"]],
                        response_ids=out.response_ids,
                        rollout_logprobs=out.logprobs,
                        step_ends=step_ends,
                        step_char_ends=step_char_ends,
                        text=text,
                        prompt_text=p.get("prompt_text", ""),
                        finish_reason=out.finish_reason,
                        policy_version=self._policy_version,
                        data_source=p.get("data_source", ""),
                        ground_truth=p.get("ground_truth", ""),
                    )
                )
        num_tokens = sum(len(r.response_ids) for r in rollouts)
        elapsed = time.perf_counter() - t0
        logger.info(
            "generated %d rollouts, %d tokens in %.2fs (%.0f tok/s), policy version %d",
            len(rollouts),
            num_tokens,
            elapsed,
            num_tokens / max(elapsed, 1e-9),
            self._policy_version,
        )
        return rollouts

    def update_weights(self, named_arrays: dict[str, np.ndarray], version: int) -> int:
        """Load new policy weights (HF `state_dict` names -> numpy); returns the new policy version."""
        self.engine.update_weights(named_arrays, version)
        self._policy_version = int(version)
        return self._policy_version

    def load_weight_bucket(self, version: int, index: int, num_buckets: int, payload: Any) -> int:
        """Stage bucket `index` of `num_buckets` of policy `version` (rlloop.distributed.weight_sync);
        the last missing bucket loads the whole version into the engine. `payload`: the bucket's arrays
        or a transport's payload of them (rlloop.distributed.transport). Returns the version served now:
        a partial version is never served."""
        from rlloop.distributed.weight_sync import BucketStager

        if not hasattr(self, "_stager"):
            self._stager = BucketStager()
        named_arrays = self.weight_endpoint.receive(payload)
        arrays = self._stager.add(version, index, num_buckets, named_arrays, self._policy_version)
        if arrays is not None:
            self.update_weights(arrays, version)
        return self._policy_version

    def sleep(self) -> bool:
        """The engine released for the learner phase (rollout.vllm.enable_sleep_mode); True if it sleeps."""
        self.engine.sleep()
        return bool(self.engine.sleeping)

    def wake(self) -> bool:
        """Undo `sleep` before the weight sync; True if the engine was asleep."""
        was = bool(self.engine.sleeping)
        self.engine.wake()
        return was


__getattr__ = lazy_actors(__name__, RolloutWorker=RolloutWorkerCore)
