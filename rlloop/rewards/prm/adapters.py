"""Published PRMs as step-value sources: each adapter maps rlloop's steps onto its model's convention.

rlloop's steps are exclusive end characters of the response (`Rollout.step_char_ends`, found by
`rlloop.rollout.steps`). An adapter cuts the response at those ends, writes the steps the way its PRM
was trained to read them, and reads one probability per step from one forward pass:

- `qwen_prm` (Qwen/Qwen2.5-Math-PRM-7B and its kind): `prompt + step_1<extra_0>step_2<extra_0>...`; a
  two-class head gives logits `[B, T, 2]` at every token; V_k = softmax(logits at the k-th separator)[1].
- `math_shepherd` (peiyi9979/math-shepherd-mistral-7b-prm): a causal LM read at step tags,
  `prompt step_1 ки\\nstep_2 ки`; V_k = softmax over the LM logits of the `+` and `-` tokens at the k-th
  tag, the `+` share.
- `trl_token_cls` (PRMs trained by TRL's PRMTrainer, `AutoModelForTokenClassification` with two labels):
  `[bos] + prompt ids + (step_1 ids + separator ids) + ...`, each part tokenised on its own as TRL
  does; V_k = softmax(logits at the last token of step k's part)[1].
- `rlloop`: rlloop's own value-head folder (`ValueHeadModel`), scored by `PRMScorer` itself.

Each adapter's `model` is a module whose `forward(input_ids, attention_mask)` gives one logit per token,
`[B, T]`, with V = sigmoid(logit) (a two-way softmax is the sigmoid of the logit difference), so
`PRMScorer` batches, pads and reads positions the same way for every kind. A step's text is the response
between the previous step end and its own, stripped of surrounding whitespace (the step delimiter).
Published PRMs have no value for the empty prefix: their prompt value is reported as 0.5 (neutral).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from rlloop.registry import registrar
from rlloop.rollout.steps import char_ends_to_token_ends

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, type[StepAdapter]] = {}
register_adapter = registrar(ADAPTERS, "PRM adapter")
ADAPTER_NAMES = ("auto", "rlloop", "qwen_prm", "math_shepherd", "trl_token_cls")


@dataclass
class EncodedTrajectory:
    """A trajectory in the PRM's tokens: where the prompt ends and where each step is read."""

    input_ids: list[int]  # prompt tokens then response tokens
    prompt_position: int  # index of the last prompt token
    step_positions: list[int]  # index of the token each step's value is read at (non-decreasing)


def step_texts(response_text: str, step_char_ends: Sequence[int]) -> list[str]:
    """The steps of `response_text` cut at `step_char_ends` (exclusive ends), each stripped."""
    out, start = [], 0
    for end in step_char_ends:
        out.append(response_text[start:end].strip())
        start = end
    return out


def truncate_left(
    ids: list[int], prompt_len: int, positions: list[int], max_length: int | None
) -> EncodedTrajectory:
    """Drop prompt tokens from the left so `ids` fits `max_length` (as `PRMScorer.encode` does)."""
    cut = 0
    if max_length is not None and len(ids) > max_length:
        cut = len(ids) - max_length
        if cut >= prompt_len:
            raise ValueError(
                f"PRM: response of {len(ids) - prompt_len} tokens leaves no room for the prompt "
                f"within max_length={max_length}"
            )
    return EncodedTrajectory(ids[cut:], prompt_len - 1 - cut, [p - cut for p in positions])


def single_token_id(tokenizer: Any, text: str, what: str) -> int:
    """The id `text` encodes to (its last token, as the published usage code reads it)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"PRM adapter: {what} {text!r} encodes to no token with this tokenizer")
    return int(ids[-1])


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


class TwoClassLogit(nn.Module):
    """A model with two-class logits per token `[B, T, 2]` -> the logit of class 1, `[B, T]` float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = _logits(
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        ).float()
        if logits.shape[-1] != 2:
            raise ValueError(f"PRM adapter: the model gives {logits.shape[-1]} classes per token, expected 2")
        return logits[..., 1] - logits[..., 0]


