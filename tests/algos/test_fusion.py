"""Reward fusion modes against loop references and hand-worked values; potential-based shaping."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlloop.algos import (
    fusion_stats,
    outcome_fusion,
    place_on_last_token,
    place_response_rewards,
    step_fusion,
    token_fusion,
    value_before_answer_step,
)

from . import reference as ref

torch.set_num_threads(1)
SETTINGS = settings(max_examples=25, deadline=None)
T64 = torch.float64
EPS = 1e-6


def t(x, dtype=T64):
    return torch.tensor(x, dtype=dtype)


def close(x, expected, atol=1e-9):
    torch.testing.assert_close(
        torch.as_tensor(x, dtype=T64), torch.as_tensor(expected, dtype=T64), atol=atol, rtol=1e-7
    )


# ------------------------------------------------------------ a random step-structured batch
@st.composite
def step_batches(draw, max_rows=6):
    """Rows = prompt tokens, then K steps of 1-3 tokens each (the last may be unterminated), then padding."""
    B = draw(st.integers(1, max_rows))
    rng = random.Random(draw(st.integers(0, 2**31 - 1)))
    num_groups = draw(st.integers(1, B))
    gids = [rng.randrange(num_groups) for _ in range(B)]
    layouts = []
    for _ in range(B):
        prompt = draw(st.integers(0, 2))
        seg_lens = draw(st.lists(st.integers(1, 3), min_size=0, max_size=4))
        trailing = draw(st.booleans()) and bool(seg_lens)  # response ends without a step end
        layouts.append((prompt, seg_lens, trailing))
    T = max(1, max(p + sum(s) for p, s, _ in layouts) + draw(st.integers(0, 2)))
    K = max(1, max(len(s) for _, s, _ in layouts))
    mask = [[0] * T for _ in range(B)]
    pos = [[0] * K for _ in range(B)]
    smask = [[0] * K for _ in range(B)]
    for b, (p, segs, trailing) in enumerate(layouts):
        end = p
        for k, n in enumerate(segs):
            for i in range(end, end + n):
                mask[b][i] = 1
            end += n
            if not (trailing and k == len(segs) - 1):
                pos[b][k], smask[b][k] = end - 1, 1
    values = [[rng.random() for _ in range(K)] for _ in range(B)]
    outcome = [float(rng.random() < 0.5) for _ in range(B)]
    prompt_value = [rng.random() for _ in range(B)]
    return dict(
        outcome=outcome, values=values, pos=pos, smask=smask, mask=mask, gids=gids, prompt_value=prompt_value
    )


def fuse(d, *, w_rule, w_prm, gamma, process, norm, use_prompt_value, whiten=False, metrics=None):
    return step_fusion(
        t(d["outcome"]), t(d["values"]), t(d["pos"], torch.long), t(d["smask"]), t(d["mask"]), t(d["gids"], torch.long),
        w_rule=w_rule, w_prm=w_prm, gamma=gamma, process=process, norm=norm,
        prompt_value=t(d["prompt_value"]) if use_prompt_value else None, eps=EPS, whiten=whiten, metrics=metrics,
    )  # fmt: skip


@SETTINGS
@given(
    step_batches(),
    st.sampled_from(["value", "shaping"]),
    st.sampled_from(["group", "batch", "none"]),
    st.sampled_from([1.0, 0.8]),
    st.booleans(),
    st.booleans(),
)
def test_step_fusion_matches_reference(d, process, norm, gamma, use_prompt_value, whiten):
    adv, ret = fuse(
        d, w_rule=0.7, w_prm=0.3, gamma=gamma, process=process, norm=norm, use_prompt_value=use_prompt_value,
        whiten=whiten,
    )  # fmt: skip
    exp_adv, exp_ret = ref.step_fusion(
        d["outcome"], d["values"], d["pos"], d["smask"], d["mask"], d["gids"], 0.7, 0.3, gamma, process, norm,
        d["prompt_value"] if use_prompt_value else None, EPS, whiten,
    )  # fmt: skip
    close(ret, exp_ret, atol=1e-7)
    close(adv, exp_adv, atol=1e-6)


@SETTINGS
@given(
    step_batches(),
    st.sampled_from(["group", "batch", "none"]),
    st.sampled_from([1.0, 0.9, 0.5]),
    st.booleans(),
)
def test_potential_shaping_changes_returns_only_by_a_start_state_constant(d, norm, gamma, use_prompt_value):
    """A finite MDP: states are (prompt, prefix of step choices), Phi(state) fixed per state. Trajectories
    sharing a prompt share the start state. The shaped process return from token t in step j must be
    -Phi(state before step j) (times the normaliser's 1/std), whatever happens afterwards -- in particular
    the return of the whole trajectory changes by a constant that depends only on the start state."""
    rng = random.Random(sum(map(sum, d["mask"])) + len(d["gids"]))
    phi: dict[tuple, float] = {}
    choices = [[rng.randrange(2) for _ in r] for r in d["values"]]  # two actions per step
    prompt_value, values = [], []
    for b, g in enumerate(d["gids"]):
        prompt_value.append(phi.setdefault((g,), rng.random()))
        values.append(
            [phi.setdefault((g, *choices[b][: k + 1]), rng.random()) for k in range(len(choices[b]))]
        )
    d = {**d, "values": values, "prompt_value": prompt_value}
    kw = dict(gamma=gamma, process="shaping", norm=norm, use_prompt_value=use_prompt_value)
    _, shaped = fuse(d, w_rule=1.0, w_prm=1.0, **kw)
    _, plain = fuse(d, w_rule=1.0, w_prm=0.0, **kw)
    diff = shaped - plain

    first_diff = {}
    for b, row in enumerate(d["mask"]):
        ts = [i for i, m in enumerate(row) if m]
        if not ts:
            continue
        start = prompt_value[b] if use_prompt_value else 0.0
        first_diff.setdefault(d["gids"][b], []).append((float(diff[b, ts[0]]), start))
        if norm == "none":
            # exactly -Phi of the state at the start of each token's step
            ends = [d["pos"][b][k] for k, m in enumerate(d["smask"][b]) if m]
            for i in ts:
                j = sum(1 for e in ends if e < i)
                phi_j = start if j == 0 else values[b][j - 1]
                assert float(diff[b, i]) == pytest.approx(-phi_j, abs=1e-9)
    for pairs in first_diff.values():  # same start state (same prompt) -> same change of return
        assert max(p[0] for p in pairs) - min(p[0] for p in pairs) < 1e-9
        if norm == "none":
            assert pairs[0][0] == pytest.approx(-pairs[0][1], abs=1e-9)


def test_raw_values_are_not_a_start_state_constant():
    # Same start, one trajectory has one more step with V > 0: "value" mode rewards the longer one more.
    mask = [[1, 1, 0], [1, 1, 1]]
    d = dict(outcome=[1.0, 1.0], values=[[0.5, 0.9, 0.0], [0.5, 0.9, 0.9]], pos=[[0, 1, 0], [0, 1, 2]],
             smask=[[1, 1, 0], [1, 1, 1]], mask=mask, gids=[0, 0], prompt_value=[0.3, 0.3])  # fmt: skip
    kw = dict(gamma=1.0, norm="none", use_prompt_value=True)
    _, value_ret = fuse(d, w_rule=1.0, w_prm=1.0, process="value", **kw)
    _, shaped_ret = fuse(d, w_rule=1.0, w_prm=1.0, process="shaping", **kw)
    assert float(value_ret[1, 0] - value_ret[0, 0]) == pytest.approx(0.9)
    assert float(shaped_ret[1, 0] - shaped_ret[0, 0]) == pytest.approx(0.0)


def test_step_fusion_hand_worked():
    # prompt tokens 0, 1; response 2..4; steps end at 2 and 4; V = (0.6, 0.9); outcome 1; Phi_0 = 0.5
    d = dict(outcome=[1.0], values=[[0.6, 0.9]], pos=[[2, 4]], smask=[[1, 1]], mask=[[0, 0, 1, 1, 1]], gids=[0],
             prompt_value=[0.5])  # fmt: skip
    kw = dict(w_rule=1.0, w_prm=1.0, norm="none", use_prompt_value=True)
    # value: rewards 0.6 @2, 0.9 @4, outcome 1 @4 -> returns 2.5, 1.9, 1.9
    _, ret = fuse(d, gamma=1.0, process="value", **kw)
    close(ret, [[0, 0, 2.5, 1.9, 1.9]])
    # shaping, gamma 1: F0 = 0.6 - 0.5 = 0.1 @2, F1 = 0 - 0.6 @4 (terminal Phi = 0) -> 0.5, 0.4, 0.4
    _, ret = fuse(d, gamma=1.0, process="shaping", **kw)
    close(ret, [[0, 0, 0.5, 0.4, 0.4]])
    # shaping, gamma 0.5 (discount once per step): F0 = 0.3 - 0.5 = -0.2; G(4) = 1 - 0.6 = 0.4 = G(3);
    # G(2) = -0.2 + 0.5 * 0.4 = 0.0 = (outcome-only return 0.5) - Phi_0
    _, ret = fuse(d, gamma=0.5, process="shaping", **kw)
    close(ret, [[0, 0, 0.0, 0.4, 0.4]])


def test_step_token_rewards_hand_worked():
    """fusion=step under gae: raw (unnormalised) process rewards at the step ends plus the outcome on the
    last token; with gamma 1 their sum equals step_fusion's return at the first response token."""
    from rlloop.algos.fusion import step_token_rewards

    t = torch.tensor
    args = (t([1.0]), t([[0.6, 0.9]]), t([[2, 4]]), t([[1, 1]]), t([[0, 0, 1, 1, 1]]), t([0]))
    # shaping: F0 = 0.6 - 0.5 = 0.1 @2, F1 = 0 - 0.6 @4 (terminal Phi = 0); w_rule 0.8 * outcome @4
    r = step_token_rewards(*args, w_rule=0.8, w_prm=0.5, process="shaping", prompt_value=t([0.5]))
    close(r, [[0, 0, 0.05, 0, 0.8 - 0.3]], atol=1e-6)
    r = step_token_rewards(*args, w_rule=1.0, w_prm=1.0, process="value")
    close(r, [[0, 0, 0.6, 0, 1.9]], atol=1e-6)
    with pytest.raises(ValueError, match="step_positions"):
        step_token_rewards(*args[:2], t([[2, 1]]), *args[3:], w_rule=1.0, w_prm=1.0)


def test_step_fusion_group_normalisation_hand_worked():
    # two rows of one group, one token each, one step each: returns = w_rule * z(outcome) + w_prm * z(V)
    d = dict(outcome=[1.0, 0.0], values=[[0.8], [0.4]], pos=[[0], [0]], smask=[[1], [1]], mask=[[1], [1]],
             gids=[5, 5], prompt_value=[0.0, 0.0])  # fmt: skip
    metrics: dict[str, float] = {}
    adv, ret = fuse(d, w_rule=1.0, w_prm=0.5, gamma=1.0, process="value", norm="group", use_prompt_value=False,
                    metrics=metrics)  # fmt: skip
    # outcome: mean 0.5, std sqrt(0.5); values: mean 0.6, std sqrt(0.08); (x - mean) / (std + eps)
    r = 0.5 / (math.sqrt(0.5) + EPS) + 0.5 * 0.2 / (math.sqrt(0.08) + EPS)
    close(ret, [[r], [-r]])
    close(adv, ret)
    assert metrics["fusion/prm_value_sum/corr_outcome"] == pytest.approx(1.0)
    assert metrics["fusion/outcome/mean"] == pytest.approx(0.5)


def test_outcome_fusion_hand_worked():
    outcome, v = t([1.0, 0.0]), t([0.5, 0.8])
    metrics: dict[str, float] = {}
    close(outcome_fusion(outcome, v, w_rule=0.8, w_prm=0.2, metrics=metrics), [0.8, 0.2 * math.log(4)])
    close(outcome_fusion(outcome, v, w_rule=0.8, w_prm=0.2, g="sigmoid"), [0.9, 0.16])
    close(outcome_fusion(outcome, None, w_rule=1.0, w_prm=0.0), [1.0, 0.0])
    assert metrics["fusion/prm/mean"] == pytest.approx(math.log(4) / 2)
    assert metrics["fusion/prm/corr_outcome"] == pytest.approx(-1.0)
    # V = 0 or 1 stays finite (clamped logit)
    assert torch.isfinite(outcome_fusion(outcome, t([0.0, 1.0]), w_rule=1.0, w_prm=1.0)).all()


@SETTINGS
@given(
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=8),
    st.sampled_from(["logit", "sigmoid"]),
)
def test_outcome_fusion_matches_reference(pairs, g):
    outcome, v = [p[0] for p in pairs], [p[1] for p in pairs]
    out = outcome_fusion(t(outcome), t(v), w_rule=0.8, w_prm=0.2, g=g)
    close(
        out, [0.8 * o + 0.2 * (ref.logit(x) if g == "logit" else x) for o, x in zip(outcome, v, strict=True)]
    )


