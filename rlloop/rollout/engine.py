"""Rollout engines: sample completions from token ids and report the sampling log-probabilities.

`RolloutEngine` is the narrow interface the worker uses; `HFEngine` (transformers `generate` with a KV
cache) is the default and runs everywhere; a vLLM engine can implement the same interface on GPU.
"""

from __future__ import annotations

import logging
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    """One sampled completion: response token ids (EOS included when sampled) and their log-probs."""

    response_ids: list[int]
    logprobs: list[float]  # log pi(y_t | y_<t) on logits / temperature, one per response token
    finish_reason: str  # "stop" (EOS sampled) | "length" (max_new_tokens reached)


@dataclass(frozen=True)
class Sampling:
    """A checked `generate` request: `n` >= 1 samples per prompt of at most `max_new_tokens` >= 1 tokens."""

    n: int
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seed: int | None


class RolloutEngine(ABC):
    """Generates `n` samples per prompt and takes new weights between steps."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
        **engine_options,
    ) -> list[list[GenerationOutput]]:
        """Outputs indexed `[prompt][sample]`. temperature 0 means greedy. engine_options are the engine's
        own (`VLLMEngine`: `stop`); the request is checked here once, for every engine."""
        name = type(self).__name__
        if n < 1 or max_new_tokens < 1:
            raise ValueError(
                f"{name}.generate: need n >= 1 and max_new_tokens >= 1, got {n}, {max_new_tokens}"
            )
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"{name}.generate: prompt {i} has no tokens")
        sampling = Sampling(n, max_new_tokens, temperature, top_p, seed)
        return self._generate(prompt_ids, sampling, **engine_options)

    @abstractmethod
    def _generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[GenerationOutput]]:
        """`generate` on a checked request: no empty prompt, `sampling` as `Sampling` says."""

    @abstractmethod
    def update_weights(self, named_arrays: dict[str, np.ndarray], version: int) -> None:
        """Load (a subset of) the policy's HF `state_dict()` given as numpy arrays."""

    sleeping = False  # True between sleep() and wake() on an engine with a sleep mode (VLLMEngine)

    def sleep(self) -> None:
        """Release accelerator memory between rollout phases (no-op on CPU)."""
        return None

    def wake(self) -> None:
        """Undo `sleep` (no-op on CPU)."""
        return None


def _capture_processor_class():
    from transformers import LogitsProcessor

    class _CaptureLogprobs(LogitsProcessor):
        """Records log pi(chosen token) on the raw logits divided by `temperature`.

        Placed first in the processor list, it sees the model's logits before the sampling warpers
        (top-p); the token chosen at step t is only known at step t+1 (the last column of `input_ids`),
        so it keeps one step of log-probs `[B, V]` rather than the whole `[steps, B, V]` history.
        """

        def __init__(self, temperature: float):
            self.temperature = temperature
            self.pending = None  # log-softmax of the last step, [B, V]
            self.chosen: list = []  # per step: log-prob of the chosen token, [B]

        def take(self, tokens):
            if self.pending is not None:
                self.chosen.append(self.pending.gather(1, tokens[:, None]).squeeze(1))
                self.pending = None

        def __call__(self, input_ids, scores):
            import torch

            self.take(input_ids[:, -1])
            self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
            return scores

    return _CaptureLogprobs


