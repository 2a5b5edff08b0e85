"""PolicyLearner in-process at world size 1 (ZeRO-2): logprobs, a GRPO step, weights out, save_hf."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import algo_cfg, hf_logprobs, inprocess_learner, learner_cfg, make_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _sequence_logprob(logprobs: np.ndarray, batch, row: int) -> float:
    return float((logprobs[row] * batch.response_mask[row]).sum())


def test_policy_learner_end_to_end(tiny_model_path, dist_port, tmp_path):
    from transformers import AutoModelForCausalLM

    learner = inprocess_learner(tiny_model_path, dist_port)
    batch = make_batch(num_rows=5)
    expected = hf_logprobs(tiny_model_path, batch, temperature=0.7)

    # logprobs of policy and reference equal an unbatched HF forward (micro batches of 2, trimmed)
    old = learner.compute_logprobs(batch, "policy")
    ref = learner.compute_logprobs(batch, "ref")
    assert old.shape == batch.input_ids.shape and old.dtype == np.float32
    np.testing.assert_allclose(old, expected, atol=1e-5)
    np.testing.assert_allclose(ref, expected, atol=1e-5)
    assert np.all(old[batch.response_mask == 0] == 0)

    before = learner.full_state_dict()
    hf_keys = set(AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict())
    assert set(before) == hf_keys
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in before.values())

    # one GRPO step with advantage +1 on row 0, -1 on the others
    batch.old_logprobs, batch.ref_logprobs = old, ref
    metrics = learner.train_step(batch)
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/kl_ref"):
        assert key in metrics and np.isfinite(metrics[key]), (key, metrics)
    assert metrics["actor/grad_norm"] > 0 and metrics["actor/lr"] == pytest.approx(1e-2)
    # at ratio 1 the PPO loss is -mean advantage over response tokens
    mask = batch.response_mask
    assert metrics["actor/pg_loss"] == pytest.approx(-(batch.advantages * mask).sum() / mask.sum(), abs=1e-5)
    assert metrics["actor/kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert learner.version == 1

    new = learner.compute_logprobs(batch, "policy")
    assert _sequence_logprob(new, batch, 0) > _sequence_logprob(old, batch, 0) + 1e-3
    for row in range(1, len(batch)):
        assert _sequence_logprob(new, batch, row) < _sequence_logprob(old, batch, row)
    # the reference stays frozen
    np.testing.assert_allclose(learner.compute_logprobs(batch, "ref"), ref, atol=1e-6)

    after = learner.full_state_dict()
    assert set(after) == hf_keys
    changed = [k for k in hf_keys if not np.allclose(after[k], before[k])]
    assert "lm_head.weight" in changed and len(changed) >= len(hf_keys) // 2

    # save_hf: a folder from_pretrained loads, giving the updated policy's logprobs
    out = tmp_path / "saved"
    learner.save_hf(str(out))
    learner.save_hf(str(out))  # replaces an existing folder
    assert not list(tmp_path.glob("saved.*"))
    np.testing.assert_allclose(hf_logprobs(str(out), batch, temperature=0.7), new, atol=1e-5)


@pytest.mark.parametrize(
    "loss_agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_micro_batching_does_not_change_the_update(tiny_model_path, dist_port, loss_agg):
    """Micro batches of 1 row and of the whole batch give the same steps (the losses add up exactly),
    with the KL and entropy terms in the loss and two PPO epochs. Padded micro-batches (rows in order):
    the other layouts' gradients are compared with these in test_batching.py, before Adam's first step
    turns float rounding of near-zero gradient entries into ~1e-5 weight differences."""
    batch = make_batch(num_rows=4, seed=1)
    batch.response_mask[3] = 0  # a row with nothing to train: must not count in seq-mean modes
    algo = algo_cfg(loss_agg=loss_agg, kl_coef=0.1, entropy_coef=0.01, ppo_epochs=2)
    results = []
    for micro in (1, 4):
        learner = inprocess_learner(
            tiny_model_path, dist_port, algo=algo, micro_batch_size=micro, batching="padded"
        )
        batch.old_logprobs = learner.compute_logprobs(batch)
        batch.ref_logprobs = batch.old_logprobs - 0.1 * batch.response_mask
        metrics = learner.train_step(batch)
        assert learner.version == 2
        results.append((metrics, learner.full_state_dict()))
    (m1, w1), (m4, w4) = results
    for key in ("actor/pg_loss", "actor/kl_ref", "actor/entropy", "actor/ppo_kl", "actor/pg_clipfrac"):
        assert m1[key] == pytest.approx(m4[key], abs=1e-6), key
    assert m1["actor/grad_norm"] == pytest.approx(m4["actor/grad_norm"], rel=1e-4)
    for key in w1:
        # Adam's first step is ~lr * sign(g): entries with |g| near eps amplify float rounding of the sum
        np.testing.assert_allclose(w1[key], w4[key], atol=2e-5, err_msg=key)


def test_one_epoch_update_takes_old_logprobs_from_its_own_forward(tiny_model_path, dist_port):
    """With ppo_epochs=1 and no old_logprobs the update uses its own forward, detached: the same step
    as a separate no-grad pass (the recompute path), and it reports the learner/rollout mismatch."""
    batch = make_batch(num_rows=4, seed=2)
    results = []
    for fused in (False, True):
        learner = inprocess_learner(tiny_model_path, dist_port, micro_batch_size=2)
        recomputed = learner.compute_logprobs(batch)
        batch.old_logprobs = None if fused else recomputed
        batch.rollout_logprobs = recomputed - 0.25 * batch.response_mask  # a known engine mismatch
        results.append((learner.train_step(batch), learner.full_state_dict()))
    (m_sep, w_sep), (m_fused, w_fused) = results
    for key in ("actor/pg_loss", "actor/entropy", "actor/ppo_kl", "actor/pg_clipfrac"):
        assert m_fused[key] == pytest.approx(m_sep[key], abs=1e-6), key
    assert m_fused["actor/ppo_kl"] == 0.0 and m_fused["actor/pg_clipfrac"] == 0.0  # ratio exactly 1
    assert m_fused["actor/rollout_logprob_mismatch"] == pytest.approx(0.25, abs=1e-5)
    assert m_sep["actor/rollout_logprob_mismatch"] == pytest.approx(0.25, abs=1e-5)
    for key in w_sep:
        np.testing.assert_allclose(w_fused[key], w_sep[key], atol=1e-6, err_msg=key)

    # more than one epoch needs the old policy's logprobs from before the first optimizer step
    learner = inprocess_learner(tiny_model_path, dist_port, algo=algo_cfg(ppo_epochs=2))
    batch.old_logprobs = None
    with pytest.raises(ValueError, match="old_logprobs is None with ppo_epochs=2"):
        learner.train_step(batch)


def test_lm_head_on_response_positions_only_gives_the_same_update(tiny_model_path, dist_port, monkeypatch):
    """The learner asks the model for logits from the earliest response token on (logits_to_keep): the
    same logprobs, metrics and step as logits at every position (a model without logits_to_keep)."""
    import rlloop.learner.policy as policy

    batch = make_batch(num_rows=4, seed=4)
    batch.response_mask[:, :4] = 0  # prompts of 4+ tokens: the LM head skips at least 3 positions
    assert policy.first_logit_position(batch.response_mask) >= 3
    algo = algo_cfg(kl_coef=0.1, entropy_coef=0.01)
    results = []
    for keeps in (True, False):
        monkeypatch.setattr(policy, "_keeps_logits", lambda model, keeps=keeps: keeps)
        learner = inprocess_learner(tiny_model_path, dist_port, algo=algo, micro_batch_size=2)
        assert policy._keeps_logits(learner.engine) is keeps
        old = learner.compute_logprobs(batch)
        batch.old_logprobs, batch.ref_logprobs = old, old - 0.1 * batch.response_mask
        results.append((old, learner.train_step(batch), learner.full_state_dict()))
    monkeypatch.undo()
    assert policy._keeps_logits(learner.engine)  # the tiny Llama takes logits_to_keep
    (lp_k, m_k, w_k), (lp_f, m_f, w_f) = results
    np.testing.assert_allclose(lp_k, lp_f, atol=1e-6)
    np.testing.assert_allclose(lp_k, hf_logprobs(tiny_model_path, batch, temperature=0.7), atol=1e-5)
    for key in ("actor/pg_loss", "actor/kl_ref", "actor/entropy", "actor/ppo_kl", "actor/grad_norm"):
        assert m_k[key] == pytest.approx(m_f[key], rel=1e-5, abs=1e-7), key
    for key in w_k:
        np.testing.assert_allclose(w_k[key], w_f[key], atol=2e-5, err_msg=key)


def test_gradient_checkpointing_gives_the_same_update(tiny_model_path, dist_port):
    """learner.gradient_checkpointing recomputes each layer in the backward pass (in the learner's eval
    mode, so without dropout): the same logprobs, metrics and step as keeping the activations."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    batch = make_batch(num_rows=4, seed=5)
    algo = algo_cfg(kl_coef=0.1, entropy_coef=0.01)
    results = []
    for gc in (False, True):
        learner = inprocess_learner(tiny_model_path, dist_port, algo=algo, gradient_checkpointing=gc)
        layers = [m for m in learner.engine.module.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert layers and all(m.gradient_checkpointing is gc for m in layers)
        if gc:  # checkpointing runs only in training mode: the layers are, their children are not
            assert all(m.training for m in layers) and not any(c.training for m in layers for c in m.children())
        old = learner.compute_logprobs(batch)
        batch.old_logprobs, batch.ref_logprobs = old, old - 0.1 * batch.response_mask
        calls, mlp = [], layers[0].mlp
        forward = mlp.forward  # (module hooks do not fire in the recomputation: count the calls)
        mlp.forward = lambda *a, calls=calls, forward=forward, **k: (calls.append(1), forward(*a, **k))[1]
        results.append((old, learner.train_step(batch), learner.full_state_dict()))
        del mlp.forward
        # 2 micro-batches: the MLP runs once each, and once more in the backward when checkpointed
        assert len(calls) == (4 if gc else 2)
    (lp0, m0, w0), (lp1, m1, w1) = results
    np.testing.assert_allclose(lp1, lp0, atol=1e-6)
    for key in ("actor/pg_loss", "actor/kl_ref", "actor/entropy", "actor/ppo_kl", "actor/grad_norm"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    for key in w0:
        np.testing.assert_allclose(w1[key], w0[key], atol=2e-5, err_msg=key)


def test_bf16_step(tiny_model_path, dist_port):
    learner = inprocess_learner(tiny_model_path, dist_port, bf16=True)
    batch = make_batch(num_rows=3, seed=3)
    batch.old_logprobs = learner.compute_logprobs(batch)
    np.testing.assert_allclose(batch.old_logprobs, hf_logprobs(tiny_model_path, batch, 0.7), atol=0.05)
    before = learner.full_state_dict()
    metrics = learner.train_step(batch)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    after = learner.full_state_dict()
    assert after["lm_head.weight"].dtype == np.float32
    assert not np.allclose(after["lm_head.weight"], before["lm_head.weight"])


def test_bad_arguments_name_the_culprit(tiny_model_path, dist_port):
    from rlloop.learner.policy import PolicyLearner

    with pytest.raises(ValueError, match="temperature"):
        PolicyLearner(
            tiny_model_path,
            learner_cfg(),
            algo_cfg(),
            rank=0,
            world_size=1,
            master_addr="127.0.0.1",
            master_port=dist_port,
            temperature=0.0,
        )


@pytest.mark.parametrize(
    "loss_agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_rank_loss_scales_recover_the_global_loss(loss_agg):
    """mean_r scale_r * agg(L_r, mask_r) == agg(L, mask) over the unpadded batch, for every mode."""
    import torch

    from rlloop.algos.losses import aggregate_loss
    from rlloop.learner.group import pad_rows, rank_loss_scales, shard_slices

    batch = make_batch(num_rows=7, seed=4)
    batch.response_mask[2] = 0
    padded, n = pad_rows(batch, 3)
    assert len(padded) == 9 and n == 7 and padded.response_mask[7:].sum() == 0
    np.testing.assert_array_equal(padded.input_ids[:7], batch.input_ids)
    shards = shard_slices(len(padded), 3)
    scales = rank_loss_scales(padded.response_mask, n, shards, loss_agg)
    loss = torch.randn(len(padded), padded.input_ids.shape[1], generator=torch.Generator().manual_seed(0))
    mask = torch.tensor(padded.response_mask)
    per_rank = [float(aggregate_loss(loss[s], mask[s], loss_agg)) for s in shards]
    expected = float(aggregate_loss(loss[:n], mask[:n], loss_agg))
    assert np.mean([p * c for p, c in zip(per_rank, scales, strict=True)]) == pytest.approx(
        expected, rel=1e-5
    )


def test_zero_stage_0_gives_the_zero2_update_and_resumes_from_its_checkpoint(tiny_model_path, dist_port, tmp_path):
    """At world size 1 ZeRO partitions nothing: stage 0 (plain data parallel, no flat fp32 copies or
    gradient buckets) takes the same steps as stage 2, and its checkpoint resumes the same run."""
    batches = [make_batch(num_rows=4, seed=s) for s in (6, 7)]
    runs = {}
    for stage in (2, 0):
        learner = inprocess_learner(tiny_model_path, dist_port, zero_stage=stage)
        assert learner.zero_stage == stage
        steps = []
        for i, batch in enumerate(batches):
            if stage == 0 and i == 1:  # save after the first step, resume in a fresh learner
                learner.save_checkpoint(str(tmp_path / "ckpt"))
                learner = inprocess_learner(tiny_model_path, dist_port, zero_stage=0)
                assert learner.load_checkpoint(str(tmp_path / "ckpt")) == 1
            batch.old_logprobs = learner.compute_logprobs(batch)
            steps.append((learner.train_step(batch), learner.full_state_dict()))
        runs[stage] = steps
    for (m2, w2), (m0, w0) in zip(runs[2], runs[0], strict=True):
        for key in ("actor/pg_loss", "actor/ppo_kl", "actor/grad_norm"):
            assert m0[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-7), key
        for key in w2:
            np.testing.assert_allclose(w0[key], w2[key], atol=2e-5, err_msg=key)
    assert not all(np.allclose(runs[0][1][1][k], runs[0][0][1][k]) for k in w2)  # the second step moved


def test_learner_sets_the_malloc_threshold_it_is_given(tiny_model_path, dist_port, monkeypatch):
    """learner.malloc_mmap_threshold_mb reaches glibc (the call itself: tests/distributed/test_procmem.py);
    0 leaves glibc's dynamic threshold alone."""
    import rlloop.distributed.procmem as procmem

    calls = []
    monkeypatch.setattr(procmem, "set_malloc_mmap_threshold", lambda n: calls.append(n) or True)
    inprocess_learner(tiny_model_path, dist_port, malloc_mmap_threshold_mb=1.5)
    assert calls == [int(1.5 * 2**20)]
    inprocess_learner(tiny_model_path, dist_port, malloc_mmap_threshold_mb=0)
    assert calls == [int(1.5 * 2**20)]
