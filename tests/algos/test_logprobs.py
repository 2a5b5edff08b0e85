"""The chunked sampled-token logprobs: same values and gradients as log_softmax + gather, in chunks."""

import pytest
import torch

import rlloop.algos.logprobs as lp_mod
from rlloop.algos.logprobs import sampled_logprobs
from rlloop.algos.losses import entropy_from_logits


def plain(logits, ids, temperature, start):
    z = logits[:, :-1].float() / temperature
    picked = torch.log_softmax(z, dim=-1).gather(-1, ids[:, start + 1 :, None]).squeeze(-1)
    ent = entropy_from_logits(z)
    pad = (start + 1, 0)
    return torch.nn.functional.pad(picked, pad), torch.nn.functional.pad(ent, pad)


@pytest.fixture
def small_chunks(monkeypatch):
    # 2 rows of 7 x 50 float32 logits per chunk: a batch of 5 rows takes 3 chunks, the last one short
    monkeypatch.setattr(lp_mod, "CHUNK_BYTES", 2 * 7 * 50 * 4)


@pytest.mark.parametrize("temperature,start", [(1.0, 0), (0.7, 3)])
def test_values_entropy_and_gradient_match_log_softmax(small_chunks, temperature, start):
    torch.manual_seed(0)
    B, T, V = 5, 10, 50
    ids = torch.randint(0, V, (B, T))
    logits = (3 * torch.randn(B, T - start, V)).requires_grad_()
    weights = torch.randn(B, T)
    lp, ent = sampled_logprobs(logits, ids, temperature, start)
    (lp * weights).sum().backward()
    grad = logits.grad.clone()

    ref_logits = logits.detach().clone().requires_grad_()
    ref_lp, ref_ent = plain(ref_logits, ids, temperature, start)
    (ref_lp * weights).sum().backward()

    assert lp.shape == ent.shape == (B, T) and lp.dtype == torch.float32
    assert torch.all(lp[:, : start + 1] == 0) and torch.all(ent[:, : start + 1] == 0)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[:, -1] == 0)  # the last position predicts no token
    assert not ent.requires_grad


def test_gradcheck_in_float64(small_chunks):
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (3, 7))
    logits = torch.randn(3, 7, 50, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sampled_logprobs(x, ids, 0.8)[0], (logits,))


def test_bf16_logits_are_upcast_and_get_a_bf16_gradient():
    torch.manual_seed(2)
    ids = torch.randint(0, 40, (2, 6))
    logits = torch.randn(2, 6, 40).to(torch.bfloat16).requires_grad_()
    lp, _ = sampled_logprobs(logits, ids)
    lp.sum().backward()
    ref = plain(logits.detach().float(), ids, 1.0, 0)[0]
    assert lp.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)


def test_without_entropy_the_entropy_is_zero_and_the_logprobs_unchanged():
    torch.manual_seed(3)
    ids = torch.randint(0, 30, (2, 5))
    logits = torch.randn(2, 5, 30)
    lp, ent = sampled_logprobs(logits, ids, with_entropy=False)
    assert torch.equal(lp, sampled_logprobs(logits, ids)[0])
    assert torch.all(ent == 0)


def test_mismatched_shapes_and_a_zero_temperature_are_named():
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"from column 1 do not cover input_ids \(2, 6\)"):
        sampled_logprobs(torch.zeros(2, 6, 9), ids, 1.0, start=1)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        sampled_logprobs(torch.zeros(2, 6, 9), ids, 0.0)
    with pytest.raises(ValueError, match=r"logits \[B, L, V\]"):
        sampled_logprobs(torch.zeros(2, 6), ids)