class HFEngine(RolloutEngine):
    """transformers `generate` with a KV cache, left padding and batches sorted by prompt length.

    Log-probs are taken during sampling on logits/temperature (greedy: raw logits), the distribution the
    learner recomputes. Responses stop at EOS (kept as the last response token); padding is stripped.
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        num_threads: int = 1,
        seed: int = 0,
        max_batch_size: int = 64,
        device: str = "cpu",
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        lora: dict | None = None,
    ):
        """lora: learner.lora; the model then carries the learner's (peft) adapter, fresh at start (the
        base's function), and `update_weights` takes the adapter's tensors alone."""
        import torch
        from transformers import AutoModelForCausalLM

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        self.model_path = model_path
        self.dtype = getattr(torch, dtype)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device).eval()
        if lora is not None:
            from rlloop.learner.lora import apply_lora

            self.model = apply_lora(self.model, lora).to(self.device).eval()
        self.max_batch_size = max_batch_size
        self.eos_token_ids = self._eos_ids(eos_token_id)
        if not self.eos_token_ids:
            raise ValueError(
                f"HFEngine: no eos_token_id in {model_path} (config/generation_config); pass one"
            )
        if pad_token_id is None:
            pad_token_id = self.model.config.pad_token_id
            if pad_token_id is None:
                pad_token_id = self.eos_token_ids[0]
        self.pad_token_id = int(pad_token_id)
        self.version = 0
        logger.info("HFEngine loaded %s (%s) in %.1fs", model_path, dtype, time.perf_counter() - t0)

    def _eos_ids(self, eos_token_id) -> list[int]:
        if eos_token_id is None:
            gen_config = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(gen_config, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = self.model.config.eos_token_id
        if eos_token_id is None:
            return []
        return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]

    def _generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[GenerationOutput]]:
        import torch

        n = sampling.n
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        # One row per (prompt, sample); rows sorted by prompt length so a batch pads little.
        rows = sorted(
            ((i, j) for i in range(len(prompt_ids)) for j in range(n)), key=lambda r: len(prompt_ids[r[0]])
        )
        out: list[list[GenerationOutput | None]] = [[None] * n for _ in prompt_ids]
        for b in range(0, len(rows), self.max_batch_size):
            chunk = rows[b : b + self.max_batch_size]
            results = self._generate_batch(
                [prompt_ids[i] for i, _ in chunk],
                sampling.max_new_tokens,
                sampling.temperature,
                sampling.top_p,
            )
            for (i, j), result in zip(chunk, results, strict=True):
                out[i][j] = result
        return out  # type: ignore[return-value]

    def generate_padded(
        self, prompts: list[list[int]], *, max_new_tokens: int, sampling: dict | None, **generate_kwargs
    ):
        """`model.generate` on `prompts` as one left-padded batch (every prompt ends at column `width`, the
        longest prompt's length) under a neutral GenerationConfig: the model's generation_config defaults
        (top_k=50, repetition penalties) never apply. sampling: None = greedy, else GenerationConfig's
        sampling fields; generate_kwargs go to `model.generate` (logits processors, stopping criteria).
        Returns (sequences [N, width + new tokens], width)."""
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[r, width - len(p) :] = 1
        gen_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sampling is not None,
            num_beams=1,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            **(sampling or {}),
        )
        with torch.no_grad():
            result = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=gen_config,
                **generate_kwargs,
            )
        return (result.sequences if hasattr(result, "sequences") else result), width

    def _generate_batch(self, prompts, max_new_tokens, temperature, top_p) -> list[GenerationOutput]:
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        greedy = temperature <= 0.0
        capture = _capture_processor_class()(1.0 if greedy else temperature)
        processors = LogitsProcessorList([capture])
        if not greedy:
            # Our own warpers (after the capture) and a neutral config, so that neither the model's
            # generation_config defaults (top_k=50, repetition penalties) nor HF's own warpers reshape
            # the distribution the log-probs describe.
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        sampling = None if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        sequences, width = self.generate_padded(
            prompts, max_new_tokens=max_new_tokens, sampling=sampling, logits_processor=processors
        )
        new_tokens = sequences[:, width:].cpu()
        capture.take(sequences[:, -1])
        logprobs = (
            torch.stack(capture.chosen, dim=1).cpu()
            if capture.chosen
            else torch.zeros_like(new_tokens, dtype=torch.float)
        )
        if logprobs.shape != new_tokens.shape:
            raise RuntimeError(
                f"HFEngine: captured log-probs {tuple(logprobs.shape)} do not match generated tokens "
                f"{tuple(new_tokens.shape)}; a logits processor ran an unexpected number of times"
            )
        eos = torch.tensor(self.eos_token_ids)
        outputs = []
        for r in range(len(prompts)):
            tokens = new_tokens[r].tolist()
            is_eos = torch.isin(new_tokens[r], eos).nonzero()
            if len(is_eos):
                end, reason = int(is_eos[0]) + 1, "stop"
            else:
                end, reason = len(tokens), "length"
            outputs.append(GenerationOutput(tokens[:end], logprobs[r, :end].tolist(), reason))
        return outputs

    def update_weights(self, named_arrays: dict[str, np.ndarray], version: int) -> None:
        import torch

        t0 = time.perf_counter()
        state = self.model.state_dict()
        unknown = [k for k in named_arrays if k not in state]
        if unknown:
            raise KeyError(
                f"HFEngine.update_weights: names not in the model {self.model_path}: {unknown[:5]}"
            )
        with warnings.catch_warnings():
            # arrays from Ray's object store are read-only; load_state_dict copies them, so no harm
            warnings.filterwarnings("ignore", message=".*not writable.*")
            tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in named_arrays.items()}
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(state[k].shape):
                raise ValueError(
                    f"HFEngine.update_weights: {k} has shape {tuple(t.shape)}, model expects {tuple(state[k].shape)}"
                )
        self.model.load_state_dict(tensors, strict=False)
        self.version = int(version)
        logger.info(
            "HFEngine: loaded %d arrays, version %d, in %.3fs",
            len(tensors),
            version,
            time.perf_counter() - t0,
        )
