"""Dense token-reward sources in the controller (no actors): config checks, where Q-RM / implicit-PRM
token rewards land in a Batch, and how `Trainer.score` fuses them (hand-worked numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from rlloop.algos.fusion import place_response_rewards, prime_advantages
from rlloop.batch import build_batch, group_index, implicit_prm_labels
from rlloop.config import register_configs
from rlloop.controller import Trainer
from rlloop.errors import ConfigError, RlloopError
from rlloop.types import Rollout
from rlloop.validate import validate_config
from tests.conftest import ROOT

register_configs()
torch.set_num_threads(1)


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _rollout(uid: str, prompt: list[int], response: list[int], correct: float) -> Rollout:
    return Rollout(
        uid=uid,
        group=uid.split("/")[0],
        prompt_ids=prompt,
        response_ids=response,
        rollout_logprobs=[-0.5] * len(response),
        step_ends=[],
        step_char_ends=[],
        text="x",
        prompt_text="p",
        finish_reason="stop",
        policy_version=0,
        outcome={"correct": correct},
    )


def _trainer(*overrides) -> Trainer:
    """A Trainer without actors: score() only reads the config."""
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = _compose(*overrides)
    validate_config(trainer.cfg)
    return trainer


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("preset", ["qrm", "prime"])
def test_presets_compose_and_validate(preset):
    cfg = _compose(f"reward={preset}")
    validate_config(cfg)
    assert cfg.reward.fusion == {"qrm": "token", "prime": "prime"}[preset]
    assert not cfg.reward.prm.enabled  # no PRM service started for a token source
    if preset == "prime":
        assert cfg.reward.implicit_prm.beta == 0.05 and cfg.reward.implicit_prm.online
    else:
        assert cfg.reward.token_norm == "std" and cfg.reward.qrm.enabled


@pytest.mark.parametrize(
    "overrides, culprit, why",
    [
        (["reward=prime", "reward.implicit_prm.beta=-0.05"], "reward.implicit_prm.beta", "must be > 0"),
        (["reward=prime", "reward.implicit_prm.beta=0"], "reward.implicit_prm.beta", "must be > 0"),
        (["reward=qrm", "reward.w_token=1.5"], "reward.w_token", r"in \[0, 1\]"),
        (["reward=qrm", "reward.w_token=-0.1"], "reward.w_token", r"in \[0, 1\]"),
        (["reward=rule", "reward.fusion=token"], "reward.fusion", "needs a token-reward source"),
        (["reward=tdrm", "reward.fusion=token"], "reward.fusion", "needs a token-reward source"),
        (["reward=rule", "reward.fusion=prime"], "reward.fusion", "implicit_prm.enabled=true"),
        (["reward=qrm", "reward.implicit_prm.enabled=true"], "reward.qrm.enabled", "one token-reward source"),
        (["reward=rule", "reward.w_token=0.5"], "reward.w_token", "no token-reward term"),
        (
            ["reward=tdrm", "reward.qrm.enabled=true"],
            "reward.qrm.enabled",
            "only used by reward.fusion=token",
        ),
        (["reward=rule", "reward.implicit_prm.enabled=true"], "reward.implicit_prm.enabled", "fusion=prime"),
        (["reward=qrm", "reward.qrm.path=/no/such/qrm"], "reward.qrm.path", "not a directory"),
        (["reward=qrm", "reward.token_norm=zscore"], "reward.token_norm", "choose none or std"),
        (["reward=prime", "reward.implicit_prm.lr=0"], "reward.implicit_prm.lr", "must be > 0"),
        (["reward=prime", "reward.implicit_prm.filter_low=0.9"], "reward.implicit_prm.filter_low", "<="),
        (["reward=prime", "reward.implicit_prm.path=/no/such/lm"], "reward.implicit_prm.path", "directory"),
        (["reward=rule", "reward.implicit_prm.prompt_filter=true"], "reward.implicit_prm.prompt_filter", ""),
    ],
)
def test_impossible_dense_reward_values_name_the_key(overrides, culprit, why):
    with pytest.raises(ConfigError, match=rf"config {culprit}=.*{why}"):
        validate_config(_compose(*overrides))


def test_qrm_path_without_a_token_head_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a plain LM folder, not a Q-RM
    with pytest.raises(ConfigError, match=r"reward\.qrm\.path=.*is not a Q-RM folder"):
        validate_config(_compose("reward=qrm", f"reward.qrm.path={tmp_path}"))


# ------------------------------------------------------------------------------ token rewards -> Batch


def test_qrm_scores_land_on_the_tokens_they_score():
    """The Q-RM returns one s_t per response token; in the Batch it must sit at that token's column
    (entry t belongs to token t), after each row's own prompt, never on padding."""
    rollouts = [_rollout("g/0", [1, 2, 3], [4, 5], 1.0), _rollout("g/1", [7], [8, 9, 10], 0.0)]
    batch = build_batch(rollouts, pad_id=0)
    per_token = {4: 0.4, 5: 0.5, 8: 0.8, 9: 0.9, 10: 1.0}  # a scorer whose s_t is a function of token t
    scores = place_response_rewards(
        [[per_token[t] for t in ro.response_ids] for ro in rollouts], torch.from_numpy(batch.response_mask)
    )
    np.testing.assert_allclose(scores.numpy(), [[0, 0, 0, 0.4, 0.5], [0, 0.8, 0.9, 1.0, 0]], atol=1e-7)
    for b in range(2):
        for col in np.flatnonzero(batch.response_mask[b]):
            assert scores[b, col] == pytest.approx(per_token[int(batch.input_ids[b, col])])


