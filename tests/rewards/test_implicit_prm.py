"""The implicit PRM (PRIME): token rewards, the online update, and PRIME's fusion math and prompt filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlloop.algos.fusion import prime_advantages, prime_prompt_filter
from rlloop.rewards.implicit_prm import ImplicitPRM
from rlloop.types import Batch


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("implicit_prm_lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def toy_batch() -> tuple[Batch, np.ndarray]:
    """4 rows: prompt [1, 2, 3], responses of 3-4 tokens; rows 0, 2 'correct' (end in token 7),
    rows 1, 3 'wrong' (end in token 9); right padded with 0."""
    rows = [[1, 2, 3, 5, 6, 7], [1, 2, 3, 5, 6, 9], [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 9]]
    T = max(map(len, rows))
    ids = np.zeros((4, T), np.int64)
    att = np.zeros((4, T), np.int64)
    resp = np.zeros((4, T), np.float32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        att[b, : len(r)] = 1
        resp[b, 3 : len(r)] = 1
    z = np.zeros((4, T), np.float32)
    batch = Batch(ids, att, resp, advantages=z, returns=z.copy(), rollout_logprobs=z.copy())
    return batch, np.array([1.0, 0.0, 1.0, 0.0], np.float32)


def test_token_rewards_zero_at_init_and_off_response(lm_dir):
    prm = ImplicitPRM(lm_dir, beta=0.05, lr=1e-3)
    batch, _ = toy_batch()
    r = prm.token_rewards(batch)
    assert r.shape == batch.input_ids.shape and r.dtype == np.float32
    np.testing.assert_allclose(r, 0.0, atol=1e-6)  # π_φ == π_ref at start


def test_update_changes_weights_and_raises_correct_rewards(lm_dir):
    torch.manual_seed(0)
    prm = ImplicitPRM(lm_dir, beta=0.5, lr=3e-3, micro_batch_size=3)  # 3 forces two micro-batches
    batch, outcome = toy_batch()
    before = {k: v.copy() for k, v in prm.state_dict_numpy().items()}
    history = [prm.update(batch, outcome) for _ in range(25)]
    assert prm.version == 25
    assert set(history[0]) >= {"implicit_prm/loss", "implicit_prm/acc"}
    assert history[0]["implicit_prm/loss"] == pytest.approx(np.log(2), abs=1e-4)  # σ(0) = 1/2 at init
    assert history[-1]["implicit_prm/loss"] < 0.5 * history[0]["implicit_prm/loss"]
    assert history[-1]["implicit_prm/acc"] == 1.0
    # the logged distance from π_ref (= the initial weights here) grows from > 0 after the first step
    deltas = [h["implicit_prm/param_delta_norm"] for h in history]
    assert 0 < deltas[0] < deltas[-1]
    after = prm.state_dict_numpy()
    assert any(not np.array_equal(before[k], after[k]) for k in before), "π_φ's weights did not change"
    r = prm.token_rewards(batch)
    seq = r.sum(-1)
    assert seq[0] > 0 and seq[2] > 0 and seq[1] < 0 and seq[3] < 0, seq
    # the credit sits where correct and wrong responses part: the last token (7 vs 9)
    last = [5, 5, 6, 6]
    assert r[0, last[0]] > 0 > r[1, last[1]]
    assert np.all(r[batch.response_mask == 0] == 0)
    # the frozen reference did not move
    ref = {k: v.detach().numpy() for k, v in prm.ref_model.state_dict().items()}
    assert all(np.array_equal(before[k], ref[k]) for k in before)
    # and the logged norm is the plain L2 distance between the two weight sets
    expected = np.sqrt(sum(float(((after[k] - ref[k]).astype(np.float64) ** 2).sum()) for k in before))
    assert deltas[-1] == pytest.approx(expected, rel=1e-6)


def test_update_rejects_bad_outcomes(lm_dir):
    prm = ImplicitPRM(lm_dir)
    batch, _ = toy_batch()
    with pytest.raises(ValueError, match="outcome of row 2 is 2.0"):
        prm.update(batch, np.array([1.0, 0.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        prm.update(batch, np.array([1.0, 0.0]))


def _loop_reference(outcome, r, mask, groups, w_rule, w_process):
    """PRIME fusion written as plain loops (process_norm none, no whitening)."""
    B, T = len(r), len(r[0])
    mean = [sum(r[b][t] for t in range(T) if mask[b][t]) / max(1, sum(mask[b])) for b in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        others = [j for j in range(B) if groups[j] == groups[b] and j != b]
        base_r = sum(mean[j] for j in others) / len(others)
        base_o = sum(outcome[j] for j in others) / len(others)
        last = max(t for t in range(T) if mask[b][t])
        g = 0.0
        for t in range(T - 1, -1, -1):
            if mask[b][t]:
                g += w_process * (r[b][t] - base_r) + (w_rule * (outcome[b] - base_o) if t == last else 0.0)
                ret[b][t] = g
    return ret


def test_prime_advantages_hand_worked():
    # one group of 2: row 0 correct with token rewards [1, 3] (mean 2), row 1 wrong with [0, 0, 1] (mean 1/3)
    outcome = torch.tensor([1.0, 0.0])
    r = torch.tensor([[9.0, 1.0, 3.0, 0.0], [9.0, 0.0, 0.0, 1.0]])  # column 0 is the prompt
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    groups = torch.tensor([0, 0])
    adv, ret = prime_advantages(outcome, r, mask, groups, process_norm="none", whiten=False)
    # row 0: process r - 1/3 = [2/3, 8/3], outcome 1 - 0 = 1 on the last token -> returns [13/3, 11/3]
    # row 1: process r - 2 = [-2, -2, -1], outcome 0 - 1 = -1 -> returns [-6, -4, -2]
    torch.testing.assert_close(ret, torch.tensor([[0.0, 13 / 3, 11 / 3, 0.0], [0.0, -6.0, -4.0, -2.0]]))
    torch.testing.assert_close(adv, ret)
    # whitened by default: zero mean, unit (unbiased) std over response tokens
    adv_w, _ = prime_advantages(outcome, r, mask, groups, process_norm="none")
    vals = adv_w[mask.bool()]
    assert float(vals.mean()) == pytest.approx(0.0, abs=1e-6) and float(vals.std()) == pytest.approx(
        1.0, abs=1e-4
    )
    # batch_max: r divided by max |reverse cumsum| = max(|4|, |3|, |1|, ...) = 4 -> same as r / 4
    _, ret_n = prime_advantages(outcome, r, mask, groups, process_norm="batch_max", whiten=False, eps=0.0)
    _, ret_manual = prime_advantages(outcome, r / 4, mask, groups, process_norm="none", whiten=False)
    torch.testing.assert_close(ret_n, ret_manual)


def test_prime_advantages_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [3, 5, 2, 6, 4, 1]
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        mask[b, 1 : 1 + n] = 1
    outcome = torch.tensor([1.0, 0, 0, 1, 1, 0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    _, ret = prime_advantages(
        outcome, r, mask, groups, w_rule=0.7, w_process=1.3, process_norm="none", whiten=False
    )
    ref = _loop_reference(outcome.tolist(), r.tolist(), mask.tolist(), groups.tolist(), 0.7, 1.3)
    torch.testing.assert_close(ret, torch.tensor(ref, dtype=torch.float64))


def test_prime_group_of_one_gets_zero():
    adv, ret = prime_advantages(
        torch.tensor([1.0, 0.0]), torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 1]), whiten=False
    )
    assert torch.count_nonzero(ret) == 0


def test_prime_prompt_filter():
    # group 0: 1/5 right (0.2, kept: inclusive), group 1: 5/5 (dropped), group 2: 2/4 (kept), group 3: 0/2 (dropped)
    outcome = torch.tensor([1.0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0])
    groups = torch.tensor([0] * 5 + [1] * 5 + [2] * 4 + [3] * 2)
    keep = prime_prompt_filter(outcome, groups)
    assert keep.tolist() == [True] * 5 + [False] * 5 + [True] * 4 + [False] * 2
    with pytest.raises(ValueError, match="low"):
        prime_prompt_filter(outcome, groups, low=0.9, high=0.1)
