"""learner.batching: sorted (token-budget micro-batches) and packed (no padding) give the padded path's
logprobs, losses and gradients to float tolerance; the planning helpers are checked on their own."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from rlloop.learner.policy import (
    PackedRows,
    prompt_groups,
    row_lengths,
    shared_prompt_micro_batches,
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


def test_prompt_groups():
    ids = np.array([[5, 6, 7, 1, 0], [5, 6, 8, 2, 3], [5, 6, 7, 4, 0], [5, 6, 7, 9, 9], [4, 0, 0, 0, 0]])
    att = (np.arange(5)[None] < np.array([4, 5, 4, 5, 1])[:, None]).astype(np.int64)
    resp = np.zeros((5, 5), dtype=np.float32)
    resp[0, 3], resp[1, 3:5], resp[2, 3], resp[3, 2:5] = 1, 1, 1, 1  # row 3's response starts a token earlier
    group, prompt_len = prompt_groups(ids, att, resp)
    # rows 0 and 2 share [5, 6, 7]; row 1's prompt differs in its last token, row 3's is shorter;
    # row 4 has nothing to train: all prompt
    assert group.tolist() == [0, 1, 0, 2, 3]
    assert prompt_len.tolist() == [3, 3, 3, 2, 1]


def test_shared_prompt_micro_batches_keep_groups_whole_within_budget():
    rng = np.random.default_rng(1)
    group = np.repeat(np.arange(7), 8)
    prompt_len = np.repeat(rng.integers(20, 60, 7), 8)
    lengths = prompt_len + rng.integers(1, 130, len(group))
    for budget in (1, 200, 700, 2000, 10**6):
        plan = shared_prompt_micro_batches(lengths, group, prompt_len, budget)
        assert sorted(int(r) for rows in plan for r in rows) == list(range(len(group)))
        for rows in plan:
            assert list(rows) == sorted(rows)
            # packed tokens: each distinct prompt once, every row's rest
            cost = sum(int(prompt_len[group == g][0]) for g in set(group[rows])) + int((lengths - prompt_len)[rows].sum())
            single_run = len(set(group[rows])) == 1 and len(rows) == 1
            assert single_run or cost <= budget
        if budget >= 2000:  # a group costs at most 60 + 8 * 129 tokens: none is cut
            for g in range(7):
                assert sum(bool(np.any(group[rows] == g)) for rows in plan) == 1
    assert len(shared_prompt_micro_batches(lengths, group, prompt_len, 10**6)) == 1
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        shared_prompt_micro_batches(lengths, group, prompt_len, 0)


def test_packed_rows_store_a_shared_prompt_once():
    import torch

    ids = np.array([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0], [3, 4, 4, 4, 4]])
    att = (ids > 0).astype(np.int64)
    resp = np.array([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=np.float32)
    p = PackedRows.build(ids, att, resp, torch.device("cpu"), share=True)
    # prompt [5, 6] once, then rows 0 and 1's rest; row 2 has its own prompt [3]
    assert p.ids.tolist() == [[5, 6, 7, 8, 9, 3, 4, 4, 4, 4]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2, 3, 4]]
    # row 0's token 7 and row 1's token 9 are both predicted at the shared prompt's last position (1)
    assert list(zip(p.row.tolist(), p.col.tolist(), strict=True)) == [(0, 2), (0, 3), (1, 2), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert p.keep.tolist() == [1, 2, 1, 5, 6, 7, 8]
    assert p.targets.tolist() == [7, 8, 9, 4, 4, 4, 4]
    seg = p.segments
    assert seg.prompt_idx[seg.prompt_valid].tolist() == [0, 1, 5]
    assert seg.seq_prompt.tolist() == [0, 0, 1]
    assert [seg.seq_idx[n][seg.seq_valid[n]].tolist() for n in range(3)] == [[2, 3], [4], [6, 7, 8, 9]]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_segment_attention_gives_each_rows_own_logits_and_gradients(checkpointing):
    """A GQA Llama: the shared-prompt packed forward's logits at the kept positions, and the gradients
    of a loss on them, equal the padded forward's (rows that share prompts, a row with nothing to
    train, rows of one token after the prompt)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlloop.learner.policy import _NO_MASK
    from rlloop.learner.segments import ATTENTION, use_segments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, 5), rng.integers(1, 64, 3)]
    layout = [(0, 4), (1, 9), (0, 1), (0, 7), (1, 2), (1, 0)]  # (prompt, response length)
    width = 16
    ids = np.zeros((len(layout), width), dtype=np.int64)
    att, resp = np.zeros_like(ids), np.zeros((len(layout), width), dtype=np.float32)
    for b, (k, n) in enumerate(layout):
        row = np.concatenate([prompts[k], rng.integers(1, 64, n)])
        ids[b, : len(row)], att[b, : len(row)] = row, 1
        resp[b, len(prompts[k]) : len(row)] = 1.0
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # dropout is 0: train mode only switches checkpointing on

    def run(packed: bool):
        model.zero_grad()
        p = PackedRows.build(ids, att, resp, torch.device("cpu"), share=True)
        if packed:
            logits = model(input_ids=p.ids, position_ids=p.position_ids, use_cache=False, attention_mask=_NO_MASK,
                           rlloop_segments=p.segments, logits_to_keep=p.keep).logits[0]  # fmt: skip
        else:
            logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(att)).logits[p.row, p.col - 1]
        weights = torch.linspace(-1, 1, logits.shape[-1])
        (logits.log_softmax(-1) * weights).sum().backward()
        return logits.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}, p.ids.numel()

    ref_logits, ref_grads, padded_tokens = run(False)
    assert use_segments(model) and model.config._attn_implementation == ATTENTION
    logits, grads, packed_tokens = run(True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # each prompt stored once instead of 3 times (prompt 1's row with nothing to train is all prompt: shared)
    assert packed_tokens == int(att.sum()) - 2 * 5 - 2 * 3
    # a forward without segments (padded rows) is sdpa's, as before the switch
    row, col = np.nonzero(resp)
    with torch.no_grad():
        again = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(att)).logits[row, col - 1]
    torch.testing.assert_close(again, ref_logits, atol=1e-6, rtol=1e-6)