# ------------------------------------------------------------------------------ Trainer.score


def _two_rollouts():
    # one prompt group: row 0 answers right with 2 response tokens, row 1 wrong with 1 (T = 4)
    rollouts = [_rollout("g/0", [1, 2], [3, 4], 1.0), _rollout("g/1", [1, 2], [5], 0.0)]
    batch = build_batch(rollouts, pad_id=0)
    scores = torch.tensor([[0.0, 0.0, 0.5, -0.5], [0.0, 0.0, 1.0, 0.0]])
    return rollouts, batch, scores


def test_token_fusion_with_reinforce_pp_hand_worked():
    trainer = _trainer("reward=qrm", "algo=reinforce_pp", "reward.w_token=0.5", "reward.token_norm=none")
    rollouts, batch, scores = _two_rollouts()
    metrics = trainer.score(rollouts, batch, None, scores)
    # r = w_rule*outcome on the last token + w_token*s_t: row 0 [., ., 0.25, -0.25 + 1], row 1 [., ., 0.5, .]
    np.testing.assert_allclose(batch.token_rewards, [[0, 0, 0.25, 0.75], [0, 0, 0.5, 0]], atol=1e-6)
    # REINFORCE++: returns by reverse cumsum [1.0, 0.75] and [0.5]; whitened over the 3 response
    # tokens (mean 0.75, unbiased std 0.25) -> [1, 0] and [-1]
    np.testing.assert_allclose(batch.returns, [[0, 0, 1.0, 0.75], [0, 0, 0.5, 0]], atol=1e-6)
    np.testing.assert_allclose(batch.advantages, [[0, 0, 1, 0], [0, 0, -1, 0]], atol=1e-4)
    assert metrics["fusion/token_sum/mean"] == pytest.approx(0.5)  # row sums 0.0 and 1.0
    assert metrics["fusion/token_sum/corr_outcome"] == pytest.approx(-1.0)
    assert metrics["reward/total"] == pytest.approx(0.75)


def test_token_fusion_with_grpo_sees_row_sums():
    trainer = _trainer("reward=qrm", "algo=grpo", "reward.w_token=0.5", "reward.token_norm=none")
    rollouts, batch, scores = _two_rollouts()
    trainer.score(rollouts, batch, None, scores)
    # GRPO: row scores 1.0 and 0.5 -> z-scores +-1/sqrt(2) (unbiased std of two values)
    a = 1 / np.sqrt(2)
    np.testing.assert_allclose(batch.advantages, [[0, 0, a, a], [0, 0, -a, 0]], atol=1e-4)


def test_prime_fusion_is_prime_advantages_per_source():
    trainer = _trainer("reward=prime", "reward.w_token=0.5", "reward.w_rule=1.0")
    rollouts, batch, scores = _two_rollouts()
    metrics = trainer.score(rollouts, batch, None, scores)
    mask = torch.from_numpy(batch.response_mask)
    adv, ret = prime_advantages(
        torch.tensor([1.0, 0.0]), scores, mask, group_index(["g", "g"]), w_rule=1.0, w_process=0.5
    )
    np.testing.assert_allclose(batch.advantages, adv.numpy(), atol=1e-6)
    np.testing.assert_allclose(batch.returns, ret.numpy(), atol=1e-6)
    assert np.abs(batch.advantages).sum() > 0
    assert {"fusion/token_sum/mean", "fusion/token_sum/corr_outcome", "fusion/outcome/mean"} <= metrics.keys()
    assert metrics["reward/total"] == pytest.approx((1.0 + 0.5 * 0.0 + 0.0 + 0.5 * 1.0) / 2)


