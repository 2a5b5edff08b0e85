"""PRMScorer / ValueHeadModel: one-pass step values equal per-prefix values; tokenizers; save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlloop.rewards.prm.model import ValueHeadModel, one_pass_step_logits
from rlloop.rewards.prm.service import PRMScorer
from rlloop.rollout.steps import decode_with_offsets, find_step_ends, split_steps

PROMPTS = [
    "Question: what is 12 + 30?\n\n",
    "Question: what is 7 - 5?\n\n",
    "Q: 2+2?",
    "Question: what is 12 + 30?\n\n",
    "Step one.",
]
RESPONSES = [
    "First we add 10 and 30.\n\nThen we add 2.\n\nThe answer is 42.",
    "We take 5 from 7.\n\n\n\nThe answer is \\boxed{2} ✓",
    "no delimiter at all",
    "First.\n\n  \n\nSecond ✓\n\n",
    "",
]


@pytest.fixture(scope="module")
def scorer(prm_dir):
    torch.set_num_threads(1)
    return PRMScorer(prm_dir, batch_size=2)  # 5 trajectories: several right-padded batches


def value_of_prefix(model, ids):
    """V at the last token of `ids`, encoded alone (batch of one, no padding)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    return torch.sigmoid(logits[0, -1].double()).item()


def test_one_pass_values_equal_per_prefix_values(scorer):
    results = scorer.score(PROMPTS, RESPONSES)
    num_steps = [len(split_steps(r)) for r in RESPONSES]
    assert [len(r["step_values"]) for r in results] == num_steps == [3, 2, 1, 2, 0]
    checked = 0
    for p, r, res in zip(PROMPTS, RESPONSES, results, strict=True):
        enc = scorer.encode(p, r)
        assert value_of_prefix(scorer.model, enc.input_ids[: enc.prompt_position + 1]) == pytest.approx(
            res["prompt_value"], abs=1e-5
        )
        for pos, v, logit in zip(enc.step_positions, res["step_values"], res["step_logits"], strict=True):
            assert 0.0 < v < 1.0 and v == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-9)
            assert value_of_prefix(scorer.model, enc.input_ids[: pos + 1]) == pytest.approx(v, abs=1e-5)
            checked += 1
    assert checked == 8
    # the head is random: values really differ between steps (the comparison above is not vacuous)
    assert np.std([v for res in results for v in res["step_values"]]) > 1e-3


def test_text_prefixes_re_encoded_give_the_same_values(scorer):
    """TDRM's way: re-encode prompt + response[:step end] as text, read V at its last token."""
    p, r = PROMPTS[0], RESPONSES[0]
    res = scorer.score([p], [r])[0]
    for (_, end), v in zip(split_steps(r), res["step_values"], strict=True):
        enc = scorer.encode(p, r[:end])
        assert value_of_prefix(scorer.model, enc.input_ids) == pytest.approx(v, abs=1e-5)


