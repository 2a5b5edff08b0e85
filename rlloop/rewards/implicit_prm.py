"""The implicit PRM of PRIME (arXiv 2502.01456): dense token rewards that need no step labels.

A causal LM π_φ, initialised from the policy, and a frozen copy π_ref give each response token

    r_t = β · (log π_φ(y_t | y_<t) − log π_ref(y_t | y_<t))                    (β = 0.05 released)

and π_φ is updated online, after scoring, with the cross-entropy between σ(Σ_t r_t) = σ(β Σ_t log-ratio)
and the verified 0/1 outcome — so its token rewards learn where correct and wrong solutions part ways.
(PRIME's code keeps r_t without β in the rm_scores it trains on and puts β inside the sigmoid; the
token rewards handed to RL are β times the log-ratio. The same thing is computed here.)

PRIME's fusion of these token rewards with the outcome (`prime_advantages`) and its prompt filter
(`prime_prompt_filter`) are pure functions beside the other fusions, in rlloop.algos.fusion.

`ImplicitPRM` is a plain class (tested without Ray); `ImplicitPRMService` is its Ray actor.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rlloop.distributed.actor import ModelActorCore, lazy_actors
from rlloop.types import Batch

logger = logging.getLogger(__name__)

PRIME_BETA = 0.05  # released default


class ImplicitPRM(ModelActorCore):
    """π_φ (trainable, initialised from `model_path`, normally the policy's init) and π_ref (frozen copy).

    temperature: logits are divided by it before the log-softmax (1.0 = the plain model, as PRIME's RM).
    Each `update` is one AdamW step (lr, weight_decay, max_grad_norm) over the batch, in micro-batches.
    """

    def __init__(
        self,
        model_path: str,
        *,
        beta: float = PRIME_BETA,
        lr: float = 1e-6,
        num_threads: int = 1,
        micro_batch_size: int = 16,
        ref_model_path: str | None = None,
        temperature: float = 1.0,
        dtype: str = "float32",
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        device: str = "cpu",
    ):
        from transformers import AutoModelForCausalLM

        if beta <= 0:
            raise ValueError(f"ImplicitPRM: beta must be > 0, got {beta}")
        if micro_batch_size < 1:
            raise ValueError(f"ImplicitPRM: micro_batch_size must be >= 1, got {micro_batch_size}")
        if temperature <= 0:
            raise ValueError(f"ImplicitPRM: temperature must be > 0, got {temperature}")
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        t0 = time.perf_counter()
        torch_dtype = getattr(torch, dtype)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(self.device)
        if ref_model_path is None:
            self.ref_model = copy.deepcopy(self.model)
        else:
            self.ref_model = AutoModelForCausalLM.from_pretrained(ref_model_path, dtype=torch_dtype).to(
                self.device
            )
        self.ref_model.eval().requires_grad_(False)
        self.model.eval()  # dropout off: scores and updates see the same function
        self.beta, self.temperature = float(beta), float(temperature)
        self.micro_batch_size = int(micro_batch_size)
        self.max_grad_norm = float(max_grad_norm)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.version = 0
        logger.info("implicit PRM loaded from %s in %.1fs", model_path, time.perf_counter() - t0)

    # ----- scores -------------------------------------------------------------------------------------

    def _log_ratio(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """log π_φ(y_t|y_<t) − log π_ref(y_t|y_<t) at every position [B, T] (grad through π_φ only)."""
        from rlloop.algos.logprobs import token_logprobs

        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logp = token_logprobs(logits, input_ids, self.temperature)
        with torch.no_grad():
            ref_logits = self.ref_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
            ref_logp = token_logprobs(ref_logits, input_ids, self.temperature)
        return logp - ref_logp

    def _tensors(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        from rlloop.algos.logprobs import used_length

        T = used_length(batch.attention_mask)  # right padding beyond every row is cut off
        ids = torch.as_tensor(np.asarray(batch.input_ids)[:, :T], dtype=torch.long, device=self.device)
        att = torch.as_tensor(np.asarray(batch.attention_mask)[:, :T], dtype=torch.long, device=self.device)
        mask = torch.as_tensor(
            np.asarray(batch.response_mask)[:, :T], dtype=torch.float32, device=self.device
        )
        return ids, att, mask

    @torch.no_grad()
    def token_rewards(self, batch: Batch) -> np.ndarray:
        """r_t = β (log π_φ − log π_ref) at response positions, 0 elsewhere: float32 `[B, T]` (batch's T)."""
        ids, att, mask = self._tensors(batch)
        out = np.zeros(np.asarray(batch.input_ids).shape, dtype=np.float32)
        for s in range(0, len(batch), self.micro_batch_size):
            rows = slice(s, s + self.micro_batch_size)
            q = self._log_ratio(ids[rows], att[rows])
            out[rows, : ids.shape[1]] = (self.beta * q * mask[rows]).float().cpu().numpy()
        return out

    # ----- online update ------------------------------------------------------------------------------

    def update(self, batch: Batch, outcomes: np.ndarray) -> dict[str, float]:
        """One step of CE(σ(β Σ_t log-ratio_t), outcome) over the batch's rows; outcome in [0, 1] per row.

        Returns (scores before the update) implicit_prm/loss, implicit_prm/acc (share of rows where
        σ(...) > 0.5 agrees with outcome > 0.5), implicit_prm/reward (mean β Σ_t log-ratio), /version,
        and (after the update) implicit_prm/param_delta_norm = ||φ − φ_ref||₂ over all weights: the
        distance travelled from the initial weights when π_ref is the initial copy (the default), so a
        run's log shows that π_φ really learns.
        """
        outcome = torch.as_tensor(np.asarray(outcomes, dtype=np.float32), device=self.device)
        if outcome.shape != (len(batch),):
            raise ValueError(
                f"ImplicitPRM.update: outcomes has shape {tuple(outcome.shape)}, expected ({len(batch)},)"
            )
        bad = ((outcome < 0) | (outcome > 1) | ~torch.isfinite(outcome)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"ImplicitPRM.update: outcome of row {i} is {float(outcome[i])}, expected in [0, 1]"
            )
        ids, att, mask = self._tensors(batch)
        B = len(batch)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, scores = 0.0, []
        for s in range(0, B, self.micro_batch_size):
            rows = slice(s, s + self.micro_batch_size)
            q = self._log_ratio(ids[rows], att[rows])
            score = self.beta * (q * mask[rows]).sum(-1)  # β Σ_t log-ratio = Σ_t r_t
            loss = F.binary_cross_entropy_with_logits(score, outcome[rows], reduction="sum") / B
            loss.backward()
            total_loss += loss.item()
            scores.append(score.detach())
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.version += 1
        score = torch.cat(scores)
        return {
            "implicit_prm/loss": total_loss,
            "implicit_prm/acc": float(((score > 0) == (outcome > 0.5)).double().mean()),
            "implicit_prm/reward": float(score.mean()),
            "implicit_prm/version": float(self.version),
            "implicit_prm/param_delta_norm": self.param_delta_norm(),
        }

    @torch.no_grad()
    def param_delta_norm(self) -> float:
        """||φ − φ_ref||₂ over the parameters the two models share by name (no copy of the weights)."""
        ref = dict(self.ref_model.named_parameters())
        total = 0.0
        for name, p in self.model.named_parameters():
            q = ref.get(name)
            if q is not None and q.shape == p.shape:
                total += float((p.detach().double() - q.double()).pow(2).sum())
        return total**0.5

    # ----- weights ------------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """π_φ as a plain HF causal-LM folder (weights only; add the tokenizer yourself)."""
        self.model.save_pretrained(path)



__getattr__ = lazy_actors(__name__, ImplicitPRMService=ImplicitPRM)
