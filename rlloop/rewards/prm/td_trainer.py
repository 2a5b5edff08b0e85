"""TD training of a PRM (`ValueHeadModel`): offline by `python -m rlloop.prm_train`, online by the PRM service.

One forward pass per trajectory gives every step's logit (the backbone is causal); logits are read at the
step-end tokens, which come from the response's step end characters mapped through the PRM tokenizer's
offsets — encoded exactly as `PRMScorer.encode` does (prompt with the tokenizer's special tokens, response
after it without), so a PRM trained here scores the same positions at inference.

Targets (`rlloop.algos.td`) use values that never carry gradient: the same forward pass detached (what a
separate no-grad pass would give, for free), or a no-grad pass of the EMA target network when `ema` is set.
`td="labels"` trains toward given per-step labels (ScalarPRM with Monte-Carlo step labels); `td="mc"`
toward the outcome at every step (ScalarPRM with outcome labels); `td="reach"` bootstraps on its own values
through the max backup of given hard Monte-Carlo step labels (`rlloop.algos.td.reach_targets`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlloop.algos.td import (
    TD_KINDS,
    auroc,
    compute_td_targets,
    ema_state,
    prm_bce_loss,
    reach_targets,
    smoothness,
)
from rlloop.rewards.training import RewardModelTrainer
from rlloop.rollout.steps import char_ends_to_token_ends

logger = logging.getLogger(__name__)

TRAINER_KINDS = (*TD_KINDS, "labels", "reach")
LABELLED_KINDS = ("labels", "reach")  # kinds whose targets need per-step labels


@dataclass
class _Encoded:
    input_ids: list[int]
    prompt_position: int
    step_positions: list[int]


class TDPRMTrainer(RewardModelTrainer):
    """TD(0) / n-step / TD(λ) / ScalarPRM updates of a `ValueHeadModel` on trajectories with outcomes.

    model: the PRM (trained in place; a PRM service may pass its own model so scoring sees every update).
    engine: an optional DeepSpeed engine wrapping `model` (`rlloop.models.ds_engine.build_ds_engine`); it
    owns optimizer, clipping and schedule, and `step()` calls `engine.backward/step` once per micro-batch.
    Without it, a plain AdamW with `lr`, `weight_decay` and `max_grad_norm` is used (one optimizer step per
    `step()` call, gradients accumulated over micro-batches and weighted by their number of real steps).
    `optim`: engine, weight_decay, max_grad_norm, micro_batch_size, max_length — the keywords of
    `rlloop.rewards.training.RewardModelTrainer`.
    ema: decay of an EMA target network supplying the bootstrapped values (None = the online net).
    train_prompt: also train V at the prompt's last token, the empty prefix (TDRM's first state; what the
    PRM service returns as `prompt_value`, read by the shaping / delta fusions and TGDPO's guidance). It is
    step -1 of the trajectory: its target comes from the same formulas over [prompt, step 0, ...] (TD(0):
    γ·V_0), `step_labels` then carry one more label, the prompt's, first, and `evaluate` scores it too.
    Without it that value is whatever the untrained position gives.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        lr: float,
        td: str = "td0",
        gamma: float = 0.8,
        n: int = 2,
        lam: float = 0.7,
        terminal_weight: float = 1.0,
        ema: float | None = None,
        train_prompt: bool = False,
        step_delimiter: str = "\n\n",
        step_regex: str | None = None,
        **optim: Any,
    ):
        if td not in TRAINER_KINDS:
            raise ValueError(f"unknown td={td!r}; expected one of {list(TRAINER_KINDS)}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("TDPRMTrainer needs a fast tokenizer (character offsets map steps to tokens)")
        if ema is not None and not 0.0 <= ema < 1.0:
            raise ValueError(f"ema (target-network decay) must be in [0, 1), got {ema}")
        super().__init__(model, tokenizer, lr=lr, **optim)
        self.td, self.gamma, self.n, self.lam = td, float(gamma), int(n), float(lam)
        self.terminal_weight = float(terminal_weight)
        self.step_delimiter, self.step_regex = step_delimiter, step_regex
        self.ema = ema
        self.train_prompt = bool(train_prompt)
        self.target_model = None
        if ema is not None:
            self.target_model = copy.deepcopy(model).requires_grad_(False).eval()

    # ----- encoding (mirrors PRMScorer.encode / collate) ---------------------------------------------

    def encode(self, prompt_text: str, response_text: str, step_char_ends: Sequence[int]) -> _Encoded:
        prompt_ids = list(self.tokenizer(prompt_text)["input_ids"])
        if not prompt_ids:
            raise ValueError(f"prompt {prompt_text[:40]!r} has no tokens")
        if not step_char_ends:
            raise ValueError("trajectory has zero steps")
        if any(not 0 < c <= len(response_text) for c in step_char_ends):
            raise ValueError(
                f"step ends {list(step_char_ends)} outside the response (length {len(response_text)})"
            )
        enc = self.tokenizer(response_text, add_special_tokens=False, return_offsets_mapping=True)
        ends = char_ends_to_token_ends(list(step_char_ends), enc["offset_mapping"])
        start = len(prompt_ids)
        ids = prompt_ids + list(enc["input_ids"])
        positions = [start + t for t in ends]
        if self.max_length and len(ids) > self.max_length:
            # truncate on the left (as TDRM) so the step-end tokens that matter most, the last ones, survive
            cut = len(ids) - self.max_length
            if positions[0] < cut:
                raise ValueError(f"trajectory of {len(ids)} tokens does not fit max_length={self.max_length}")
            ids, positions, start = ids[cut:], [p - cut for p in positions], start - cut
        return _Encoded(ids, start - 1, positions)

    def _collate(
        self, encoded: Sequence[_Encoded]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [B, T], attention_mask [B, T], step positions [B, K], step_mask [B, K])."""
        T = max(len(e.input_ids) for e in encoded)
        K = max(len(e.step_positions) for e in encoded)
        input_ids = torch.full((len(encoded), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), T), dtype=torch.long)
        positions = torch.zeros((len(encoded), K), dtype=torch.long)
        step_mask = torch.zeros((len(encoded), K), dtype=torch.float32)
        for b, e in enumerate(encoded):
            input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention_mask[b, : len(e.input_ids)] = 1
            positions[b, : len(e.step_positions)] = torch.tensor(e.step_positions)
            step_mask[b, : len(e.step_positions)] = 1
        return input_ids, attention_mask, positions, step_mask

    def _encode_all(self, prompt_texts, response_texts, step_char_ends) -> list[_Encoded]:
        if not (len(prompt_texts) == len(response_texts) == len(step_char_ends)):
            raise ValueError(
                f"TDPRMTrainer: {len(prompt_texts)} prompts, {len(response_texts)} responses, "
                f"{len(step_char_ends)} step lists (must match)"
            )
        out = []
        for i, (p, r, ends) in enumerate(zip(prompt_texts, response_texts, step_char_ends, strict=True)):
            try:
                out.append(self.encode(p, r, ends))
            except ValueError as e:
                raise ValueError(f"TDPRMTrainer: trajectory {i}: {e}") from None
        return out

    @staticmethod
    def _with_prompt(encoded: Sequence[_Encoded]) -> list[_Encoded]:
        """The prompt's last token as step -1 of each trajectory (its value is V of the empty prefix)."""
        return [_Encoded(e.input_ids, e.prompt_position, [e.prompt_position, *e.step_positions]) for e in encoded]

    def _forward(self, net, input_ids, attention_mask, positions) -> torch.Tensor:
        """Step logits [B, K] (positions padded with 0 are masked out later)."""
        logits = net(input_ids, attention_mask)
        return logits.gather(1, positions.to(logits.device)).float()

    @staticmethod
    def _pad_rows(
        rows: Sequence[Sequence[float]] | None, mask: torch.Tensor, name: str
    ) -> torch.Tensor | None:
        if rows is None:
            return None
        out = torch.zeros_like(mask)
        for b, row in enumerate(rows):
            L = int(mask[b].sum())
            if len(row) != L:
                raise ValueError(f"TDPRMTrainer: {name}[{b}] has {len(row)} entries for {L} steps")
            out[b, :L] = torch.tensor([float(x) for x in row])
        return out

    # ----- training ----------------------------------------------------------------------------------

    def step(
        self,
        prompt_texts: Sequence[str],
        response_texts: Sequence[str],
        step_char_ends: Sequence[Sequence[int]],
        outcomes: Sequence[float],
        *,
        step_labels: Sequence[Sequence[float]] | None = None,
        rewards: Sequence[Sequence[float]] | None = None,
    ) -> dict[str, float]:
        """One TD update on these trajectories (one optimizer step without an engine); metrics are of the
        values BEFORE the update: prm/loss, prm/smoothness, prm/v_last_acc, prm/auroc (both classes
        present), prm/lr, prm/target_mean, prm/version."""
        if len(outcomes) != len(prompt_texts):
            raise ValueError(
                f"TDPRMTrainer.step: {len(outcomes)} outcomes for {len(prompt_texts)} trajectories"
            )
        if self.td in LABELLED_KINDS and step_labels is None:
            raise ValueError(f"TDPRMTrainer: td={self.td!r} needs step_labels")
        encoded = self._encode_all(prompt_texts, response_texts, step_char_ends)
        if self.train_prompt:
            encoded = self._with_prompt(encoded)
        outcome_all = torch.tensor([float(o) for o in outcomes], dtype=torch.float32)
        total_steps = sum(len(e.step_positions) for e in encoded)
        self._begin_update()
        loss_sum, target_sum = 0.0, 0.0
        values_rows: list[list[float]] = []
        device = self.device
        for lo in range(0, len(encoded), self.micro_batch_size):
            chunk = encoded[lo : lo + self.micro_batch_size]
            input_ids, attention_mask, positions, mask = self._collate(chunk)
            input_ids, attention_mask, mask = input_ids.to(device), attention_mask.to(device), mask.to(device)
            outcome = outcome_all[lo : lo + len(chunk)].to(device)
            step_logits = self._forward(self.train_net, input_ids, attention_mask, positions)
            values = torch.sigmoid(step_logits.detach())
            targets = self._targets(
                values,
                mask,
                outcome,
                input_ids,
                attention_mask,
                positions,
                None if step_labels is None else step_labels[lo : lo + len(chunk)],
                None if rewards is None else rewards[lo : lo + len(chunk)],
            )
            loss = prm_bce_loss(step_logits, targets, mask, terminal_weight=self.terminal_weight)
            n_steps = float(mask.sum())
            self._backward(loss, n_steps, total_steps)
            loss_sum += loss.item() * n_steps
            target_sum += float((targets * mask).sum())
            first = 1 if self.train_prompt else 0  # the metrics are of the steps
            values_rows += [values[b, first : int(mask[b].sum())].tolist() for b in range(len(chunk))]
        grad_norm = self._end_update()
        self._update_target()
        metrics = {
            "prm/loss": loss_sum / max(total_steps, 1),
            "prm/target_mean": target_sum / max(total_steps, 1),
            "prm/lr": self.lr,
            "prm/version": float(self.version),
            **self._value_metrics(values_rows, outcome_all),
        }
        if not math.isnan(grad_norm):
            metrics["prm/grad_norm"] = grad_norm
        return metrics

    def step_rollouts(self, rollouts: Sequence, outcome_source: str | None = None) -> dict[str, float]:
        """`step` on `rlloop.types.Rollout`s with verified outcomes (the online actor-critic update).

        The outcome is `r.outcome[outcome_source]`, or the mean of all `r.outcome` scores when None;
        rollouts without steps (empty responses) or without an outcome are skipped.
        """
        keep, outcomes = [], []
        for r in rollouts:
            scores = r.outcome if outcome_source is None else {outcome_source: r.outcome.get(outcome_source)}
            scores = [v for v in scores.values() if v is not None]
            if r.step_char_ends and scores:
                keep.append(r)
                outcomes.append(min(1.0, max(0.0, sum(scores) / len(scores))))
        if not keep:
            return {"prm/skipped": float(len(rollouts))}
        metrics = self.step(
            [r.prompt_text for r in keep], [r.text for r in keep], [r.step_char_ends for r in keep], outcomes
        )
        metrics["prm/skipped"] = float(len(rollouts) - len(keep))
        return metrics

    def _update_target(self) -> None:
        if self.target_model is not None:
            self.target_model.load_state_dict(
                ema_state(self.target_model.state_dict(), self.model.state_dict(), decay=self.ema)
            )

    def _targets(self, values, mask, outcome, input_ids, attention_mask, positions, labels, rewards):
        if self.td == "labels":
            return self._pad_rows(labels, mask, "step_labels")
        if self.target_model is not None and self.td != "mc":
            with torch.no_grad():
                values = torch.sigmoid(self._forward(self.target_model, input_ids, attention_mask, positions))
        if self.td == "reach":
            padded = self._pad_rows(labels, mask, "step_labels")
            return reach_targets(values, mask, outcome, padded, gamma=self.gamma, lam=self.lam)
        return compute_td_targets(
            self.td,
            values,
            mask,
            outcome,
            gamma=self.gamma,
            n=self.n,
            lam=self.lam,
            rewards=self._pad_rows(rewards, mask, "rewards"),
        )

    # ----- evaluation --------------------------------------------------------------------------------

    @torch.no_grad()
    def step_values(
        self,
        prompt_texts: Sequence[str],
        response_texts: Sequence[str],
        step_char_ends: Sequence[Sequence[int]],
        *,
        with_prompt: bool = False,
    ) -> list[list[float]]:
        """V_k of every step of every trajectory (no update), one forward pass per trajectory; with_prompt:
        V of the prompt (the empty prefix) first, [V_prompt, V_0, ..., V_{K-1}]."""
        encoded = self._encode_all(prompt_texts, response_texts, step_char_ends)
        if with_prompt:
            encoded = self._with_prompt(encoded)
        was_training = self.model.training
        self.model.eval()
        out: list[list[float]] = []
        device = self.device
        for lo in range(0, len(encoded), self.micro_batch_size):
            input_ids, attention_mask, positions, mask = self._collate(
                encoded[lo : lo + self.micro_batch_size]
            )
            values = torch.sigmoid(
                self._forward(self.model, input_ids.to(device), attention_mask.to(device), positions)
            )
            out += [values[b, : int(mask[b].sum())].tolist() for b in range(values.shape[0])]
        self.model.train(was_training)
        return out

    def evaluate(
        self,
        prompt_texts: Sequence[str],
        response_texts: Sequence[str],
        step_char_ends: Sequence[Sequence[int]],
        outcomes: Sequence[float],
        *,
        step_labels: Sequence[Sequence[float]] | None = None,
    ) -> dict[str, float]:
        """No update. prm/bce (the training objective toward this trainer's targets), prm/outcome_bce
        (V_last vs outcome), prm/v_last_acc, prm/auroc (V_last vs outcome; both classes needed),
        prm/smoothness (of the steps; with train_prompt the prompt's value is in prm/bce only)."""
        rows = self.step_values(prompt_texts, response_texts, step_char_ends, with_prompt=self.train_prompt)
        outcome = torch.tensor([float(o) for o in outcomes], dtype=torch.float32)
        K = max(len(r) for r in rows)
        values = torch.full((len(rows), K), 0.5)
        mask = torch.zeros(len(rows), K)
        for b, r in enumerate(rows):
            values[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        v = values.clamp(1e-6, 1 - 1e-6)
        logits = torch.log(v) - torch.log1p(-v)
        if self.td == "labels":
            targets = self._pad_rows(step_labels, mask, "step_labels") if step_labels is not None else None
        elif self.td == "reach":
            targets = None
            if step_labels is not None:
                labels = self._pad_rows(step_labels, mask, "step_labels")
                targets = reach_targets(values, mask, outcome, labels, gamma=self.gamma, lam=self.lam)
        else:
            targets = compute_td_targets(
                self.td, values, mask, outcome, gamma=self.gamma, n=self.n, lam=self.lam
            )
        metrics = self._value_metrics([r[1:] for r in rows] if self.train_prompt else rows, outcome)
        if targets is not None:
            metrics["prm/bce"] = prm_bce_loss(
                logits, targets, mask, terminal_weight=self.terminal_weight
            ).item()
        last = torch.tensor([r[-1] for r in rows]).clamp(1e-6, 1 - 1e-6)
        metrics["prm/outcome_bce"] = torch.nn.functional.binary_cross_entropy(last, outcome).item()
        return metrics

    @staticmethod
    def _value_metrics(rows: list[list[float]], outcome: torch.Tensor) -> dict[str, float]:
        K = max(len(r) for r in rows)
        values = torch.zeros(len(rows), K)
        mask = torch.zeros(len(rows), K)
        for b, r in enumerate(rows):
            values[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        last = torch.tensor([r[-1] for r in rows])
        correct = outcome > 0.5
        metrics = {
            "prm/smoothness": smoothness(values, mask).item(),
            "prm/v_last_acc": float(((last > 0.5) == correct).float().mean()),
            "prm/v_last_mean": float(last.mean()),
        }
        if bool(correct.any()) and bool((~correct).any()):
            metrics["prm/auroc"] = auroc(last, correct.float())
        return metrics

    # ----- transitions (TDRM's released format) --------------------------------------------------------

    def transition_step(self, transitions: Sequence[dict]) -> dict[str, float]:
        """One TD update on TDRM transitions (`rlloop.rewards.prm.data.load_transitions` rows):
        y = ℓ for terminal rows, else clamp(Σ_i γ^i r_{i+1} + γ^n V(next)·next_mask, 0, 1), V(next) detached.
        Each row uses its own next-state mask (the release applied the last row's to the whole batch)."""
        return self._transitions(transitions, train=True)

    @torch.no_grad()
    def transition_evaluate(self, transitions: Sequence[dict]) -> dict[str, float]:
        return self._transitions(transitions, train=False)

    def _state_encoding(self, question: str, state: str) -> _Encoded:
        prompt = question + "\n\n"
        if not state.strip():  # the empty prefix: V is read at the end of the question
            enc = self.encode(prompt, "x", [1])
            return _Encoded(
                enc.input_ids[: enc.prompt_position + 1], enc.prompt_position, [enc.prompt_position]
            )
        return self.encode(prompt, state, [len(state.rstrip())])

    def _transitions(self, transitions: Sequence[dict], *, train: bool) -> dict[str, float]:
        net = self.train_net if train else self.model
        target_net = self.target_model if self.target_model is not None else self.model
        if train:
            self._begin_update()
        loss_sum, v_states, labels_done, v_done = 0.0, [], [], []
        device = self.device
        for lo in range(0, len(transitions), self.micro_batch_size):
            chunk = transitions[lo : lo + self.micro_batch_size]
            cur = [self._state_encoding(t["question"], t["state"]) for t in chunk]
            ids, att, pos, _ = self._collate(cur)
            logits = self._forward(net, ids.to(device), att.to(device), pos)[:, 0]
            has_next = [t["next_state"] is not None for t in chunk]
            v_next = torch.zeros(len(chunk), device=device)
            if any(has_next):
                nxt = [
                    self._state_encoding(t["question"], t["next_state"])
                    for t, h in zip(chunk, has_next, strict=True)
                    if h
                ]
                ids2, att2, pos2, _ = self._collate(nxt)
                with torch.no_grad():
                    vals = torch.sigmoid(
                        self._forward(target_net, ids2.to(device), att2.to(device), pos2)[:, 0]
                    )
                v_next[torch.tensor(has_next, device=device)] = vals.float()
            done = torch.tensor([float(t["done"]) for t in chunk], device=device)
            label = torch.tensor([float(t["label"]) for t in chunk], device=device)
            disc = torch.tensor(
                [sum(self.gamma**i * r for i, r in enumerate(t["rewards"])) for t in chunk], device=device
            )
            boot = torch.tensor([self.gamma ** t["n"] * t["next_mask"] for t in chunk], device=device)
            td = (disc + boot * v_next).clamp(0.0, 1.0)
            targets = torch.where(done > 0, label, td)
            weights = torch.where(
                done > 0, torch.full_like(done, self.terminal_weight), torch.ones_like(done)
            )
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            loss = (bce * weights).mean()
            if train:
                self._backward(loss, len(chunk), len(transitions))
            loss_sum += loss.item() * len(chunk)
            v = torch.sigmoid(logits.detach()).cpu()
            v_states += v.tolist()
            for b, t in enumerate(chunk):
                if t["done"]:
                    labels_done.append(float(t["label"]))
                    v_done.append(float(v[b]))
        if train:
            self._end_update()
            self._update_target()
        metrics = {"prm/bce": loss_sum / len(transitions), "prm/v_mean": sum(v_states) / len(v_states)}
        if v_done:
            lab = torch.tensor(labels_done)
            vd = torch.tensor(v_done)
            metrics["prm/v_last_acc"] = float(((vd > 0.5) == (lab > 0.5)).float().mean())
            if bool((lab > 0.5).any()) and bool((lab <= 0.5).any()):
                metrics["prm/auroc"] = auroc(vd, lab)
        if train:
            metrics["prm/lr"] = self.lr
            metrics["prm/version"] = float(self.version)
        return metrics


__all__ = ["LABELLED_KINDS", "TRAINER_KINDS", "TDPRMTrainer"]
