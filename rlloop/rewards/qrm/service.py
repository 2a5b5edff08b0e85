"""Q-RM scoring: per-token rewards s_t for the policy's rollouts, batched.

`QRMScorer` is a plain class (tested without Ray); `QRMService` is its Ray actor, created on first access
so that importing this module does not import Ray.

The scorer reads the policy's token ids directly, so the Q-RM must share the policy's tokenizer (it is
normally trained from the policy's own backbone). Pass `policy_tokenizer_path` to have that checked at
start: a Q-RM with another vocabulary fails there with a clear error instead of scoring garbage.

The returned scores are raw s_t. Normalise them over the batch's action tokens in the fusion step
(`token_fusion(..., token_norm="std")`, or `rlloop.rewards.qrm.loss.qrm_token_rewards`), as Q-RM's PPO does.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch

from rlloop.distributed.actor import ModelActorCore, lazy_actors
from rlloop.rewards.qrm.model import TokenQModel
from rlloop.rewards.qrm.trainer import collate, pad_id_of

logger = logging.getLogger(__name__)


class QRMScorer(ModelActorCore):
    """Per-token Q-RM scores of (prompt, response) token-id pairs.

    model_path: a Q-RM folder written by `python -m rlloop.qrm_train` (`TokenQModel.save_pretrained`); a
    plain LM without the token head is an error (its scores would all be 0), unless `fresh_head_seed` is
    given: then the LM's backbone gets a fresh head drawn with that seed (an untrained Q-RM, whose token
    rewards carry no preference signal: for wiring checks and as a start for online training).
    """

    def __init__(
        self,
        model_path: str,
        *,
        tokenizer_path: str | None = None,
        policy_tokenizer_path: str | None = None,
        dtype: str = "float32",
        num_threads: int = 1,
        batch_size: int = 32,
        device: str = "cpu",
        fresh_head_seed: int | None = None,
    ):
        from transformers import AutoTokenizer

        from rlloop.rewards.qrm.model import has_qrm_head

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        if batch_size < 1:
            raise ValueError(f"QRMScorer: batch_size must be >= 1, got {batch_size}")
        t0 = time.perf_counter()
        if fresh_head_seed is not None and not has_qrm_head(model_path):
            logger.warning(
                "Q-RM: no trained Q-RM given; using %s's backbone with a fresh head (seed %d): its token "
                "rewards carry no preference signal (train one with `python -m rlloop.qrm_train`)",
                model_path,
                fresh_head_seed,
            )
            with torch.random.fork_rng():
                torch.manual_seed(fresh_head_seed)
                self.model = TokenQModel.from_backbone(model_path, dtype=dtype)
        else:
            self.model = TokenQModel.from_pretrained(model_path, dtype=dtype)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        if policy_tokenizer_path is not None:
            check_same_tokenizer(
                self.tokenizer,
                AutoTokenizer.from_pretrained(policy_tokenizer_path),
                f"Q-RM {tokenizer_path or model_path}",
                f"policy {policy_tokenizer_path}",
            )
        self.vocab_size = int(self.model.config.vocab_size)
        self.pad_id = pad_id_of(self.tokenizer)
        self.batch_size = int(batch_size)
        self.version = 0
        logger.info("Q-RM loaded from %s in %.1fs", model_path, time.perf_counter() - t0)

    @torch.no_grad()
    def token_rewards(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """s_t for every response token: one list of len(response_ids[i]) floats per sample.

        One forward pass per sample over prompt + response, in right-padded batches of similar length;
        s_t is read at the response token's own position (it scores token t given tokens <= t).
        """
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"QRMScorer: {len(prompt_ids)} prompts but {len(response_ids)} responses")
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            bad = [t for t in (*p, *r) if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise ValueError(
                    f"QRMScorer: sample {i} has token id {bad[0]} outside the Q-RM's vocabulary "
                    f"[0, {self.vocab_size}) — is the Q-RM trained on the policy's tokenizer?"
                )
        out: list[list[float] | None] = [None] * len(prompt_ids)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
        t0 = time.perf_counter()
        for b in range(0, len(order), self.batch_size):
            rows = [i for i in order[b : b + self.batch_size]]
            nonempty = [i for i in rows if len(response_ids[i])]
            for i in rows:
                if not len(response_ids[i]):
                    out[i] = []
            if not nonempty:
                continue
            input_ids, attention_mask, _ = collate(
                [list(prompt_ids[i]) for i in nonempty],
                [list(response_ids[i]) for i in nonempty],
                self.pad_id,
            )
            s = self.model(input_ids.to(self.device), attention_mask.to(self.device)).float().cpu()
            for row, i in enumerate(nonempty):
                start = len(prompt_ids[i])
                out[i] = s[row, start : start + len(response_ids[i])].tolist()
        logger.debug("Q-RM scored %d samples in %.2fs", len(out), time.perf_counter() - t0)
        return out  # type: ignore[return-value]

    def score_rollouts(self, rollouts: Sequence[Any]) -> list[list[float]]:
        """`token_rewards` on `Rollout`s (prompt_ids, response_ids)."""
        return self.token_rewards([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])



def check_same_tokenizer(a, b, name_a: str, name_b: str, hint: str | None = None) -> None:
    """Raise ValueError unless tokenizers `a` and `b` map every token to the same id (and agree on EOS)."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb or a.eos_token_id != b.eos_token_id:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        hint = hint or (
            "the Q-RM scores the policy's token ids, so train it from the policy's backbone/tokenizer "
            "(python -m rlloop.qrm_train model.path=<policy>)"
        )
        raise ValueError(
            f"{name_a} and {name_b} tokenizers differ (vocab sizes {len(va)} vs {len(vb)}, eos "
            f"{a.eos_token_id} vs {b.eos_token_id}, e.g. {diff}); {hint}"
        )


__getattr__ = lazy_actors(__name__, QRMService=QRMScorer)
