"""The few types every box of rlloop agrees on (see DESIGN.md, "Contracts").

Everything that crosses an actor boundary is one of these, built from plain Python values and
numpy arrays so Ray can ship it without pickling torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """One prompt of a data set."""

    uid: str
    prompt: str | list[dict[str, str]]  # plain text, or chat messages [{"role", "content"}]
    data_source: str  # routes the sample to a verifier
    ground_truth: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """One sampled completion of a prompt.

    `step_ends[k]` is the index (into `response_ids`) of the last token of reasoning step k;
    `step_char_ends[k]` is the same boundary in `text` (exclusive end of the step's characters), so
    a scorer with another tokenizer can map steps into its own tokens.
    """

    uid: str  # f"{group}/{index}"
    group: str  # uid of the prompt (Sample.uid)
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # log pi_rollout(y_t | y_<t), one per response token
    step_ends: list[int]
    step_char_ends: list[int]
    text: str  # decoded response
    prompt_text: str
    finish_reason: str  # "stop" (EOS) or "length"
    policy_version: int
    data_source: str = ""
    ground_truth: str = ""
    # Scores attach here, each under its source's name, so every source is logged on its own.
    outcome: dict[str, float] = field(default_factory=dict)  # e.g. {"math": 1.0}
    outcome_info: dict[str, str] = field(default_factory=dict)  # VerifyResult.info(): reason, kind
    step_values: list[float] | None = None  # V_k from the PRM, one per step
    token_rewards: list[float] | None = None  # per response token, e.g. from Q-RM


@dataclass
class Batch:
    """Padded arrays for the learner; all [B, T] over prompt+response tokens (right padded).

    `response_mask` is 1 on response tokens that are trained on. Logprob/advantage arrays are aligned
    with `input_ids`: entry t scores token t given tokens < t (entry 0 is unused).
    """

    input_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # int64 [B, T]
    response_mask: np.ndarray  # float32 [B, T]
    advantages: np.ndarray  # float32 [B, T]
    returns: np.ndarray  # float32 [B, T]
    rollout_logprobs: np.ndarray  # float32 [B, T]
    old_logprobs: np.ndarray | None = None  # float32 [B, T]
    ref_logprobs: np.ndarray | None = None  # float32 [B, T]
    token_rewards: np.ndarray | None = None  # float32 [B, T]
    values: np.ndarray | None = None  # float32 [B, T], the critic's V before token t (algo.advantage=gae)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: np.ndarray | slice) -> Batch:
        """Rows `index` of every array (used to shard a batch over learner ranks)."""
        return Batch(**{k: (None if v is None else v[index]) for k, v in self.__dict__.items()})
