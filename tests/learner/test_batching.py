"""learner.batching: sorted (token-budget micro-batches) and packed (no padding) give the padded path's
logprobs, losses and gradients to float tolerance; the planning helpers are checked on their own."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from rlloop.learner.policy import (
    PackedRows,
    row_lengths,
    split_micro_batches,
    token_budget_micro_batches,
)

from .conftest import algo_cfg, hf_logprobs, inprocess_learner, learner_cfg, make_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TEMPERATURE = 0.7


# ---------------------------------------------------------------- planning (pure)


def test_row_lengths():
    att = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert row_lengths(att).tolist() == [2, 4, 1, 1]


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_micro_batches_cover_every_row_within_budget(packed):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=57)
    for budget in (1, 150, 400, 2000, 10**6):
        plan = token_budget_micro_batches(lengths, budget, packed=packed)
        assert sorted(int(r) for rows in plan for r in rows) == list(range(len(lengths)))
        for rows in plan:
            assert list(rows) == sorted(rows)
            cost = lengths[rows].sum() if packed else len(rows) * lengths[rows].max()
            assert len(rows) == 1 or cost <= budget
    # longest first: the first micro-batch holds the longest row
    assert int(lengths.argmax()) in token_budget_micro_batches(lengths, 400, packed=packed)[0]
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        token_budget_micro_batches(lengths, 0, packed=packed)


def test_split_micro_batches_reaches_the_count():
    lengths = np.array([10, 3, 7, 7, 2, 9])
    plan = token_budget_micro_batches(lengths, 1000, packed=False)
    assert len(plan) == 1
    for count in range(1, 7):
        out = split_micro_batches(plan, count, lengths)
        assert len(out) == count
        assert sorted(int(r) for rows in out for r in rows) == list(range(6))
    with pytest.raises(ValueError, match="7 micro-batches of 6 rows"):
        split_micro_batches(plan, 7, lengths)


def test_packed_rows_layout():
    ids = np.array([[5, 6, 7, 0], [8, 9, 10, 11]])
    att = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    resp = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=np.float32)
    import torch

    p = PackedRows.build(ids, att, resp, torch.device("cpu"))
    assert p.ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    # logits at packed position k predict the token at k + 1 of the same row
    assert p.keep.tolist() == [0, 1, 4, 5]
    assert p.targets.tolist() == [6, 7, 10, 11]
    assert list(zip(p.row.tolist(), p.col.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 2), (1, 3)]


# ---------------------------------------------------------------- same numbers as the padded path


def _spread_batch():
    """Rows of very different lengths (as RL rollouts are), one with nothing to train."""
    batch = make_batch(num_rows=7, max_len=32, seed=5)
    batch.response_mask[4] = 0
    return batch


def _step(tiny_model_path, dist_port, batch, monkeypatch, algo, **cfg):
    """compute_logprobs, then one train_step; returns (logprobs, metrics, gradients before the step)."""
    import rlloop.learner.policy as policy

    grads: dict = {}
    real_step = policy.optimizer_step

    def capture(engine):
        for name, p in engine.module.named_parameters():
            grads[name] = p.grad.detach().clone().numpy()
        return real_step(engine)

    monkeypatch.setattr(policy, "optimizer_step", capture)
    learner = inprocess_learner(
        tiny_model_path, dist_port, algo=algo, temperature=TEMPERATURE, zero_stage=0, **cfg
    )
    batch = copy.copy(batch)
    logprobs = learner.compute_logprobs(batch)
    batch.ref_logprobs = logprobs - 0.05 * batch.response_mask
    metrics = learner.train_step(batch)
    return logprobs, metrics, grads


@pytest.mark.parametrize(
    "loss_agg, entropy_coef", [("token-mean", 0.0), ("seq-mean-token-sum", 0.01), ("seq-mean-token-mean", 0.0)]
)
@pytest.mark.parametrize("batching, tokens", [("sorted", 40), ("packed", 40), ("packed", None)])
def test_batching_gives_the_padded_logprobs_loss_and_gradients(
    tiny_model_path, dist_port, monkeypatch, batching, tokens, loss_agg, entropy_coef
):
    batch = _spread_batch()
    algo = algo_cfg(loss_agg=loss_agg, kl_coef=0.1, entropy_coef=entropy_coef, use_ref=False)
    lp0, m0, g0 = _step(tiny_model_path, dist_port, batch, monkeypatch, algo, micro_batch_size=3, batching="padded")
    lp1, m1, g1 = _step(
        tiny_model_path, dist_port, batch, monkeypatch, algo, micro_batch_size=3, batching=batching,
        micro_batch_tokens=tokens,
    )  # fmt: skip
    np.testing.assert_allclose(lp1, lp0, atol=2e-6)
    np.testing.assert_allclose(lp1, hf_logprobs(tiny_model_path, batch, TEMPERATURE), atol=1e-5)
    for key in ("actor/pg_loss", "actor/kl_ref", "actor/entropy", "actor/ppo_kl", "actor/grad_norm"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    assert set(g1) == set(g0)
    for name in g0:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-4, atol=1e-7, err_msg=name)
    # the same work in model FLOPs; fewer positions computed (packed: exactly the real tokens)
    assert m1["perf/tokens"] == m0["perf/tokens"] == float(batch.attention_mask.sum())
    assert m1["perf/model_flops"] == pytest.approx(m0["perf/model_flops"]) and m0["perf/model_flops"] > 0
    assert m1["perf/computed_tokens"] < m0["perf/computed_tokens"]
    if batching == "packed":
        assert m1["perf/computed_tokens"] == m1["perf/tokens"]


def test_model_flops_per_token_by_hand():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlloop.learner.group import merge_rank_metrics
    from rlloop.learner.policy import model_flops_per_token

    for tied in (False, True):
        cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, tie_word_embeddings=tied)  # fmt: skip
        model = LlamaForCausalLM(cfg)
        # per layer: q, k, v, o (16x16 each, 2 kv heads of 8 = 16), gate, up, down (16x32), 2 norms; final norm
        body = 2 * (4 * 16 * 16 + 3 * 16 * 32 + 2 * 16) + 16
        assert model_flops_per_token(model) == (6.0 * body, 6.0 * 50 * 16)
    merged = merge_rank_metrics(
        [{"perf/tokens": 10.0, "actor/entropy": 1.0}, {"perf/tokens": 30.0, "actor/entropy": 3.0}], [1.0, 1.0], [1.0, 3.0]
    )
    assert merged == {"perf/tokens": 40.0, "actor/entropy": 2.5}


def test_bad_batching_names_the_key(tiny_model_path, dist_port):
    with pytest.raises(ValueError, match="learner.batching must be one of"):
        inprocess_learner(tiny_model_path, dist_port, batching="ragged")


@pytest.mark.slow
def test_ranks_with_different_plans_run_as_many_micro_batches(ray_cluster):
    """ZeRO-3 over 2 ranks: rank 0's rows are short (one micro-batch in its budget), rank 1's long (one
    each); the ranks agree on the count, so the step does not hang, and it equals the padded path's."""
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlloop.learner.group import LearnerGroup

    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="batching_")
    LlamaForCausalLM(
        LlamaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    ).save_pretrained(path)  # fmt: skip
    batch = make_batch(num_rows=6, max_len=32, seed=1)
    for b, length in enumerate([6, 6, 7, 30, 31, 32]):  # rows 0-2 go to rank 0, 3-5 to rank 1
        batch.attention_mask[b] = 0
        batch.attention_mask[b, :length] = 1
        batch.response_mask[b] = 0
        batch.response_mask[b, 3:length] = 1.0
    results = []
    for batching in ("padded", "sorted"):
        group = LearnerGroup(
            path,
            learner_cfg(world_size=2, zero_stage=3, micro_batch_size=3, batching=batching, micro_batch_tokens=32),
            algo_cfg(use_ref=False),
            temperature=TEMPERATURE,
            train_batch_size=len(batch),
            timeout_s=300,
        )
        try:
            old = group.compute_logprobs(batch)
            train = copy.copy(batch)
            train.old_logprobs = old
            results.append((old, group.train_step(train), group.compute_logprobs(batch)))
        finally:
            group.shutdown()
    (old0, m0, new0), (old1, m1, new1) = results
    np.testing.assert_allclose(old1, old0, atol=2e-6)
    assert m1["actor/grad_norm"] == pytest.approx(m0["actor/grad_norm"], rel=1e-4)
    np.testing.assert_allclose(new1, new0, atol=1e-5)