class TokenPairLogit(nn.Module):
    """A causal LM read at two vocabulary entries: logit(good) - logit(bad) per token, `[B, T]` float32.

    Only the two rows of the LM head are applied to the hidden states, so no `[B, T, vocab]` tensor is
    made (for a 7B Mistral that is 32000 floats per token).
    """

    def __init__(self, model: nn.Module, good_id: int, bad_id: int):
        super().__init__()
        self.model = model
        self.good_id, self.bad_id = int(good_id), int(bad_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        config = self.model.config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            # the LM transforms its logits after the head (Gemma 2, Cohere): take them whole
            logits = _logits(self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
            return (logits[..., self.good_id] - logits[..., self.bad_id]).float()
        head = self.model.get_output_embeddings()
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        rows = torch.tensor([self.good_id, self.bad_id], device=hidden.device)
        weight = head.weight[rows]
        logits = hidden @ weight.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[rows]
        logits = logits.float()
        return logits[..., 0] - logits[..., 1]


class StepAdapter:
    """Loads a published PRM and encodes trajectories in its step convention.

    `model`: a module giving one logit per token `[B, T]` (V = sigmoid); `encode` says which tokens.
    options: the adapter's keyword settings (`reward.prm.adapter_options`); unknown keys are an error.
    """

    name: ClassVar[str]
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, model_path: str, tokenizer: Any, *, dtype: torch.dtype, trust_remote_code: bool, options: dict
    ):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(
                f"reward.prm.adapter_options {unknown} are not options of the {self.name} adapter "
                f"(it takes {sorted(self.OPTIONS)})"
            )
        self.options = {**self.OPTIONS, **options}
        self.tokenizer = tokenizer
        self.model: nn.Module = self.load(model_path, dtype, trust_remote_code)

    def load(self, model_path: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        raise NotImplementedError

    def encode(
        self, prompt_text: str, response_text: str, step_char_ends: Sequence[int], max_length: int | None
    ) -> EncodedTrajectory:
        raise NotImplementedError


class SeparatorInTextAdapter(StepAdapter):
    """Steps written into one text with a marker after each; values are read at the marker tokens.

    The text is tokenised whole (as the published usage code does); each marker's token is found through
    the tokenizer's offsets and checked to be the marker's id, so a marker merged into its neighbours
    fails loudly instead of reading the wrong token.
    """

    marker_id: int  # the marker's token id (set by `load`)

    def format(self, prompt_text: str, steps: list[str]) -> tuple[str, str, list[int]]:
        """(prompt part, whole text, exclusive end character of each step's marker in the text)."""
        raise NotImplementedError

    def encode(
        self, prompt_text: str, response_text: str, step_char_ends: Sequence[int], max_length: int | None
    ) -> EncodedTrajectory:
        prompt_part, text, marker_ends = self.format(prompt_text, step_texts(response_text, step_char_ends))
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        # the prompt's tokens: all before the first token that starts after the prompt part
        prompt_len = next(
            (i for i, (s, e) in enumerate(offsets) if e > s and s >= len(prompt_part)), len(ids)
        )
        if prompt_len == 0:
            raise ValueError(f"PRM: prompt {prompt_text[:40]!r} has no tokens")
        positions = char_ends_to_token_ends(marker_ends, offsets) if marker_ends else []
        for k, pos in enumerate(positions):
            if ids[pos] != self.marker_id:
                raise ValueError(
                    f"PRM adapter {self.name}: step {k}'s marker did not become its own token "
                    f"(token {pos} is {self.tokenizer.convert_ids_to_tokens(ids[pos])!r}, expected id "
                    f"{self.marker_id}); the tokenizer merges it with the step text"
                )
        return truncate_left(ids, prompt_len, positions, max_length)


@register_adapter("qwen_prm")
class QwenPRMAdapter(SeparatorInTextAdapter):
    """Qwen2.5-Math-PRM: steps each followed by `<extra_0>`, two-class logits, V = P(class 1).

    The prompt is used as rlloop rendered it (for a Qwen2.5-Math policy, the chat template the PRM was
    trained with, ending in the assistant header); the steps follow it directly.
    """

    name = "qwen_prm"
    OPTIONS = {"separator": "<extra_0>"}

    def load(self, model_path: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        from transformers import AutoModel, AutoModelForTokenClassification

        if _architecture(model_path).endswith("ForTokenClassification"):
            model = AutoModelForTokenClassification.from_pretrained(model_path, dtype=dtype)
        else:  # Qwen2ForProcessRewardModel ships its own modelling code
            model = AutoModel.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.marker_id = single_token_id(self.tokenizer, self.options["separator"], "separator")
        return TwoClassLogit(model)

    def format(self, prompt_text: str, steps: list[str]) -> tuple[str, str, list[int]]:
        sep = self.options["separator"]
        text, ends = prompt_text, []
        for step in steps:
            text += step + sep
            ends.append(len(text))
        return prompt_text, text, ends


@register_adapter("math_shepherd")
class MathShepherdAdapter(SeparatorInTextAdapter):
    """Math-Shepherd: `question step_1 ки\\nstep_2 ки`, V = softmax(logits[+, -]) at each tag, the `+` share."""

    name = "math_shepherd"
    OPTIONS = {"step_tag": "ки", "good_token": "+", "bad_token": "-"}

    def load(self, model_path: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        o, tok = self.options, self.tokenizer
        self.marker_id = single_token_id(tok, o["step_tag"], "step_tag")
        good, bad = (
            single_token_id(tok, o["good_token"], "good_token"),
            single_token_id(tok, o["bad_token"], "bad_token"),
        )
        if good == bad:
            raise ValueError(
                f"PRM adapter math_shepherd: good_token and bad_token are the same token ({good})"
            )
        return TokenPairLogit(model, good, bad)

    def format(self, prompt_text: str, steps: list[str]) -> tuple[str, str, list[int]]:
        tag = self.options["step_tag"]
        prompt_part = prompt_text.rstrip() + " "
        text, ends = prompt_part, []
        for k, step in enumerate(steps):
            text += ("\n" if k else "") + f"{step} {tag}"
            ends.append(len(text))
        return prompt_part, text, ends


@register_adapter("trl_token_cls")
class TRLTokenClassificationAdapter(StepAdapter):
    """TRL PRMTrainer's convention: `[bos] + prompt ids + (step ids + separator ids)...`, each part
    tokenised on its own without special tokens; the label sits on each part's last token."""

    name = "trl_token_cls"
    OPTIONS = {"separator": "\n"}  # PRMConfig.step_separator's default

    def load(self, model_path: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
        from transformers import AutoModelForTokenClassification

        model = AutoModelForTokenClassification.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        return TwoClassLogit(model)

    def encode(
        self, prompt_text: str, response_text: str, step_char_ends: Sequence[int], max_length: int | None
    ) -> EncodedTrajectory:
        tok = self.tokenizer
        prompt_ids = list(tok(prompt_text, add_special_tokens=False)["input_ids"])
        if tok.bos_token_id is not None:
            prompt_ids = [tok.bos_token_id, *prompt_ids]
        if not prompt_ids:
            raise ValueError(f"PRM: prompt {prompt_text[:40]!r} has no tokens")
        separator_ids = list(tok.encode(self.options["separator"], add_special_tokens=False))
        ids, positions = list(prompt_ids), []
        for k, step in enumerate(step_texts(response_text, step_char_ends)):
            part = list(tok(step, add_special_tokens=False)["input_ids"]) + separator_ids
            if not part:
                raise ValueError(f"PRM adapter trl_token_cls: step {k} and its separator have no tokens")
            ids += part
            positions.append(len(ids) - 1)
        return truncate_left(ids, len(prompt_ids), positions, max_length)


def _config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _architecture(path: str) -> str:
    return str((_config(path).get("architectures") or [""])[0])


def detect_adapter(model_path: str) -> str:
    """The adapter a folder needs: `rlloop` for a value-head folder (and for a plain causal LM, which gets
    a fresh head), `qwen_prm` for a `*ForProcessRewardModel`, `trl_token_cls` for a
    `*ForTokenClassification`. A Math-Shepherd model is a plain causal LM: name it
    (`reward.prm.adapter=math_shepherd`)."""
    from rlloop.rewards.prm.model import has_value_head

    if has_value_head(model_path):
        return "rlloop"
    arch = _architecture(model_path)
    if arch.endswith("ForProcessRewardModel"):
        return "qwen_prm"
    if arch.endswith("ForTokenClassification"):
        return "trl_token_cls"
    return "rlloop"


def load_adapter(
    name: str,
    model_path: str,
    tokenizer: Any,
    *,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    options: dict | None = None,
) -> StepAdapter:
    """The adapter `name` (not `rlloop` or `auto`) with its model loaded from `model_path`."""
    if name not in ADAPTERS:
        raise ValueError(f"reward.prm.adapter={name!r} is unknown; use one of {list(ADAPTER_NAMES)}")
    return ADAPTERS[name](
        model_path, tokenizer, dtype=dtype, trust_remote_code=trust_remote_code, options=dict(options or {})
    )


__all__ = [
    "ADAPTERS",
    "ADAPTER_NAMES",
    "EncodedTrajectory",
    "StepAdapter",
    "detect_adapter",
    "load_adapter",
    "step_texts",
]
