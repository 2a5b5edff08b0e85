"""algo=dpo|tgdpo compose and validate; a bad DPO key fails at start naming the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from rlloop.algos.dpo import guidance_source
from rlloop.config import register_configs
from rlloop.errors import ConfigError
from rlloop.validate import validate_config
from tests.conftest import ROOT

register_configs()


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_presets_compose_and_validate():
    dpo = _compose("algo=dpo")
    validate_config(dpo)
    assert dpo.algo.policy_loss == "dpo" and guidance_source(dpo.algo) is None
    tgdpo = _compose("algo=tgdpo")
    validate_config(tgdpo)
    assert tgdpo.algo.dpo.alpha == 0.5 and guidance_source(tgdpo.algo) == "implicit_prm"
    validate_config(_compose("algo=tgdpo", "algo.dpo.guidance=qrm"))
    validate_config(_compose("algo=tgdpo", "algo.dpo.guidance=prm", "reward=tdrm"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["algo=dpo", "algo.dpo.beta=0"], "algo.dpo.beta"),
        (["algo=dpo", "algo.dpo.pair_rule=best"], "algo.dpo.pair_rule"),
        (["algo=dpo", "algo.dpo.max_pairs_per_group=0"], "algo.dpo.max_pairs_per_group"),
        (["algo=dpo", "algo.kl_coef=0.1"], "algo.kl_coef"),
        (["algo=dpo", "algo.advantage=gae"], "algo.advantage"),
        (["algo=dpo", "rollout.n=1"], "rollout.n"),
        (["algo=dpo", "algo.dpo.pairs_path=/no/such/pairs.jsonl"], "algo.dpo.pairs_path"),
        (["algo=tgdpo", "algo.dpo.guidance=critic"], "algo.dpo.guidance"),
        (["algo=tgdpo", "algo.dpo.alpha=-1"], "algo.dpo.alpha"),
        (["algo=tgdpo", "reward=qrm"], "reward.qrm.enabled"),
        (["algo=tgdpo", "algo.dpo.guidance=prm"], "algo.dpo.guidance"),  # the PRM is off (reward=rule)
    ],
)
def test_bad_dpo_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(_compose(*overrides))


def test_offline_prm_guidance_and_async_are_refused(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "1 + 1 =", "chosen": "2", "rejected": "3"}\n')
    with pytest.raises(ConfigError, match="algo.dpo.guidance"):
        validate_config(
            _compose("algo=tgdpo", "algo.dpo.guidance=prm", "reward=tdrm", f"algo.dpo.pairs_path={pairs}")
        )
    with pytest.raises(ConfigError, match="trainer.async_mode"):
        validate_config(_compose("algo=dpo", f"algo.dpo.pairs_path={pairs}", "trainer.async_mode=one_step"))
    validate_config(_compose("algo=dpo", f"algo.dpo.pairs_path={pairs}"))
