"""Reasoning steps: found in text, mapped to token indices through a tokenizer's character offsets.

Steps live in text space so that the policy and the PRM may use different tokenizers: the rollout
records each step's exclusive end character (`Rollout.step_char_ends`), and every consumer maps those
characters into its own tokens with `char_ends_to_token_ends`.

Conventions:
- A step is the text between delimiters (default "\\n\\n", or matches of a regex), with surrounding
  whitespace trimmed; empty and whitespace-only steps are dropped. A text without a delimiter is one step.
- A step's end token is the token that contains the step's last character. A token that spans a step
  boundary (e.g. a BPE merge ".\\n\\nThe") therefore ends the step whose last character it holds; two
  steps inside one token share that token (end tokens are non-decreasing, not strictly increasing).
- Offsets are `(start, end)` character spans per token, as from `return_offsets_mapping=True`. Tokens with
  an empty span (special tokens, the leading bytes of a multi-byte character) never end a step.
"""

from __future__ import annotations

import bisect
import re
from typing import Sequence

Offsets = Sequence[tuple[int, int]]


def split_steps(text: str, delimiter: str = "\n\n", regex: str | None = None) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the non-empty steps of `text`.

    `regex`, when given, overrides `delimiter` (its matches separate steps). Whitespace at either end of a
    step is excluded from its span, so a step ends at its last visible character.
    """
    if regex is not None:
        separators = [(m.start(), m.end()) for m in re.finditer(regex, text) if m.end() > m.start()]
    else:
        if not delimiter:
            raise ValueError("split_steps: delimiter must be a non-empty string (or pass regex=...)")
        separators = []
        i = text.find(delimiter)
        while i != -1:
            separators.append((i, i + len(delimiter)))
            i = text.find(delimiter, i + len(delimiter))
    spans = []
    start = 0
    for sep_start, sep_end in [*separators, (len(text), len(text))]:
        piece = text[start:sep_start]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + lead + len(stripped)))
        start = sep_end
    return spans


def char_ends_to_token_ends(char_ends: Sequence[int], offsets: Offsets) -> list[int]:
    """Index of the token that holds character `c - 1`, for each exclusive end `c` in `char_ends`.

    offsets: `[(start, end)]` per token (empty spans are ignored). Where character `c - 1` lies in no
    token (tokenizers that trim whitespace from offsets leave gaps), the last non-empty token starting
    before `c` is used. The result is made non-decreasing. Raises if no token starts before `c`.
    """
    content = [i for i, (s, e) in enumerate(offsets) if e > s]
    starts = [offsets[i][0] for i in content]
    # Offsets of real tokenizers are sorted by start; sorting guards against odd post-processors.
    if any(a > b for a, b in zip(starts, starts[1:], strict=False)):
        order = sorted(range(len(content)), key=lambda j: (starts[j], content[j]))
        content = [content[j] for j in order]
        starts = [starts[j] for j in order]
    token_ends: list[int] = []
    for c in char_ends:
        j = bisect.bisect_left(starts, c) - 1  # last content token with start < c
        if j < 0:
            raise ValueError(
                f"char_ends_to_token_ends: no token starts before character {c} "
                f"(first token offsets: {list(offsets[:4])})"
            )
        index = content[j]
        if token_ends and index < token_ends[-1]:
            index = token_ends[-1]
        token_ends.append(index)
    return token_ends


def find_step_ends(
    text: str, offsets: Offsets, delimiter: str = "\n\n", regex: str | None = None
) -> tuple[list[int], list[int]]:
    """`(token_ends, char_ends)` of the steps of `text`, tokenised with character spans `offsets`.

    A text without a delimiter is one step ending at its last visible character; a text with no
    visible characters has no steps (`([], [])`).
    """
    char_ends = [end for _, end in split_steps(text, delimiter, regex)]
    if not char_ends:
        return [], []
    return char_ends_to_token_ends(char_ends, offsets), char_ends


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _incremental_offsets(
    tokenizer, ids: list[int], text: str, decode_kwargs: dict
) -> list[tuple[int, int]] | None:
    """Per-token spans by incremental detokenisation over a short window (as vLLM streams text).

    The window's new characters are matched against the final `text`: what matches is emitted by the
    current token; an incomplete multi-byte character (U+FFFD in the window, the real character in
    `text`) waits for the token that completes it. Linear in len(ids); gives the same spans as decoding
    every prefix whenever decoding is prefix-stable. Returns None where it cannot tell (the caller then
    decodes every prefix).
    """
    offsets: list[tuple[int, int]] = []
    pos = prefix_offset = read_offset = 0
    pending = 0  # characters beyond the window's settled text already emitted
    prefix_text = ""
    for i in range(len(ids)):
        new_text = tokenizer.decode(ids[prefix_offset : i + 1], **decode_kwargs)
        if not new_text.startswith(prefix_text):
            return None
        delta = new_text[len(prefix_text) :]
        window_pos = pos - pending
        matched = _common_prefix_len(delta, text[window_pos : window_pos + len(delta)])
        emit = max(matched - pending, 0)
        offsets.append((pos, pos + emit))
        pos += emit
        # Slide the window only past a complete, valid character: U+FFFD may still merge with later
        # bytes (lossy UTF-8 replaces a maximal invalid run, whose extent depends on what follows).
        if matched == len(delta) and not delta.endswith("\ufffd"):
            prefix_offset, read_offset = read_offset, i + 1
            prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], **decode_kwargs)
            pending = 0
        else:
            pending = max(pending, matched)
    return offsets if pos == len(text) else None


def _prefix_offsets(tokenizer, ids: list[int], text: str, decode_kwargs: dict) -> list[tuple[int, int]]:
    """Per-token spans from decoding every prefix (quadratic; the always-correct last resort)."""
    prefixes = tokenizer.batch_decode([ids[: i + 1] for i in range(len(ids))], **decode_kwargs)
    offsets = []
    prev = 0
    for prefix in prefixes:
        if text.startswith(prefix):
            end = len(prefix)
        else:  # a partial multi-byte character decodes to U+FFFD; keep only the part that matches
            end = _common_prefix_len(prefix, text)
        end = max(end, prev)
        offsets.append((prev, end))
        prev = end
    return offsets


def decode_with_offsets(
    tokenizer, token_ids: Sequence[int], *, skip_special_tokens: bool = True
) -> tuple[str, list[tuple[int, int]]]:
    """Decode `token_ids` and give each token its `(start, end)` character span in the decoded text.

    Fast path: if re-tokenising the text gives back the same (non-special) ids, the tokenizer's own
    offsets are used. Otherwise (sampled ids are often not the canonical tokenisation) token i covers the
    characters it adds to the decoded text, found by incremental detokenisation (linear; checked against
    the full text) or, failing that, by decoding every prefix (quadratic). A token holding only part of
    a multi-byte character adds nothing (empty span) and the token that completes it gets the character.
    Special tokens skipped in the text get empty spans at their position.
    """
    ids = [int(t) for t in token_ids]
    special = set(tokenizer.all_special_ids) if skip_special_tokens else set()
    kept = [i for i, t in enumerate(ids) if t not in special]
    kept_ids = [ids[i] for i in kept]
    decode_kwargs = {"skip_special_tokens": skip_special_tokens, "clean_up_tokenization_spaces": False}
    text = tokenizer.decode(ids, **decode_kwargs)
    kept_offsets: list[tuple[int, int]] | None = None
    if kept_ids and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == kept_ids:
            kept_offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    if kept_offsets is None:
        kept_offsets = _incremental_offsets(tokenizer, kept_ids, text, decode_kwargs)
    if kept_offsets is None:
        kept_offsets = _prefix_offsets(tokenizer, kept_ids, text, decode_kwargs)
    offsets: list[tuple[int, int]] = []
    k = 0
    pos = 0
    for i in range(len(ids)):
        if k < len(kept) and kept[k] == i:
            offsets.append(kept_offsets[k])
            pos = kept_offsets[k][1]
            k += 1
        else:
            offsets.append((pos, pos))
    return text, offsets