def test_value_before_answer_step():
    sv, sm = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0], [0.6, 0.7, 0.8]]), t([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    # answer in step 2 -> V_1; no answer step (-1) -> last valid V; answer in step 0 -> prompt value / 0.5
    close(value_before_answer_step(sv, sm, torch.tensor([2, -1, 0])), [0.2, 0.5, 0.5])
    close(value_before_answer_step(sv, sm, torch.tensor([2, -1, 0]), t([0.0, 0.0, 0.9])), [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match=r"answer_step\[1\]=2 but row 1 has only 2 steps"):
        value_before_answer_step(sv, sm, torch.tensor([0, 2, 0]))


def test_token_fusion_hand_worked_and_reference():
    out = token_fusion(t([1.0]), t([[0.1, 0.2, 0.3, 9.0]]), t([[1, 1, 1, 0]]), w_rule=1.0, w_token=0.5)
    close(out, [[0.05, 0.1, 1.15, 0.0]])
    rng = random.Random(0)
    for _ in range(20):
        B, T = rng.randint(1, 4), rng.randint(1, 5)
        mask = [[int(rng.random() < 0.7) for _ in range(T)] for _ in range(B)]
        tr = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
        o = [rng.random() for _ in range(B)]
        got = token_fusion(t(o), t(tr), t(mask), w_rule=0.6, w_token=0.4)
        exp = [[0.4 * tr[b][i] * mask[b][i] for i in range(T)] for b in range(B)]
        for b in range(B):
            ts = [i for i in range(T) if mask[b][i]]
            if ts:
                exp[b][ts[-1]] += 0.6 * o[b]
        close(got, exp)


def test_token_fusion_std_norm():
    tr, mask = t([[1.0, 3.0], [2.0, 0.0]]), t([[1, 1], [1, 0]])
    out = token_fusion(t([0.0, 0.0]), tr, mask, w_rule=1.0, w_token=1.0, token_norm="std")
    close(out, tr * mask / 1.0)  # values 1, 3, 2: unbiased std 1


def test_place_on_last_token():
    out = place_on_last_token(t([2.0, 3.0, 4.0]), t([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]]))
    close(out, [[0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 4, 0]])


def test_fusion_stats_matches_reference():
    rng = random.Random(1)
    o = [float(rng.random() < 0.5) for _ in range(9)]
    c = [rng.gauss(0, 1) + x for x in o]
    s = fusion_stats({"prm": t(c)}, t(o))
    mu, sd = ref.mean_std(c)
    assert s["prm/mean"] == pytest.approx(mu) and s["prm/std"] == pytest.approx(sd)
    assert s["prm/corr_outcome"] == pytest.approx(ref.pearson(c, o))
    assert math.isnan(fusion_stats({"c": t([1.0, 1.0])}, t([0.0, 1.0]))["c/corr_outcome"])


def test_fusion_bad_input_is_named():
    with pytest.raises(ValueError, match=r"prm_value has shape \(3,\), expected \(2,\)"):
        outcome_fusion(t([1.0, 0.0]), t([0.5, 0.5, 0.5]), w_rule=1.0, w_prm=1.0)
    with pytest.raises(ValueError, match=r"outcome contains 1 non-finite value.*nan"):
        outcome_fusion(t([1.0, float("nan")]), None, w_rule=1.0, w_prm=0.0)
    with pytest.raises(ValueError, match=r"reward\.w_prm=0\.2 but prm_value is None"):
        outcome_fusion(t([1.0]), None, w_rule=1.0, w_prm=0.2)
    with pytest.raises(ValueError, match=r"prm_value must be a probability.*1\.5 at row 0"):
        outcome_fusion(t([1.0]), t([1.5]), w_rule=1.0, w_prm=0.2)
    with pytest.raises(ValueError, match=r"reward\.prm\.g='tanh'"):
        outcome_fusion(t([1.0]), t([0.5]), w_rule=1.0, w_prm=0.2, g="tanh")
    d = dict(outcome=[1.0], values=[[0.6, 0.9]], pos=[[2, 4]], smask=[[1, 1]], mask=[[0, 0, 1, 1, 1]], gids=[0],
             prompt_value=[0.5])  # fmt: skip
    kw = dict(w_rule=1.0, w_prm=1.0, gamma=1.0, norm="none", use_prompt_value=False)
    with pytest.raises(ValueError, match=r"step_positions\[0, 0\]=1 is not a response token"):
        fuse({**d, "pos": [[1, 4]]}, process="value", **kw)
    with pytest.raises(ValueError, match=r"step_positions\[0, 1\]=7 is outside \[0, 5\)"):
        fuse({**d, "pos": [[2, 7]]}, process="value", **kw)
    with pytest.raises(ValueError, match=r"step_positions row 0 is not strictly increasing: \[4, 3\]"):
        fuse({**d, "pos": [[4, 3]]}, process="value", **kw)
    with pytest.raises(ValueError, match=r"step_mask row 0 is not a prefix"):
        fuse({**d, "smask": [[0, 1]]}, process="value", **kw)
    with pytest.raises(ValueError, match=r"step_values contains 1 non-finite value.*inf"):
        fuse({**d, "values": [[0.6, float("inf")]]}, process="value", **kw)
    with pytest.raises(ValueError, match=r"reward\.step_process='potential'"):
        fuse(d, process="potential", **kw)
    with pytest.raises(ValueError, match=r"step_positions has shape \(1, 3\), expected \(1, 2\)"):
        fuse({**d, "pos": [[2, 3, 4]]}, process="value", **kw)
    with pytest.raises(ValueError, match=r"token_rewards has shape \(1, 2\), expected \(2, T\)"):
        token_fusion(t([1.0, 0.0]), t([[0.0, 1.0]]), t([[1, 1]]), w_rule=1.0, w_token=1.0)


def test_place_response_rewards_hand_worked():
    # Row 0: prompt of 3 tokens, response of 2 -> response positions 3, 4. Row 1: prompt of 1, response
    # of 3 -> positions 1, 2, 3 (then right padding). Row 2: empty response.
    mask = t([[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    out = place_response_rewards([[0.5, -1.0], [1.0, 2.0, 3.0], []], mask)
    close(out, [[0, 0, 0, 0.5, -1.0], [0, 1, 2, 3, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"row 1: 2 token rewards for 3 response tokens"):
        place_response_rewards([[0.5, -1.0], [1.0, 2.0], []], mask)
    with pytest.raises(ValueError, match=r"expected \(2, T\)"):
        place_response_rewards([[0.5, -1.0], [1.0, 2.0, 3.0]], mask)
    with pytest.raises(ValueError, match=r"token_rewards contains 1 non-finite"):
        place_response_rewards([[0.5, float("nan")], [1.0, 2.0, 3.0], []], mask)


def test_min_fusion_hand_worked():
    """PURE's min-form credit on one group of two rows, worked by hand with temperature 1."""
    from rlloop.algos import min_fusion

    outcome = torch.tensor([1.0, 0.0])
    values = torch.tensor([[0.9, 0.6, 0.95], [0.5, 0.1, 0.0]])
    positions = torch.tensor([[1, 3, 5], [2, 5, 0]])
    step_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rmask = torch.ones(2, 6)
    groups = torch.tensor([7, 7])
    adv, ret = min_fusion(outcome, values, positions, step_mask, rmask, groups, w_rule=0.5, w_prm=1.0,
                          temperature=1.0)  # fmt: skip

    # row 0: r = 2V - 1 = [0.8, 0.2, 0.9]; softmin weights exp(-r) / sum
    e0 = [math.exp(-0.8), math.exp(-0.2), math.exp(-0.9)]
    w0 = [e / sum(e0) for e in e0]
    r0 = [w0[0] * 0.8, w0[1] * 0.2, w0[2] * 0.9]
    # row 1: r = [0.0, -0.8]
    e1 = [math.exp(0.0), math.exp(0.8)]
    w1 = [e / sum(e1) for e in e1]
    r1 = [w1[0] * 0.0, w1[1] * -0.8]
    # leave-one-out baselines: the other row's mean weighted reward per step
    b0, b1 = sum(r1) / 2, sum(r0) / 3
    # verifiable reward minus the other row's: +1 and -1, times w_rule at the last token
    tok0 = [0, r0[0] - b0, 0, r0[1] - b0, 0, r0[2] - b0 + 0.5 * 1]
    tok1 = [0, 0, r1[0] - b1, 0, 0, r1[1] - b1 + 0.5 * -1]
    want = torch.tensor([[sum(t[i:]) for i in range(6)] for t in (tok0, tok1)])
    assert torch.allclose(ret, want, atol=1e-6)
    assert torch.allclose(adv, want, atol=1e-6)


def test_min_fusion_weights_the_worst_step_at_low_temperature():
    """At temperature -> 0 a row's process return from its first token is its minimum step reward; a
    group of one has no baseline, and steps that pad a solution with liked steps add ~nothing."""
    from rlloop.algos import min_fusion

    outcome = torch.tensor([0.0, 0.0])
    values = torch.tensor([[0.9, 0.2, 0.9, 0.9], [0.9, 0.2, 0.0, 0.0]])
    positions = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 0]])
    step_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rmask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    _, ret = min_fusion(outcome, values, positions, step_mask, rmask, torch.tensor([0, 1]), w_rule=0.1, w_prm=1.0,
                        temperature=1e-3)  # fmt: skip
    assert ret[0, 0].item() == pytest.approx(-0.6, abs=1e-4)  # min r = 2 * 0.2 - 1
    assert ret[1, 0].item() == pytest.approx(-0.6, abs=1e-4)  # the two extra liked steps changed nothing
    assert ret[1, 2:].abs().sum() == 0  # padding stays 0
    with pytest.raises(ValueError, match="min_temperature"):
        min_fusion(outcome, values, positions, step_mask, rmask, torch.tensor([0, 1]), w_rule=0.1, w_prm=1.0,
                   temperature=0.0)  # fmt: skip


def test_first_error_fusion_hand_worked():
    """GRPO advantages; a wrong row's tokens before its first doubted step keep (1 - w_prm) of its blame."""
    from rlloop.algos import first_error_fusion

    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # row 0 right; row 1 wrong, doubts its step 1 (tokens 2..3); row 2 wrong, doubts nothing;
    # row 3 right but the PRM doubts step 0: right rows are never spared or blamed more
    values = torch.tensor([[0.9, 0.8], [0.9, 0.1], [0.8, 0.7], [0.2, 0.9]])
    positions = torch.tensor([[1, 5], [1, 5], [2, 5], [1, 5]])
    step_mask = torch.ones(4, 2)
    rmask = torch.ones(4, 6)
    groups = torch.tensor([0, 0, 0, 0])
    adv, ret = first_error_fusion(outcome, values, positions, step_mask, rmask, groups, w_prm=1.0)
    mean, std = 0.5, math.sqrt(1.0 / 3.0)  # unbiased std of [1, 0, 0, 1]
    hi, lo = (1 - mean) / (std + 1e-6), (0 - mean) / (std + 1e-6)
    want = torch.tensor(
        [
            [hi] * 6,
            [0.0, 0.0] + [lo] * 4,  # step 0 (tokens 0-1) spared, blame from step 1 on
            [lo] * 6,  # no doubted step: blamed whole
            [hi] * 6,
        ]
    )
    assert torch.allclose(adv, want, atol=1e-5) and torch.equal(adv, ret)
    half, _ = first_error_fusion(outcome, values, positions, step_mask, rmask, groups, w_prm=0.5)
    assert torch.allclose(half[1, :2], torch.tensor([0.5 * lo, 0.5 * lo]), atol=1e-5)
    grpo, _ = first_error_fusion(outcome, values, positions, step_mask, rmask, groups, w_prm=0.0)
    assert torch.allclose(grpo, torch.tensor([[hi] * 6, [lo] * 6, [lo] * 6, [hi] * 6]), atol=1e-5)
