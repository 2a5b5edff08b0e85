"""TD-PRM targets, loss and metrics against slow, obviously-correct Python loops (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlloop.algos.td import (
    auroc,
    compute_td_targets,
    ema_state,
    nstep_targets,
    prm_bce_loss,
    reach_targets,
    smoothness,
    td0_targets,
    td_lambda_targets,
)

# ---------------------------------------------------------------- reference loops (one trajectory)


def clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def ref_td0(v: list[float], r: list[float], ell: float, gamma: float) -> list[float]:
    L = len(v)
    return [ell if k == L - 1 else clamp01(r[k] + gamma * v[k + 1]) for k in range(L)]


def ref_nstep(v: list[float], r: list[float], ell: float, gamma: float, n: int) -> list[float]:
    L = len(v)
    out = []
    for k in range(L):
        if k == L - 1:
            out.append(ell)
            continue
        m = min(n, L - 1 - k)
        g = sum(gamma**i * r[k + i] for i in range(m)) + gamma**m * v[k + m]
        out.append(clamp01(g))
    return out


def ref_lambda(v: list[float], r: list[float], ell: float, gamma: float, lam: float) -> list[float]:
    L = len(v)
    G = [0.0] * L
    G[L - 1] = ell
    for k in range(L - 2, -1, -1):
        G[k] = r[k] + gamma * ((1 - lam) * v[k + 1] + lam * G[k + 1])
    return [clamp01(g) for g in G]


def ref_mc_return(r: list[float], ell: float, gamma: float) -> list[float]:
    """Discounted Monte-Carlo return: Σ_{i<L-1-k} γ^i r_{k+i} + γ^{L-1-k} ℓ (clamped)."""
    L = len(r)
    return [
        clamp01(sum(gamma**i * r[k + i] for i in range(L - 1 - k)) + gamma ** (L - 1 - k) * ell)
        for k in range(L)
    ]


# ---------------------------------------------------------------- strategies

unit = st.floats(0.0, 1.0, allow_nan=False, width=32)
rew = st.floats(-0.5, 0.5, allow_nan=False, width=32)
gammas = st.one_of(st.sampled_from([0.0, 1.0, 0.8]), unit)


@st.composite
def trajectories(draw):
    """A ragged batch: list of (values, rewards, outcome) with 1..6 steps each."""
    B = draw(st.integers(1, 5))
    rows = []
    for _ in range(B):
        L = draw(st.integers(1, 6))
        v = draw(st.lists(unit, min_size=L, max_size=L))
        r = draw(st.lists(rew, min_size=L, max_size=L))
        ell = draw(st.sampled_from([0.0, 1.0]) | unit)
        rows.append((v, r, ell))
    return rows


def pad(rows):
    """Right-padded values/rewards [B, K], step_mask [B, K], outcome [B]; padding holds junk (0.77)."""
    K = max(len(v) for v, _, _ in rows)
    B = len(rows)
    values = torch.full((B, K), 0.77, dtype=torch.float64)
    rewards = torch.full((B, K), 0.33, dtype=torch.float64)
    mask = torch.zeros(B, K)
    for b, (v, r, _) in enumerate(rows):
        values[b, : len(v)] = torch.tensor(v, dtype=torch.float64)
        rewards[b, : len(r)] = torch.tensor(r, dtype=torch.float64)
        mask[b, : len(v)] = 1
    outcome = torch.tensor([ell for _, _, ell in rows], dtype=torch.float64)
    return values, rewards, mask, outcome


def assert_rows(got: torch.Tensor, rows, expected_fn):
    for b, row in enumerate(rows):
        L = len(row[0])
        exp = expected_fn(*row)
        assert got[b, :L].tolist() == pytest.approx(exp, abs=1e-9), f"row {b}"
        assert torch.all(got[b, L:] == 0), f"row {b} padding"


# ---------------------------------------------------------------- targets vs references


@settings(max_examples=150, deadline=None)
@given(trajectories(), gammas, st.booleans())
def test_td0_matches_reference(rows, gamma, use_rewards):
    values, rewards, mask, outcome = pad(rows)
    got = td0_targets(values, mask, outcome, gamma=gamma, rewards=rewards if use_rewards else None)
    assert_rows(got, rows, lambda v, r, ell: ref_td0(v, r if use_rewards else [0.0] * len(v), ell, gamma))


@settings(max_examples=150, deadline=None)
@given(trajectories(), gammas, st.integers(1, 7), st.booleans())
def test_nstep_matches_reference(rows, gamma, n, use_rewards):
    values, rewards, mask, outcome = pad(rows)
    got = nstep_targets(values, mask, outcome, n=n, gamma=gamma, rewards=rewards if use_rewards else None)
    assert_rows(
        got, rows, lambda v, r, ell: ref_nstep(v, r if use_rewards else [0.0] * len(v), ell, gamma, n)
    )


@settings(max_examples=150, deadline=None)
@given(trajectories(), gammas, unit, st.booleans())
def test_td_lambda_matches_reference(rows, gamma, lam, use_rewards):
    values, rewards, mask, outcome = pad(rows)
    got = td_lambda_targets(
        values, mask, outcome, lam=lam, gamma=gamma, rewards=rewards if use_rewards else None
    )
    assert_rows(
        got, rows, lambda v, r, ell: ref_lambda(v, r if use_rewards else [0.0] * len(v), ell, gamma, lam)
    )


@settings(max_examples=100, deadline=None)
@given(trajectories(), gammas)
def test_special_cases_agree(rows, gamma):
    """n=1 == TD(0) == TD(λ=0); TD(λ=1) == discounted MC return; γ=1, λ=1, r=0 == mc (outcome everywhere)."""
    values, rewards, mask, outcome = pad(rows)
    td0 = td0_targets(values, mask, outcome, gamma=gamma, rewards=rewards)
    assert torch.allclose(nstep_targets(values, mask, outcome, n=1, gamma=gamma, rewards=rewards), td0)
    assert torch.allclose(
        td_lambda_targets(values, mask, outcome, lam=0.0, gamma=gamma, rewards=rewards), td0
    )
    lam1 = td_lambda_targets(values, mask, outcome, lam=1.0, gamma=gamma, rewards=rewards)
    assert_rows(lam1, rows, lambda v, r, ell: ref_mc_return(r, ell, gamma))
    # λ = 1 ignores the values entirely
    other = torch.rand_like(values)
    assert torch.allclose(
        td_lambda_targets(other, mask, outcome, lam=1.0, gamma=gamma, rewards=rewards), lam1
    )
    # n >= every row's length is the MC return too, except that the window ends ON the terminal state
    # and bootstraps V_{L-1} (as TD(0) does), not ℓ
    mc = compute_td_targets("mc", values, mask, outcome, gamma=gamma)
    lam1_g1 = td_lambda_targets(values, mask, outcome, lam=1.0, gamma=1.0)
    assert torch.allclose(mc, lam1_g1)


@settings(max_examples=100, deadline=None)
@given(trajectories(), gammas, st.sampled_from(["td0", "nstep", "td_lambda", "mc"]))
def test_per_sample_masks_batch_equals_rows_alone(rows, gamma, kind):
    """The TDRM release applied the last row's next-state mask to the whole batch; here each row is its own."""
    values, rewards, mask, outcome = pad(rows)
    batch = compute_td_targets(kind, values, mask, outcome, gamma=gamma, n=2, lam=0.7, rewards=rewards)
    for b, (v, _, _) in enumerate(rows):
        L = len(v)
        alone = compute_td_targets(
            kind,
            values[b : b + 1, :L],
            mask[b : b + 1, :L],
            outcome[b : b + 1],
            gamma=gamma,
            n=2,
            lam=0.7,
            rewards=rewards[b : b + 1, :L],
        )
        assert torch.allclose(batch[b, :L], alone[0])


