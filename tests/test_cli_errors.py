"""Bad input fails before any actor starts, with one message naming the culprit and a non-zero exit."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf.errors import ConfigKeyError, ValidationError

from rlloop.config import register_configs
from rlloop.errors import ConfigError
from rlloop.validate import validate_config
from tests.conftest import ROOT

register_configs()


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_composes_and_validates():
    cfg = _compose()
    validate_config(cfg)
    assert cfg.model.name == "chain-small" and cfg.task.name == "chain" and cfg.algo.advantage == "grpo"
    assert cfg.learner.zero_stage == 0 and cfg.learner.world_size == 1  # the laptop demo: one rank
    assert not cfg.reward.prm.enabled  # no untrained PRM scoring every step of the demo


def test_a_pretrained_model_on_another_task_names_the_right_model():
    from rlloop.errors import ConfigError

    with pytest.raises(ConfigError, match="model=arith-small"):
        validate_config(_compose("task=arith"))
    validate_config(_compose("task=arith", "model=arith-small"))
    validate_config(_compose("task=chain-credit"))
    assert _compose("task=chain-credit").rollout.max_new_tokens == 160  # the preset reaches other groups


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("reward.fusion=bogus", "reward.fusion"),
        ("reward.min_temperature=0", "reward.min_temperature"),
        ("reward.prm.oracle=true", "reward.prm.oracle"),  # the rule preset has no PRM
    ],
)
def test_fusion_and_oracle_keys_are_checked(override, culprit):
    from rlloop.errors import ConfigError

    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        validate_config(_compose(override))
    validate_config(_compose("reward=tdrm", "reward.prm.oracle=true", "reward.fusion=min", "reward.w_prm=1"))


@pytest.mark.parametrize(
    "override, error, culprit",
    [
        ("algo.bogus_key=1", ConfigKeyError, "bogus_key"),
        ("learner.lr=fast", ValidationError, "lr"),
        ("rollout.n=many", ValidationError, "n"),
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(override, error, culprit):
    with pytest.raises(Exception) as info:
        _compose(override)
    assert culprit in str(info.value)


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("+algo.bogus_key=1", "algo.bogus_key"),
        ("+reward.prm.typo=1", "reward.prm.typo"),
        ("rollout.n=0", "rollout.n"),
        ("rollout.n=1", "rollout.n"),  # GRPO needs a group
        ("learner.lr=-1", "learner.lr"),
        ("reward.w_prm=1.5", "reward.w_prm"),
        ("algo.advantage=nope", "algo.advantage"),
        ("algo.policy_loss=nope", "algo.policy_loss"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("learner.zero_stage=4", "learner.zero_stage"),
        ("learner.malloc_mmap_threshold_mb=-1", "learner.malloc_mmap_threshold_mb"),
        ("trainer.total_steps=0", "trainer.total_steps"),
        ("logger=[console,tensorboard]", "logger"),
        ("reward.fusion=magic", "reward.fusion"),
    ],
)
def test_impossible_values_name_the_key(override, culprit):
    cfg = _compose(override)
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        validate_config(cfg)


# The CLI's exit code, one-line message and untouched run folder, for config, data, model and reward
# function errors, are checked by the table in tests/test_bad_inputs.py.
