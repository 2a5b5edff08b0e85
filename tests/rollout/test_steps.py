"""Step boundaries: found in text, mapped to tokens through offsets (hand-made and from a real BPE)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlloop.rollout.steps import (
    char_ends_to_token_ends,
    decode_with_offsets,
    find_step_ends,
    split_steps,
)


def texts_of(text, spans):
    return [text[s:e] for s, e in spans]


# ----- split_steps ---------------------------------------------------------------------------------


def test_split_basic():
    text = "Add 3 and 4.\n\nThe sum is 7.\n\nAnswer: 7"
    spans = split_steps(text)
    assert texts_of(text, spans) == ["Add 3 and 4.", "The sum is 7.", "Answer: 7"]
    assert spans[0] == (0, 12)


def test_split_drops_empty_and_whitespace_steps_and_trims():
    text = "\n\n  a \n\n\n\n \t \n\nb\n\n\n\n"
    spans = split_steps(text)
    assert texts_of(text, spans) == ["a", "b"]
    # an odd run of newlines leaves a "\n" on the next step, which trimming removes
    assert texts_of("a\n\n\nb", split_steps("a\n\n\nb")) == ["a", "b"]


def test_split_without_delimiter_is_one_step_and_blank_text_has_none():
    assert texts_of("just one step ", split_steps("just one step ")) == ["just one step"]
    assert split_steps("") == []
    assert split_steps(" \n\n \n") == []


def test_split_custom_delimiter_and_regex():
    text = "Step 1: a b\nStep 2: c\nStep 3: d"
    assert texts_of(text, split_steps(text, delimiter="\n")) == ["Step 1: a b", "Step 2: c", "Step 3: d"]
    # regex overrides the delimiter; here a step is "Step k:" ... up to the next one
    spans = split_steps(text, delimiter="\n\n", regex=r"\s*(?=Step \d+:)")
    assert texts_of(text, spans) == ["Step 1: a b", "Step 2: c", "Step 3: d"]
    with pytest.raises(ValueError, match="delimiter"):
        split_steps(text, delimiter="")


# ----- char_ends_to_token_ends on hand-made offsets ------------------------------------------------


def test_delimiter_split_across_tokens():
    text = "ab.\n\ncd"
    offsets = [(0, 2), (2, 4), (4, 7)]  # "ab" | ".\n" | "\ncd": the delimiter straddles two tokens
    token_ends, char_ends = find_step_ends(text, offsets)
    assert char_ends == [3, 7]
    assert token_ends == [1, 2]


def test_token_spanning_the_boundary_ends_the_step_it_finishes():
    text = "a.\n\nbc\n\nd"
    offsets = [(0, 1), (1, 5), (5, 6), (6, 9)]  # "a" | ".\n\nb" | "c" | "\n\nd"
    token_ends, char_ends = find_step_ends(text, offsets)
    assert char_ends == [2, 6, 9]
    assert token_ends == [1, 2, 3]


def test_two_steps_inside_one_token_share_it():
    text = "a\n\nb\n\nc"
    offsets = [(0, 6), (6, 7)]  # "a\n\nb\n\n" | "c"
    assert find_step_ends(text, offsets) == ([0, 0, 1], [1, 4, 7])


def test_no_delimiter_ends_at_last_content_token_not_trailing_whitespace_or_specials():
    text = "no steps here \n"
    offsets = [(0, 2), (2, 8), (8, 13), (13, 15), (15, 15)]  # ..., " \n", then <eos> with an empty span
    assert find_step_ends(text, offsets) == ([2], [13])


def test_empty_steps_and_empty_text():
    text = "\n\nx\n\n\n\n"
    offsets = [(0, 2), (2, 3), (3, 7)]
    assert find_step_ends(text, offsets) == ([1], [3])
    assert find_step_ends("", []) == ([], [])
    assert find_step_ends("\n\n", [(0, 2)]) == ([], [])


def test_special_tokens_gaps_and_split_multibyte_characters():
    # <bos> (0,0); "Ġthe" trimmed to (1,4) leaves a gap at char 0..1; "✓" split over two byte tokens
    text = " the ✓\n\nok"
    offsets = [(0, 0), (1, 4), (4, 5), (5, 6), (5, 6), (6, 8), (8, 10), (10, 10)]
    token_ends, char_ends = find_step_ends(text, offsets)
    assert char_ends == [6, 10]
    assert token_ends == [4, 6]  # the token that completes "✓", not the first of its bytes


def test_char_end_before_any_token_raises_with_the_culprit():
    with pytest.raises(ValueError, match="character 1"):
        char_ends_to_token_ends([1], [(0, 0), (3, 5)])


@st.composite
def tokenised_text(draw):
    """A random text from a small alphabet and a random partition of it into tokens."""
    text = draw(st.text(alphabet="ab \n", min_size=1, max_size=40))
    cuts = sorted(draw(st.sets(st.integers(1, len(text) - 1), max_size=len(text))) if len(text) > 1 else [])
    bounds = [0, *cuts, len(text)]
    return text, list(zip(bounds, bounds[1:], strict=False))


@settings(max_examples=300, deadline=None)
@given(tokenised_text())
def test_step_end_token_holds_the_last_character_of_the_step(case):
    text, offsets = case
    token_ends, char_ends = find_step_ends(text, offsets)
    spans = split_steps(text)
    assert char_ends == [e for _, e in spans]
    assert token_ends == sorted(token_ends)
    for (s, e), t in zip(spans, token_ends, strict=True):
        assert text[s:e].strip() == text[s:e] and "\n\n" not in text[s:e]
        start, end = offsets[t]
        assert start <= e - 1 < end


# ----- a real byte-level BPE -----------------------------------------------------------------------


def test_bpe_merges_across_step_boundaries(bpe_tokenizer):
    """The trained tokenizer really has the awkward merges the mapping must survive."""
    vocab = bpe_tokenizer.get_vocab()
    crossing = [t for t in vocab if "ĊĊ" in t and t.replace("ĊĊ", "").strip("Ċ")]
    assert crossing, "expected merges such as '.\\n\\n' or '.\\n\\nThe' in the trained vocabulary"


def _decoded_len(tokenizer, ids):
    return len(
        tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip("\ufffd")
    )


@pytest.mark.parametrize("canonical", [True, False])
def test_bpe_offsets_and_step_ends(bpe_tokenizer, canonical):
    tok = bpe_tokenizer
    text = "First we add 3 and 4.\n\nThe sum is 7 ✓\n\n\n\nSo the answer is 7."
    if canonical:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:  # one character at a time: decodes to the same text, is not what the tokenizer would produce
        ids = [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]
        assert ids != tok(text, add_special_tokens=False)["input_ids"]
    ids = ids + [tok.eos_token_id]
    decoded, offsets = decode_with_offsets(tok, ids)
    assert decoded == text
    assert len(offsets) == len(ids) and offsets[-1][0] == offsets[-1][1]  # eos: empty span
    token_ends, char_ends = find_step_ends(decoded, offsets)
    assert [decoded[s:e] for s, e in split_steps(decoded)] == [
        "First we add 3 and 4.",
        "The sum is 7 ✓",
        "So the answer is 7.",
    ]
    for t, c in zip(token_ends, char_ends, strict=True):
        # token t completes character c-1: the prefix up to t decodes past it, the prefix before t does not
        assert _decoded_len(tok, ids[: t + 1]) >= c > _decoded_len(tok, ids[:t])


def test_bpe_multibyte_character_split_over_tokens_does_not_crash(bpe_tokenizer):
    tok = bpe_tokenizer
    check = tok("✓", add_special_tokens=False)["input_ids"]
    assert len(check) >= 2, "the test needs '✓' to be split over byte tokens"
    ids = tok("ok ", add_special_tokens=False)["input_ids"] + check
    for cut in range(1, len(ids) + 1):  # every prefix, including ones that end inside the character
        text, offsets = decode_with_offsets(tok, ids[:cut])
        assert len(offsets) == cut
        assert all(0 <= s <= e <= len(text) for s, e in offsets)
        token_ends, char_ends = find_step_ends(text, offsets)
        assert len(token_ends) == 1 and token_ends[0] < cut
    _, offsets = decode_with_offsets(tok, ids)
    assert find_step_ends("ok ✓", offsets)[0] == [len(ids) - 1]


def test_incremental_offsets_equal_prefix_decoding_on_random_ids(bpe_tokenizer):
    """The linear incremental detokeniser agrees with decoding every prefix, even on byte garbage
    (random ids split multi-byte characters and leave invalid UTF-8 that decodes to U+FFFD)."""
    import random

    from rlloop.rollout.steps import _incremental_offsets, _prefix_offsets

    tok = bpe_tokenizer
    kw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    rng = random.Random(0)
    saw_replacement = False
    for _ in range(200):
        ids = [rng.randrange(2, len(tok)) for _ in range(rng.choice([1, 3, 10, 40]))]
        text = tok.decode(ids, **kw)
        saw_replacement |= "\ufffd" in text
        incremental = _incremental_offsets(tok, ids, text, kw)
        assert incremental is not None, ids
        assert incremental == _prefix_offsets(tok, ids, text, kw), ids
    assert saw_replacement
