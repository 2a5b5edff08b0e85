"""Offline DPO (algo.dpo.pairs_path): a pairs file's rows as (chosen, rejected) rollouts for the loop.

The file is the one `python -m rlloop.qrm_pairs` writes (rlloop.rewards.qrm.data: `prompt`, `chosen`,
`rejected`, optional `group`). Its `prompt` is the text exactly as the policy saw it (chat template
applied), tokenised here without adding special tokens; a prompt given as chat messages is rendered with
the tokenizer's chat template. Each completion is tokenised and, when the tokenizer has one, ends with
EOS (the rollouts the pairs came from stopped there; their text was decoded without it), cut to
`max_new_tokens`. The chosen rollout's outcome is 1, the rejected one's 0.
"""

from __future__ import annotations

from typing import Any

from rlloop.types import Rollout


def prompt_ids(prompt: str | list[dict], tokenizer: Any) -> list[int]:
    """Token ids of a pair's `prompt`: rendered text as is, or chat messages through the chat template."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    return list(tokenizer(prompt, add_special_tokens=False).input_ids)


def pair_rollouts(
    pair: dict, tokenizer: Any, *, max_new_tokens: int, policy_version: int = 0
) -> list[Rollout]:
    """[chosen, rejected] rollouts of one validated pair (rlloop.rewards.qrm.data.validate_pair)."""
    ids = prompt_ids(pair["prompt"], tokenizer)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    out = []
    for side, correct in (("chosen", 1.0), ("rejected", 0.0)):
        response = list(tokenizer(pair[side], add_special_tokens=False).input_ids)
        if tokenizer.eos_token_id is not None:
            response.append(int(tokenizer.eos_token_id))
        response = response[:max_new_tokens]
        out.append(
            Rollout(
                uid=f"{pair['group']}/{side}",
                group=str(pair["group"]),
                prompt_ids=ids,
                response_ids=response,
                rollout_logprobs=[0.0] * len(response),
                step_ends=[],
                step_char_ends=[],
                text=pair[side],
                prompt_text=text,
                finish_reason="stop",
                policy_version=policy_version,
                outcome={"correct": correct},
            )
        )
    return out
