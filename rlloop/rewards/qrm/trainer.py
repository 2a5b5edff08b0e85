"""Q-RM training on preference pairs: encoding, collation, the update and held-out evaluation.

Chosen and rejected completions of a micro-batch go through the model in ONE forward pass (2B rows),
and only their completion tokens enter the per-sequence means of the loss (`rlloop.rewards.qrm.loss`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from rlloop.rewards.qrm.loss import QRM_BETA, QRM_GAMMA, pair_accuracy, qrm_pair_loss
from rlloop.rewards.training import RewardModelTrainer, pad_id_of

logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("raw", "chat")

__all__ = ["PROMPT_FORMATS", "QRMTrainer", "collate", "pad_id_of"]


def collate(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, completion_mask), all `[N, T]`; completion_mask is 1 on
    each row's completion tokens (after its prompt)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    T = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    N = len(prompts)
    input_ids = torch.full((N, T), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((N, T), dtype=torch.long)
    completion_mask = torch.zeros((N, T), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor([*p, *c], dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, len(p) : n] = 1.0
    return input_ids, attention_mask, completion_mask


class QRMTrainer(RewardModelTrainer):
    """Pairwise updates of a `TokenQModel`: L = −log σ(β·(mean s^chosen − mean s^rejected) − γ).

    engine: an optional DeepSpeed engine around `model` (`rlloop.models.ds_engine.build_ds_engine`, built
    with micro_batch_size = this trainer's micro_batch_size); it owns optimizer, clipping and schedule.
    Without it, a plain AdamW (`lr`, `weight_decay`, `max_grad_norm`) with gradients accumulated over
    micro-batches. `optim`: engine, weight_decay, max_grad_norm, micro_batch_size, max_length — the
    keywords of `rlloop.rewards.training.RewardModelTrainer`.
    prompt_format: "raw" = the prompt text is what the model sees (chat template already applied, as in
    `Rollout.prompt_text`); "chat" = render it with the tokenizer's chat template as a user turn.
    append_eos: completions end with the EOS token, as the policy's finished responses do.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        lr: float = 1e-5,
        beta: float = QRM_BETA,
        gamma: float = QRM_GAMMA,
        prompt_format: str = "raw",
        append_eos: bool = True,
        **optim: Any,
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={prompt_format!r}: use one of {list(PROMPT_FORMATS)}")
        super().__init__(model, tokenizer, lr=lr, **optim)
        self.beta, self.gamma = float(beta), float(gamma)
        self.prompt_format = prompt_format
        self.append_eos = append_eos and tokenizer.eos_token_id is not None

    # ----- encoding ----------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, list) or self.prompt_format == "chat":
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the text already holds any BOS the template wants (as rlloop.data.render_prompt)
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def encode_completion(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + [int(self.tokenizer.eos_token_id)] if self.append_eos and ids else ids

    def _fit(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
        """Truncate to max_length: prompt from the left first, then the completion's end."""
        if self.max_length and len(prompt) + len(completion) > self.max_length:
            keep = max(0, self.max_length - len(completion))
            prompt = prompt[len(prompt) - keep :] if keep else []
            completion = completion[: self.max_length - len(prompt)]
        return prompt, completion

    def encode_pairs(self, pairs: Sequence[dict]) -> list[tuple[list[int], list[int], list[int], list[int]]]:
        """(prompt_c, chosen, prompt_r, rejected) token ids per pair; empty completions name the pair."""
        out = []
        for i, pair in enumerate(pairs):
            prompt = self.encode_prompt(pair["prompt"])
            sides = []
            for col in ("chosen", "rejected"):
                ids = self.encode_completion(pair[col])
                if not ids:
                    raise ValueError(f"pair {i} (group {pair.get('group')!r}): {col!r} has no tokens")
                sides.append(self._fit(prompt, ids))
            if sides[0][1] == sides[1][1]:
                raise ValueError(
                    f"pair {i} (group {pair.get('group')!r}): chosen and rejected tokens are identical"
                )
            out.append((*sides[0], *sides[1]))
        return out

    # ----- forward -----------------------------------------------------------------------------------

    def _margins(self, net, encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, Δ [B]) of encoded pairs, chosen and rejected in one forward pass."""
        B = len(encoded)
        prompts = [e[0] for e in encoded] + [e[2] for e in encoded]
        completions = [e[1] for e in encoded] + [e[3] for e in encoded]
        input_ids, attention_mask, cmask = collate(prompts, completions, self.pad_id)
        s = net(input_ids.to(self.device), attention_mask.to(self.device)).float()
        cmask = cmask.to(s.device)
        return qrm_pair_loss(s[:B], cmask[:B], s[B:], cmask[B:], beta=self.beta, gamma=self.gamma)

    def step(self, pairs: Sequence[dict]) -> dict[str, float]:
        """One optimizer step on `pairs`; metrics (of the scores before the update): qrm/loss,
        qrm/pair_acc, qrm/margin, qrm/lr, qrm/version."""
        encoded = self.encode_pairs(pairs)
        self._begin_update()
        losses, margins = [], []
        for b in range(0, len(encoded), self.micro_batch_size):
            chunk = encoded[b : b + self.micro_batch_size]
            loss, margin = self._margins(self.train_net, chunk)
            self._backward(loss, len(chunk), len(encoded))
            losses.append(loss.item() * len(chunk))
            margins.append(margin.detach())
        self._end_update()
        margin = torch.cat(margins)
        return {
            "qrm/loss": sum(losses) / len(encoded),
            "qrm/pair_acc": pair_accuracy(margin),
            "qrm/margin": float(margin.mean()),
            "qrm/lr": self.lr,
            "qrm/version": float(self.version),
        }

    @torch.no_grad()
    def evaluate(self, pairs: Sequence[dict], batch_size: int | None = None) -> dict[str, float]:
        """qrm/loss, qrm/pair_acc (share with Δ > 0), qrm/margin (mean Δ), qrm/num_pairs — no update."""
        if not pairs:
            return {}
        encoded = self.encode_pairs(pairs)
        self.model.eval()
        bs = batch_size or self.micro_batch_size
        total, margins = 0.0, []
        for b in range(0, len(encoded), bs):
            chunk = encoded[b : b + bs]
            loss, margin = self._margins(self.model, chunk)
            total += float(loss) * len(chunk)
            margins.append(margin)
        margin = torch.cat(margins)
        out = {
            "qrm/loss": total / len(encoded),
            "qrm/pair_acc": pair_accuracy(margin),
            "qrm/margin": float(margin.mean()),
            "qrm/num_pairs": float(len(encoded)),
        }
        if not all(math.isfinite(v) for v in out.values()):
            logger.warning("Q-RM evaluation produced non-finite metrics: %s", out)
        return out
