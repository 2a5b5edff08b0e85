"""Token-budget packing and balanced replica shares: rules on lengths, then the scorer's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlloop.rewards.prm.batching import pack_by_token_budget, split_balanced
from rlloop.rewards.prm.service import PRMScorer, resolve_device

lengths_st = st.lists(st.integers(1, 300), min_size=0, max_size=60)


@settings(max_examples=200, deadline=None)
@given(lengths_st, st.integers(1, 2000), st.one_of(st.none(), st.integers(1, 16)))
def test_packing_covers_every_row_once_within_budget(lengths, budget, max_rows):
    batches = pack_by_token_budget(lengths, budget, max_rows)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        if len(b) > 1:  # several rows only when they fit together; a row over budget goes alone
            assert width * len(b) <= budget
        if max_rows is not None:
            assert len(b) <= max_rows
    # greedy longest-first: the next batch's first row would not have fitted into the batch before it
    for prev in batches[:-1]:
        width = max(lengths[i] for i in prev)
        rows_full = max_rows is not None and len(prev) == max_rows
        assert rows_full or width * (len(prev) + 1) > budget


def test_packing_examples():
    # longest first; 4 rows of 10 fit a budget of 40, the 25-token row needs its own batch
    assert pack_by_token_budget([10, 25, 10, 10, 10], 40) == [[1], [0, 2, 3, 4]]
    # a row over the budget is still scored, alone
    assert pack_by_token_budget([5, 100, 5], 20) == [[1], [0, 2]]
    # max_rows caps rows whatever the budget; None budget = fixed batches of max_rows
    assert pack_by_token_budget([3, 3, 3, 3, 3], 1000, 2) == [[0, 1], [2, 3], [4]]
    assert pack_by_token_budget([1, 50, 2], None, 2) == [[1, 2], [0]]
    assert pack_by_token_budget([], 10) == []
    with pytest.raises(ValueError, match="max_batch_tokens=0"):
        pack_by_token_budget([1], 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 500), max_size=50), st.integers(1, 6))
def test_split_balanced_partitions_and_balances(weights, parts):
    shares = split_balanced(weights, parts)
    assert sorted(i for s in shares for i in s) == list(range(len(weights)))
    assert all(s == sorted(s) and s for s in shares)
    assert len(shares) == min(parts, len(weights))
    if len(shares) == parts and weights:
        loads = [sum(weights[i] for i in s) for s in shares]
        assert max(loads) - min(loads) <= max(weights)  # LPT: off by at most one item


def test_split_balanced_example():
    assert split_balanced([100, 1, 1, 98], 2) == [[0], [1, 2, 3]]  # loads 100 and 100
    assert split_balanced([5], 3) == [[0]]


# ----- the scorer: packed batches give the values of scoring each trajectory alone ---------------

PROMPTS = ["Question: what is 12 + 30?\n\n", "Q: 2+2?", "Question: what is 7 - 5?\n\n", "Step one."]
RESPONSES = [
    "First we add 10 and 30.\n\nThen we add 2.\n\nThe answer is 42.\n\nCheck: 42 - 30 = 12.",
    "It is 4.",
    "We take 5 from 7.\n\nThe answer is \\boxed{2} ✓",
    "The next step.\n\nThe final answer is 42.",
]


def test_token_budget_scores_equal_one_by_one_scores_in_input_order(prm_dir):
    torch.set_num_threads(1)
    alone = PRMScorer(prm_dir, batch_size=1, max_batch_tokens=None)
    expected = [alone.score([p], [r])[0] for p, r in zip(PROMPTS * 3, RESPONSES * 3, strict=True)]
    lengths = [len(alone.encode(p, r).input_ids) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    # a budget that fits two or three short rows, and is below the longest row (scored alone)
    budget = max(lengths) - 1
    packed = PRMScorer(prm_dir, batch_size=64, max_batch_tokens=budget)
    out = packed.score_request(PROMPTS * 3, RESPONSES * 3)
    assert 1 < out["batches"] < 12  # really packed several rows, and really split
    assert out["padded_tokens"] >= out["tokens"] == sum(lengths) * 3
    for got, want in zip(out["results"], expected, strict=True):
        assert len(got["step_values"]) == len(want["step_values"])
        assert got["prompt_value"] == pytest.approx(want["prompt_value"], abs=1e-5)
        np.testing.assert_allclose(got["step_values"], want["step_values"], atol=1e-5)
    # the values differ between trajectories, so a permuted order would have failed above
    assert len({round(r["step_values"][-1], 6) for r in expected[:4]}) == 4


def test_cpu_device_never_needs_cuda_and_bad_devices_name_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="device='cuda'"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_device("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_equal_cpu_scores(prm_dir):
    cpu = PRMScorer(prm_dir).score(PROMPTS, RESPONSES)
    gpu = PRMScorer(prm_dir, device="cuda").score(PROMPTS, RESPONSES)
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(a["step_values"], b["step_values"], atol=1e-4)