def test_models_without_the_attention_interface_keep_their_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlloop.learner.segments import supports_segments, use_segments

    eager = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attn_implementation="eager"))  # fmt: skip
    assert not supports_segments(eager) and not use_segments(eager)
    assert eager.config._attn_implementation == "eager"


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


def _grouped_batch():
    """GRPO's layout: two prompts with four responses each of very different lengths (one with nothing
    to train), and a row whose prompt is a prefix of another's."""
    batch = make_batch(num_rows=9, max_len=40, seed=7)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, 200, 6), rng.integers(1, 200, 9)]
    for b, (k, n) in enumerate([(0, 20), (0, 3), (0, 31), (0, 12), (1, 1), (1, 25), (1, 8), (1, 30)]):
        row = np.concatenate([prompts[k], rng.integers(1, 200, n)])
        batch.input_ids[b] = 0
        batch.attention_mask[b] = 0
        batch.response_mask[b] = 0
        batch.input_ids[b, : len(row)], batch.attention_mask[b, : len(row)] = row, 1
        batch.response_mask[b, len(prompts[k]) : len(row)] = 1.0
    batch.input_ids[8, :4] = prompts[1][:4]  # row 8: a prompt that is a prefix of prompt 1 (not shared)
    batch.response_mask[5] = 0
    batch.advantages = (np.where(np.arange(9) % 3 == 0, 1.0, -0.5)[:, None] * batch.response_mask).astype(np.float32)
    return batch


@pytest.mark.parametrize("loss_agg, entropy_coef", [("token-mean", 0.0), ("seq-mean-token-sum", 0.01)])
@pytest.mark.parametrize("tokens", [None, 60])
def test_shared_prompts_give_the_padded_logprobs_loss_and_gradients(
    tiny_model_path, dist_port, monkeypatch, tokens, loss_agg, entropy_coef
):
    """learner.batching=packed on GRPO groups: each prompt is computed once per micro-batch (60 tokens:
    groups cut into runs that pay their prompt again), with the padded path's numbers."""
    batch = _grouped_batch()
    algo = algo_cfg(loss_agg=loss_agg, kl_coef=0.1, entropy_coef=entropy_coef, use_ref=False)
    lp0, m0, g0 = _step(tiny_model_path, dist_port, batch, monkeypatch, algo, micro_batch_size=3, batching="padded")
    lp1, m1, g1 = _step(tiny_model_path, dist_port, batch, monkeypatch, algo, micro_batch_size=3, batching="packed",
                        micro_batch_tokens=tokens)  # fmt: skip
    np.testing.assert_allclose(lp1, lp0, atol=2e-6)
    for key in ("actor/pg_loss", "actor/kl_ref", "actor/entropy", "actor/ppo_kl", "actor/grad_norm"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    for name in g0:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-4, atol=1e-7, err_msg=name)
    assert m1["perf/tokens"] == m0["perf/tokens"] == float(batch.attention_mask.sum())
    # prompt 0 once instead of 4 times, prompt 1 once instead of 3 (row 5, with nothing to train, is all
    # prompt: its own group)
    shared = m1["perf/tokens"] - 3 * 6 - 2 * 9
    if tokens is None:  # the budget (3 x the longest row, 120 tokens) holds every group whole
        assert m1["perf/computed_tokens"] == shared
    else:  # 60 tokens: group 0 (72) is cut in two runs, each with the prompt
        assert m1["perf/computed_tokens"] == shared + 6
    # model FLOPs count a shared prompt once (the work there is to do), so MFU stays a share of the peak
    per_token = (m0["perf/model_flops"] - m1["perf/model_flops"]) / (m1["perf/tokens"] - m1["perf/computed_tokens"])
    assert per_token > 0 and m1["perf/model_flops"] < m0["perf/model_flops"]


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