def test_token_fusion_without_scores_is_a_clear_error():
    trainer = _trainer("reward=qrm")
    rollouts, batch, _ = _two_rollouts()
    with pytest.raises(RlloopError, match="needs a token-reward source, which is not configured"):
        trainer.score(rollouts, batch, None, None)


def test_outcome_fusion_ignores_the_new_argument():
    """fusion=outcome is unchanged: the outcome on the last token, then GRPO."""
    trainer = _trainer("reward=rule")
    rollouts, batch, _ = _two_rollouts()
    trainer.score(rollouts, batch, None)
    np.testing.assert_allclose(batch.token_rewards, [[0, 0, 0, 1], [0, 0, 0, 0]], atol=1e-6)
    a = 1 / np.sqrt(2)
    np.testing.assert_allclose(batch.advantages, [[0, 0, a, a], [0, 0, -a, 0]], atol=1e-4)


def test_implicit_prm_labels_must_be_probabilities():
    rollouts = [_rollout("g/0", [1], [2], 1.0), _rollout("g/1", [1], [3], 2.5)]
    with pytest.raises(RlloopError, match=r"rollout g/1: verifier score 2\.5 is outside \[0, 1\]"):
        implicit_prm_labels(rollouts)
    assert implicit_prm_labels(rollouts[:1]).tolist() == [1.0]


def test_prime_prompt_filter_drops_solved_and_unsolved_groups():
    trainer = _trainer("reward=prime")  # prompt_filter on, [0.2, 0.8]
    outcomes = {"a": [1, 1, 1, 1], "b": [1, 0, 0, 0], "c": [0, 0, 0, 0], "d": [1, 1, 1, 0]}
    rollouts = [
        _rollout(f"{g}/{i}", [1], [2], float(o)) for g, os in outcomes.items() for i, o in enumerate(os)
    ]
    prm_out = [{"uid": ro.uid} for ro in rollouts]
    kept, kept_prm, stats = trainer._prime_filter(rollouts, prm_out)
    assert sorted({ro.group for ro in kept}) == ["b", "d"]  # accuracies 0.25 and 0.75
    assert [o["uid"] for o in kept_prm] == [ro.uid for ro in kept]
    assert stats["implicit_prm/filtered_frac"] == pytest.approx(0.5)
    off = _trainer("reward=prime", "reward.implicit_prm.prompt_filter=false")
    assert off._prime_filter(rollouts, None)[0] == rollouts


# ------------------------------------------------------------------------------ reward.w_format


def test_format_bonus_is_added_to_the_outcome():
    """reward.w_format adds w * format to the outcome: three rows of one group, right / boxed but wrong /
    no answer -> rewards 1.1, 0.1, 0.0 on the last tokens, group-normalised."""
    trainer = _trainer("reward=rule", "reward.w_format=0.1")
    rollouts = [_rollout("g/0", [1], [2], 1.0), _rollout("g/1", [1], [3], 0.0), _rollout("g/2", [1], [4], 0.0)]
    for ro, fmt in zip(rollouts, [1.0, 1.0, 0.0]):
        ro.outcome["format"] = fmt
    batch = build_batch(rollouts, pad_id=0)
    metrics = trainer.score(rollouts, batch, None)
    np.testing.assert_allclose(batch.token_rewards[:, -1], [1.1, 0.1, 0.0], atol=1e-6)
    assert metrics["reward/format_bonus"] == pytest.approx(0.2 / 3)
    r = np.array([1.1, 0.1, 0.0])
    np.testing.assert_allclose(batch.advantages[:, -1], (r - r.mean()) / (r.std(ddof=1) + 1e-6), atol=1e-4)


def test_format_bonus_without_a_format_score_names_the_sample():
    trainer = _trainer("reward=rule", "reward.w_format=0.1")
    rollouts, batch, _ = _two_rollouts()  # outcome holds `correct` only (as from a custom verifier)
    with pytest.raises(ConfigError, match=r"reward\.w_format > 0 .*sample g/0"):
        trainer.score(rollouts, batch, None)


def test_format_bonus_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match=r"config reward\.w_format=1\.5.*in \[0, 1\]"):
        validate_config(_compose("reward=rule", "reward.w_format=1.5"))
