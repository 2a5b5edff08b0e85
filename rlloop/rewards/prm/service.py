"""PRM scoring: values of every step of a trajectory from one forward pass, batched.

`PRMScorer` is a plain class (tested without Ray); `PRMService` is its Ray actor, created on first access
so that importing this module does not import Ray.

The PRM tokenises with its OWN tokenizer: the prompt is encoded as is (with the tokenizer's special tokens,
e.g. BOS) and the response after it without special tokens; the response's step ends, given as characters
of the response text (`Rollout.step_char_ends`), are mapped to the PRM's tokens through its offsets. Encoding
the two parts separately keeps the last prompt token free of response characters.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch

from rlloop.distributed.actor import ModelActorCore, lazy_actors
from rlloop.rewards.prm.adapters import EncodedTrajectory, detect_adapter, load_adapter
from rlloop.rewards.prm.batching import pack_by_token_budget
from rlloop.rewards.prm.model import ValueHeadModel, has_value_head, one_pass_step_logits
from rlloop.rollout.steps import char_ends_to_token_ends, split_steps

logger = logging.getLogger(__name__)


class PRMScorer(ModelActorCore):
    """Scores trajectories with a `ValueHeadModel`: V after the prompt and after every step.

    model_path: a PRM folder (backbone + value head), or a plain causal LM (e.g. the policy's init), which
    gets a fresh zero head (V = 0.5 everywhere: the untrained default) unless `require_value_head`.
    max_length: longest PRM input in tokens; longer trajectories lose prompt tokens from the left.
    max_batch_tokens: micro-batches are packed longest first so that rows x longest row <= this (padded
    tokens per forward pass, which bounds activation memory); `batch_size` caps the rows as well; None
    packs `batch_size` rows per batch whatever their length.
    device: "cpu", "cuda", "cuda:N" or "auto" (cuda when torch sees a GPU, else cpu); "cpu" never
    touches CUDA.
    adapter: how the folder reads steps (rlloop.rewards.prm.adapters): "rlloop" (value head),
    "qwen_prm", "math_shepherd", "trl_token_cls", or "auto" (detected from the folder); `adapter_options`
    are that adapter's settings and `trust_remote_code` lets a published PRM load its own modelling code.
    """

    def __init__(
        self,
        model_path: str,
        *,
        tokenizer_path: str | None = None,
        require_value_head: bool = False,
        dtype: str = "float32",
        num_threads: int = 1,
        batch_size: int = 32,
        max_batch_tokens: int | None = 8192,
        device: str = "cpu",
        step_delimiter: str = "\n\n",
        step_regex: str | None = None,
        max_length: int | None = None,
        adapter: str = "auto",
        adapter_options: dict | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        from rlloop.rewards.heads import torch_dtype

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        t0 = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        self.adapter_name = detect_adapter(model_path) if adapter == "auto" else adapter
        self.adapter = None  # rlloop's own value head: encoded and read here
        if self.adapter_name != "rlloop":
            self.adapter = load_adapter(
                self.adapter_name,
                model_path,
                self.tokenizer,
                dtype=torch_dtype(dtype),
                trust_remote_code=trust_remote_code,
                options=adapter_options,
            )
            self.model = self.adapter.model
        elif has_value_head(model_path) or require_value_head:
            self.model = ValueHeadModel.from_pretrained(model_path, dtype=dtype)
        else:
            logger.warning("PRM: %s has no value head; starting a fresh one (V = 0.5 everywhere)", model_path)
            self.model = ValueHeadModel.from_backbone(model_path, dtype=dtype)
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"PRM tokenizer at {tokenizer_path or model_path} is not a fast tokenizer (no offsets)"
            )
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        if batch_size < 1:
            raise ValueError(f"PRM: batch_size={batch_size} must be >= 1")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"PRM: max_batch_tokens={max_batch_tokens} must be >= 1 (or None)")
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.step_delimiter = step_delimiter
        self.step_regex = step_regex
        self.max_length = max_length
        self.version = 0
        logger.info(
            "PRM (%s) loaded from %s in %.1fs", self.adapter_name, model_path, time.perf_counter() - t0
        )

    # ----- encoding --------------------------------------------------------------------------------

    def encode(
        self, prompt_text: str, response_text: str, step_char_ends: Sequence[int] | None = None
    ) -> EncodedTrajectory:
        """The trajectory in the PRM's tokens; step ends default to the steps found in `response_text`."""
        if step_char_ends is None:
            step_char_ends = [e for _, e in split_steps(response_text, self.step_delimiter, self.step_regex)]
        if any(not 0 < c <= len(response_text) for c in step_char_ends):
            raise ValueError(
                f"PRM: step ends {list(step_char_ends)} outside the response text (length {len(response_text)})"
            )
        if self.adapter is not None:  # a published PRM's own step convention
            return self.adapter.encode(prompt_text, response_text, list(step_char_ends), self.max_length)
        prompt_ids = list(self.tokenizer(prompt_text)["input_ids"])
        if not prompt_ids:
            raise ValueError(
                f"PRM: prompt {prompt_text[:40]!r} has no tokens (the prompt value is read at its end)"
            )
        enc = self.tokenizer(response_text, add_special_tokens=False, return_offsets_mapping=True)
        response_ids = list(enc["input_ids"])
        ends = char_ends_to_token_ends(list(step_char_ends), enc["offset_mapping"]) if step_char_ends else []
        if self.max_length is not None and len(prompt_ids) + len(response_ids) > self.max_length:
            # Truncate the prompt from the left (as TDRM does); the response is what gets scored.
            keep = self.max_length - len(response_ids)
            if keep < 1:
                raise ValueError(
                    f"PRM: response of {len(response_ids)} tokens leaves no room for the prompt "
                    f"within max_length={self.max_length}"
                )
            prompt_ids = prompt_ids[-keep:]
        start = len(prompt_ids)
        return EncodedTrajectory(prompt_ids + response_ids, start - 1, [start + t for t in ends])

    def collate(self, encoded: Sequence[EncodedTrajectory]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded `(input_ids, attention_mask)`, both `[B, T]` int64."""
        width = max(len(e.input_ids) for e in encoded)
        input_ids = torch.full((len(encoded), width), int(self.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for r, e in enumerate(encoded):
            input_ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
            attention_mask[r, : len(e.input_ids)] = 1
        return input_ids, attention_mask

    # ----- scoring ---------------------------------------------------------------------------------

    def score(
        self,
        prompt_texts: Sequence[str],
        response_texts: Sequence[str],
        step_char_ends: Sequence[Sequence[int]] | None = None,
    ) -> list[dict]:
        """Per trajectory `{"prompt_value", "step_values", "step_logits"}`; V in (0, 1), input order.

        step_char_ends[i]: exclusive end characters of the steps of response i (as in
        `Rollout.step_char_ends`); None finds them with this scorer's delimiter/regex. One forward pass
        per trajectory, in right-padded micro-batches packed under `max_batch_tokens`.
        """
        return self.score_request(prompt_texts, response_texts, step_char_ends)["results"]

    def score_request(
        self,
        prompt_texts: Sequence[str],
        response_texts: Sequence[str],
        step_char_ends: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, Any]:
        """`score`, plus what it cost: `{"results", "seconds", "tokens", "padded_tokens", "batches"}`
        (tokens = real PRM tokens; padded_tokens = rows x width summed over the micro-batches)."""
        if len(prompt_texts) != len(response_texts):
            raise ValueError(f"PRM.score: {len(prompt_texts)} prompts but {len(response_texts)} responses")
        if step_char_ends is not None and len(step_char_ends) != len(response_texts):
            raise ValueError(
                f"PRM.score: {len(step_char_ends)} step lists for {len(response_texts)} responses"
            )
        t0 = time.perf_counter()
        encoded = []
        for i, (p, r) in enumerate(zip(prompt_texts, response_texts, strict=True)):
            try:
                encoded.append(self.encode(p, r, None if step_char_ends is None else step_char_ends[i]))
            except Exception as e:
                raise ValueError(f"PRM.score: trajectory {i}: {e}") from e
        results: list[dict | None] = [None] * len(encoded)
        lengths = [len(e.input_ids) for e in encoded]
        batches = pack_by_token_budget(lengths, self.max_batch_tokens, self.batch_size)
        padded = 0
        for rows in batches:
            batch = [encoded[i] for i in rows]
            input_ids, attention_mask = self.collate(batch)
            padded += input_ids.numel()
            positions = [[e.prompt_position, *e.step_positions] for e in batch]
            logits = one_pass_step_logits(
                self.model, input_ids.to(self.device), attention_mask.to(self.device), positions
            )
            for i, row in zip(rows, logits, strict=True):
                values = torch.sigmoid(torch.tensor(row, dtype=torch.float64)).tolist()
                if self.adapter is not None:
                    values[0] = 0.5  # a published PRM has no value for the empty prefix: neutral
                results[i] = {"prompt_value": values[0], "step_values": values[1:], "step_logits": row[1:]}
        seconds = time.perf_counter() - t0
        logger.debug("PRM scored %d trajectories in %d batches in %.2fs", len(encoded), len(batches), seconds)
        return {
            "results": results,
            "seconds": seconds,
            "tokens": sum(lengths),
            "padded_tokens": padded,
            "batches": len(batches),
        }

    def score_rollouts(self, rollouts: Sequence[Any]) -> list[dict]:
        """`score` on `Rollout`s (prompt_text, text, step_char_ends)."""
        return self.score(
            [r.prompt_text for r in rollouts],
            [r.text for r in rollouts],
            [r.step_char_ends for r in rollouts],
        )

    # ----- weights ---------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write a PRM folder (backbone, value head, tokenizer) loadable by `PRMScorer(path)`."""
        self._require_value_head("saving")
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # ----- online mode: the PRM learns by TD on the loop's fresh rollouts (actor-critic) -------------

    def enable_online(self, **trainer_kwargs: Any) -> None:
        """Attach a TD trainer (its own optimizer; kwargs of TDPRMTrainer: lr, td, gamma, n, lam, ema,
        micro_batch_size) to this scorer's model, so `td_update` changes what `score` returns."""
        self._require_value_head("reward.prm.online=true")
        from rlloop.rewards.prm.td_trainer import TDPRMTrainer

        self.trainer = TDPRMTrainer(
            self.model,
            self.tokenizer,
            step_delimiter=self.step_delimiter,
            step_regex=self.step_regex,
            max_length=self.max_length,
            **trainer_kwargs,
        )

    def _require_value_head(self, what: str) -> None:
        if self.adapter is not None:
            raise ValueError(
                f"PRM: {what} needs rlloop's value-head PRM; the {self.adapter_name} adapter's model is "
                "scored frozen (use reward.prm.adapter=rlloop, or reward.prm.online=false)"
            )

    def td_update(
        self,
        prompt_texts: Sequence[str],
        response_texts: Sequence[str],
        step_char_ends: Sequence[Sequence[int]],
        outcomes: Sequence[float],
    ) -> dict[str, float]:
        """One TD step on verified trajectories; those without steps (empty responses) are skipped."""
        if getattr(self, "trainer", None) is None:
            raise RuntimeError("td_update needs enable_online() first (reward.prm.online=true)")
        keep = [i for i, ends in enumerate(step_char_ends) if ends]
        if not keep:
            return {"prm/skipped": float(len(step_char_ends))}
        metrics = self.trainer.step(
            [prompt_texts[i] for i in keep],
            [response_texts[i] for i in keep],
            [step_char_ends[i] for i in keep],
            [min(1.0, max(0.0, float(outcomes[i]))) for i in keep],
        )
        self.version += 1
        metrics["prm/skipped"] = float(len(step_char_ends) - len(keep))
        metrics["prm/version"] = float(self.version)
        return metrics


def resolve_device(device: str) -> torch.device:
    """The torch device for `device` ("cpu", "cuda", "cuda:N", "auto"); asking for CUDA without one
    fails here, naming the setting, instead of deep inside the first forward pass."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"PRM device={device!r} but torch sees no CUDA device here (use cpu or auto)")
        return torch.device(device)
    raise ValueError(f"PRM device={device!r}: choose cpu, cuda, cuda:N or auto")


__getattr__ = lazy_actors(__name__, PRMService=PRMScorer)