def test_one_pass_step_logits_on_a_padded_batch(scorer):
    encoded = [scorer.encode(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    input_ids, attention_mask = scorer.collate(encoded)
    assert int(attention_mask.sum(1).min()) < input_ids.shape[1]  # some rows are padded
    positions = [[e.prompt_position, *e.step_positions] for e in encoded]
    logits = one_pass_step_logits(scorer.model, input_ids, attention_mask, positions)
    for e, row in zip(encoded, logits, strict=True):
        alone = one_pass_step_logits(
            scorer.model,
            torch.tensor([e.input_ids]),
            torch.ones(1, len(e.input_ids)),
            [positions[encoded.index(e)]],
        )
        np.testing.assert_allclose(row, alone[0], atol=1e-5)


def test_steps_from_another_tokenizer_map_to_prm_tokens(scorer, policy_tokenizer):
    """The policy's step ends (characters) land on the PRM tokens that hold those characters."""
    assert policy_tokenizer.get_vocab() != scorer.tokenizer.get_vocab()
    p, r = PROMPTS[1], RESPONSES[1]
    policy_ids = policy_tokenizer(r, add_special_tokens=False)["input_ids"]
    text, offsets = decode_with_offsets(policy_tokenizer, policy_ids)
    policy_token_ends, char_ends = find_step_ends(text, offsets)
    assert text == r and len(char_ends) == 2
    res = scorer.score([p], [text], [char_ends])[0]
    enc = scorer.encode(p, text, char_ends)
    prm_offsets = scorer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    start = enc.prompt_position + 1
    for pos, c in zip(enc.step_positions, char_ends, strict=True):
        s, e = prm_offsets[pos - start]
        assert s <= c - 1 < e  # the PRM token holding the step's last character
    assert res["step_values"] == scorer.score([p], [text])[0]["step_values"]
    assert policy_token_ends != [pos - start for pos in enc.step_positions]  # the tokenizations do differ


def test_fresh_head_on_a_plain_lm_gives_one_half(plain_lm_dir):
    scorer = PRMScorer(plain_lm_dir)
    results = scorer.score(PROMPTS[:2], RESPONSES[:2])
    assert [len(r["step_values"]) for r in results] == [3, 2]
    for res in results:
        assert res["prompt_value"] == 0.5 and all(v == 0.5 for v in res["step_values"])


def test_folder_without_a_value_head_errors_clearly(plain_lm_dir):
    with pytest.raises(FileNotFoundError, match=plain_lm_dir):
        ValueHeadModel.from_pretrained(plain_lm_dir)
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        PRMScorer(plain_lm_dir, require_value_head=True)


def test_save_load_round_trip(scorer, tmp_path):
    before = scorer.score(PROMPTS, RESPONSES)
    scorer.save(str(tmp_path / "copy"))
    again = PRMScorer(str(tmp_path / "copy"))
    after = again.score(PROMPTS, RESPONSES)
    for a, b in zip(before, after, strict=True):
        assert a["prompt_value"] == pytest.approx(b["prompt_value"], abs=1e-7)
        np.testing.assert_allclose(a["step_values"], b["step_values"], atol=1e-7)
    # the saved backbone is an ordinary HF model folder
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(str(tmp_path / "copy"))
    torch.testing.assert_close(backbone.embed_tokens.weight, scorer.model.backbone.embed_tokens.weight)


def test_numpy_weight_round_trip(scorer, plain_lm_dir):
    fresh = PRMScorer(plain_lm_dir)
    arrays = scorer.state_dict_numpy()
    assert "head.weight" in arrays and all(isinstance(a, np.ndarray) for a in arrays.values())
    assert fresh.load_state_numpy(arrays, version=3) == 3
    ours, theirs = scorer.score(PROMPTS[:2], RESPONSES[:2]), fresh.score(PROMPTS[:2], RESPONSES[:2])
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a["step_values"], b["step_values"], atol=1e-6)
    assert fresh.load_state_numpy({"head.bias": np.array([5.0], dtype=np.float32)}) == 4
    assert fresh.score(PROMPTS[:1], RESPONSES[:1])[0]["step_values"] != ours[0]["step_values"]
    with pytest.raises(KeyError, match="head.bais"):
        fresh.load_state_numpy({"head.bais": np.zeros(1, dtype=np.float32)})


def test_bad_inputs_name_the_culprit(scorer):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorer.score(PROMPTS[:2], RESPONSES[:1])
    with pytest.raises(ValueError, match="trajectory 1"):
        scorer.score(PROMPTS[:2], RESPONSES[:2], [[5], [999]])


def test_max_length_truncates_the_prompt_from_the_left(prm_dir):
    full = PRMScorer(prm_dir)
    p, r = PROMPTS[0], RESPONSES[0]
    enc = full.encode(p, r)
    response_len = len(enc.input_ids) - enc.prompt_position - 1
    short = PRMScorer(prm_dir, max_length=response_len + 3)
    cut = short.encode(p, r)
    assert len(cut.input_ids) == response_len + 3 and cut.input_ids == enc.input_ids[-(response_len + 3) :]
    assert cut.prompt_position == 2
    res = short.score([p], [r])[0]
    # values are those of the truncated sequence, read at the same tokens
    for pos, v in zip(cut.step_positions, res["step_values"], strict=True):
        assert value_of_prefix(short.model, cut.input_ids[: pos + 1]) == pytest.approx(v, abs=1e-5)
    with pytest.raises(ValueError, match="max_length=4"):
        PRMScorer(prm_dir, max_length=4).score([p], [r])