def test_values_are_detached_and_targets_in_range():
    v = torch.rand(3, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    out = torch.tensor([1.0, 0.0, 1.0])
    for kind in ("td0", "nstep", "td_lambda", "mc"):
        y = compute_td_targets(kind, v, mask, out, gamma=0.8, rewards=torch.full((3, 4), 0.9))
        assert not y.requires_grad
        assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_k1_target_is_outcome():
    v = torch.tensor([[0.3], [0.9]])
    mask = torch.ones(2, 1)
    out = torch.tensor([1.0, 0.0])
    for kind in ("td0", "nstep", "td_lambda", "mc"):
        assert compute_td_targets(kind, v, mask, out, gamma=0.8).tolist() == [[1.0], [0.0]]


def test_hand_worked_td0_and_nstep():
    # V = [0.5, 0.6, 0.9], ℓ = 1, γ = 0.8
    v = torch.tensor([[0.5, 0.6, 0.9]])
    mask = torch.ones(1, 3)
    out = torch.tensor([1.0])
    assert td0_targets(v, mask, out, gamma=0.8).tolist()[0] == pytest.approx([0.48, 0.72, 1.0])
    # 2-step: y0 = γ² V2 = 0.576; y1 window truncated to 1 step: γ V2 = 0.72
    assert nstep_targets(v, mask, out, n=2, gamma=0.8).tolist()[0] == pytest.approx([0.576, 0.72, 1.0])
    # λ = 0.5: G1 = 0.8 (0.5·0.9 + 0.5·1) = 0.76; G0 = 0.8 (0.5·0.6 + 0.5·0.76) = 0.544
    assert td_lambda_targets(v, mask, out, lam=0.5, gamma=0.8).tolist()[0] == pytest.approx(
        [0.544, 0.76, 1.0]
    )


def test_bad_inputs_name_argument():
    v = torch.rand(2, 3)
    with pytest.raises(ValueError, match="step_mask row 0 is not right-padded"):
        td0_targets(v, torch.tensor([[0, 1, 1], [1, 0, 0]]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="outcome must lie in"):
        td0_targets(v, torch.ones(2, 3), torch.tensor([1.5, 0.0]))
    with pytest.raises(ValueError, match="gamma"):
        td0_targets(v, torch.ones(2, 3), torch.tensor([1.0, 0.0]), gamma=1.5)
    with pytest.raises(ValueError, match="td="):
        compute_td_targets("td2", v, torch.ones(2, 3), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="n \\(TD steps\\)"):
        nstep_targets(v, torch.ones(2, 3), torch.tensor([1.0, 0.0]), n=0)


# ---------------------------------------------------------------- loss and metrics


def test_bce_loss_hand_worked():
    # two rows; row 0 has 2 steps, row 1 has 1 step; terminal weight 2
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(1 / 3), 5.0]], requires_grad=True)
    targets = torch.tensor([[0.5, 1.0], [0.0, 0.3]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss = prm_bce_loss(logits, targets, mask, terminal_weight=2.0)
    # σ(0) = 0.5 toward 0.5: ln 2; σ(ln 3) = 0.75 toward 1: -ln 0.75 (terminal, ×2); σ(ln 1/3) = 0.25 toward 0: -ln 0.75 (terminal, ×2)
    expected = (math.log(2) + 2 * -math.log(0.75) + 2 * -math.log(0.75)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1, 1].item() == 0.0  # padding gets no gradient
    assert prm_bce_loss(logits, targets, mask, terminal_weight=1.0).item() == pytest.approx(
        (math.log(2) - 2 * math.log(0.75)) / 3, rel=1e-6
    )


def test_bce_loss_finite_for_extreme_logits():
    logits = torch.tensor([[100.0, -100.0]])
    loss = prm_bce_loss(logits, torch.tensor([[0.0, 1.0]]), torch.ones(1, 2))
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(100.0, rel=1e-4)


def test_smoothness_hand_worked():
    v = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.4, 0.9, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # transitions: |0.4|, |0.3| (row 0; the 0.2->0.9 pair is padding), |0.5| (row 1)
    assert smoothness(v, mask).item() == pytest.approx(1.2 / 3)
    assert smoothness(v, torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]])).item() == 0.0


