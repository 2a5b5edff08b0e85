"""The RL loop with two PRM replicas: each rollout worker's share is scored as soon as it returns, the
online PRM trains on replica 0, the other replica follows its weights and version, and a resumed run
continues both."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from rlloop.config import register_configs
from rlloop.controller import Trainer
from rlloop.errors import ConfigError
from tests.conftest import FIXTURES, LENGTH_REWARD, ROOT, TINY_RUN

register_configs()


def _cfg(*extra):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(
            config_name="config",
            overrides=[
                *TINY_RUN,
                *LENGTH_REWARD,
                "learner.world_size=1",
                "trainer.call_timeout_s=120",
                "trainer.eval_before=false",
                *extra,
            ],
        )


@pytest.mark.slow
def test_two_replicas_online_prm_two_workers(tmp_path, monkeypatch):
    import ray

    monkeypatch.syspath_prepend(FIXTURES)
    cfg_args = [
        "reward=tdrm",
        "reward.fusion=step",
        "reward.w_prm=0.5",
        "reward.prm.online=true",
        "reward.prm.lr=1e-2",
        "reward.prm.num_replicas=2",
        "reward.prm.max_batch_tokens=512",
        "rollout.num_workers=2",
    ]
    cfg = _cfg(*cfg_args)
    trainer = Trainer(cfg, tmp_path)
    try:
        pool = trainer.prm_pool
        assert len(pool.actors) == 2 and trainer.prm is pool.actors[0]
        submits: list[int] = []
        submit = pool.submit
        monkeypatch.setattr(pool, "submit", lambda p, *a, **k: submits.append(len(p)) or submit(p, *a, **k))
        rows = [trainer.train_step() for _ in range(2)]
        k = cfg.rollout.prompts_per_step * cfg.rollout.n
        # one request per rollout worker, queued as that worker returned (not one after both)
        assert len(submits) == 4 and sum(submits) == 2 * k
        for step, r in enumerate(rows, start=1):
            assert r["prm/version"] == step
            assert r["time/prm_wait"] >= 0 and r["time/prm"] > 0
            assert r["prm/tokens"] > 0 and 0 <= r["prm/pad_frac"] < 1
            assert "fusion/prm_shaping_sum/mean" in r
        versions = ray.get([a.__ray_call__.remote(lambda s: s.version) for a in pool.actors], timeout=60)
        assert versions == [2, 2]
        w0, w1 = ray.get([a.state_dict_numpy.remote() for a in pool.actors], timeout=60)
        assert np.abs(w0["head.weight"]).max() > 0  # trained: the fresh head starts at exactly 0
        for name in w0:
            np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)
        # every rollout got its own step values back (gathered by rollout, not by position in a share)
        last = trainer._last_rollouts
        assert all(len(ro.step_values) == len(ro.step_ends) for ro in last)
        ckpt = trainer.save_checkpoint()
    finally:
        trainer.shutdown()
    # resumed: both replicas load the checkpointed PRM and continue its version
    resumed = Trainer(_cfg(*cfg_args, f"trainer.resume={ckpt}"), tmp_path)
    try:
        pool = resumed.prm_pool
        versions = ray.get([a.__ray_call__.remote(lambda s: s.version) for a in pool.actors], timeout=60)
        assert versions == [2, 2]
        for arrays in ray.get([a.state_dict_numpy.remote() for a in pool.actors], timeout=60):
            np.testing.assert_allclose(arrays["head.weight"], w0["head.weight"], atol=1e-7)
        assert resumed.train_step()["prm/version"] == 3
    finally:
        resumed.shutdown()


@pytest.mark.parametrize(
    "override, match",
    [
        ("reward.prm.num_replicas=0", "reward.prm.num_replicas=0"),
        ("reward.prm.max_batch_tokens=0", "reward.prm.max_batch_tokens=0"),
        ("reward.prm.device=tpu", "reward.prm.device='tpu'"),
        ("reward.prm.device=cuda", "needs cluster.prm.num_gpus > 0"),
    ],
)
def test_bad_prm_service_settings_name_the_key(override, match):
    from rlloop.validate import validate_config

    with pytest.raises(ConfigError, match=match.replace("[", r"\[")):
        validate_config(_cfg("reward=tdrm", override))