def test_auroc_hand_worked_with_ties():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1])
    labels = torch.tensor([1, 1, 0, 0, 1])
    # positive/negative pairs: (0.9>0.8 ✓, 0.9>0.3 ✓), (0.8=0.8 ½, 0.8>0.3 ✓), (0.1<0.8 ✗, 0.1<0.3 ✗) -> 3.5/6
    assert auroc(scores, labels) == pytest.approx(3.5 / 6)
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 1])) == 1.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.booleans()), min_size=2, max_size=30))
def test_auroc_matches_pair_count(pairs):
    labels = [int(y) for _, y in pairs]
    if len(set(labels)) < 2:
        return
    s = [x for x, _ in pairs]
    pos = [a for a, y in zip(s, labels, strict=True) if y]
    neg = [a for a, y in zip(s, labels, strict=True) if not y]
    ref = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))
    assert auroc(torch.tensor(s), torch.tensor(labels)) == pytest.approx(ref)


def test_ema_state_is_pure():
    target = {"w": torch.zeros(2), "n": torch.tensor([1])}
    online = {"w": torch.ones(2), "n": torch.tensor([5])}
    new = ema_state(target, online, decay=0.9)
    assert new["w"].tolist() == pytest.approx([0.1, 0.1]) and new["n"].tolist() == [5]
    assert target["w"].tolist() == [0.0, 0.0]
    with pytest.raises(KeyError):
        ema_state(target, {"w": torch.ones(2)}, decay=0.9)


# ---------------------------------------------------------------- reach: the max backup of hard labels


def ref_reach(v: list[float], h: list[float], ell: float, gamma: float, lam: float) -> list[float]:
    L = len(v)
    G = [0.0] * L
    G[L - 1] = ell
    for k in range(L - 2, -1, -1):
        G[k] = max(h[k], gamma * ((1 - lam) * v[k + 1] + lam * G[k + 1]))
    return [clamp01(g) for g in G]


@settings(max_examples=150, deadline=None)
@given(trajectories(), gammas, st.one_of(st.sampled_from([0.0, 1.0]), unit), st.data())
def test_reach_matches_reference(rows, gamma, lam, data):
    hard = [data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=len(v), max_size=len(v))) for v, _, _ in rows]
    values, _, mask, outcome = pad(rows)
    labels = torch.full_like(values, 0.5)  # junk on padding
    for b, h in enumerate(hard):
        labels[b, : len(h)] = torch.tensor(h, dtype=torch.float64)
    got = reach_targets(values, mask, outcome, labels, gamma=gamma, lam=lam)
    for b, (v, _, ell) in enumerate(rows):
        L = len(v)
        assert got[b, :L].tolist() == pytest.approx(ref_reach(v, hard[b], ell, gamma, lam), abs=1e-9), f"row {b}"
        assert torch.all(got[b, L:] == 0)
    if lam == 1.0:  # the labels backed up along each solution; the values play no part
        assert torch.equal(reach_targets(torch.rand_like(values), mask, outcome, labels, gamma=gamma, lam=1.0), got)


def test_reach_hand_worked():
    """h = [0, 1, 0, 0], V = [.2, .3, .9, .4], ℓ = 0: a prefix with a successful sample is 1, the others
    take the next prefix's value (λ = 0, γ = 1), the last step the outcome; at λ = 1 the labels alone,
    backed up (a prefix is reachable when a later one is)."""
    v = torch.tensor([[0.2, 0.3, 0.9, 0.4]])
    h = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    mask, out = torch.ones(1, 4), torch.tensor([0.0])
    assert reach_targets(v, mask, out, h).tolist()[0] == pytest.approx([0.3, 1.0, 0.4, 0.0])
    assert reach_targets(v, mask, out, h, lam=1.0).tolist()[0] == pytest.approx([1.0, 1.0, 0.0, 0.0])
    # λ = 0.5: G_2 = max(0, .5·.4 + .5·0) = .2; G_1 = 1; G_0 = max(0, .5·.3 + .5·1) = .65
    assert reach_targets(v, mask, out, h, lam=0.5).tolist()[0] == pytest.approx([0.65, 1.0, 0.2, 0.0])
    assert reach_targets(v, mask, out, h, gamma=0.5).tolist()[0] == pytest.approx([0.15, 1.0, 0.2, 0.0])
    # a label is a lower bound: it never lowers a target below the bootstrapped value
    assert torch.all(reach_targets(v, mask, out, h) >= torch.tensor([[0.3, 0.9, 0.4, 0.0]]))


def test_reach_rejects_bad_labels():
    v, mask, out = torch.rand(2, 3), torch.ones(2, 3), torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="row 1 step 2"):
        reach_targets(v, mask, out, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.5]]))
    with pytest.raises(ValueError, match="labels"):
        reach_targets(v, mask, out, torch.zeros(2, 4))
