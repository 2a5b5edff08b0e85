"""cluster.* -> placement groups: the plan (pure), the resource check, real groups on a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlloop.distributed.placement import (
    Placement,
    ResourceError,
    check_resources,
    place,
    plan_placement,
)
from rlloop.errors import ConfigError
from rlloop.train import compose_config
from tests.conftest import TINY_RUN, run_cli

# the defaults these tests were written for (two ZeRO-2 ranks, the PRM service on); the embedded demo's
# defaults are one rank and no PRM since issue 20
OLD_DEFAULTS = ["learner=zero2", "reward=tdrm"]


def _cfg(*overrides: str):
    # one rollout worker (rollout=hf runs two by default) unless a test asks for more
    # the defaults the placement tests were written for: two ZeRO-2 ranks and the PRM service on
    return compose_config([*OLD_DEFAULTS, "model=tiny", "rollout.num_workers=1", *overrides])


# ---------------------------------------------------------------- the plan (no Ray)


def test_local_preset_keeps_the_cpu_resources_it_always_had():
    """cluster=local: learner ranks 0.5 CPU in their own group (as LearnerGroup made it), rollout workers
    0.25 (two of them, rollout=hf), PRM replicas 0.1, no GPU anywhere; 1.8 CPUs in all with the 2
    verifier workers."""
    plan = plan_placement(compose_config([*OLD_DEFAULTS, "model=tiny"]))
    assert plan.mode == "separate" and plan.strategy == "PACK"
    assert plan.groups == {
        "learner": [{"CPU": 0.5}, {"CPU": 0.5}],
        "rollout": [{"CPU": 0.25}, {"CPU": 0.25}],
        "prm": [{"CPU": 0.1}],
    }
    assert plan.total("CPU") == pytest.approx(1.8) and plan.total("GPU") == 0
    assert "prm" not in plan_placement(compose_config(["reward=rule"])).groups  # no PRM, no PRM group


def test_ppo_places_its_critic_ranks():
    """algo=ppo (advantage=gae) adds the critic's DeepSpeed ranks as a role of their own; on the 2-core
    local preset they fit beside the rest (1.9 CPUs), on GPUs each rank asks for a GPU (or shares one)."""
    plan = plan_placement(compose_config([*OLD_DEFAULTS, "model=tiny", "algo=ppo"]))
    assert plan.groups["critic"] == [{"CPU": 0.1}]
    assert plan.total("CPU") == pytest.approx(1.9)
    assert "critic" not in plan_placement(compose_config([*OLD_DEFAULTS, "model=tiny"])).groups  # grpo: no critic
    plan = plan_placement(_cfg("algo=ppo", "algo.critic.world_size=2", "cluster=gpu_separate"))
    assert plan.groups["critic"] == [{"CPU": 2.0, "GPU": 1.0}] * 2
    shared = plan_placement(
        _cfg(
            "algo=ppo",
            "cluster=gpu_colocated",
            "cluster.colocate=[learner,critic]",
            "cluster.learner.num_gpus=0.5",
            "cluster.critic.num_gpus=0.5",
            "learner.world_size=1",
        )
    )
    assert shared.where[("critic", 0)] == shared.where[("learner", 0)] == ("shared", 0)


def test_colocated_bundle_b_hosts_rank_b_and_worker_b_sharing_one_gpu():
    plan = plan_placement(_cfg("cluster=gpu_colocated", "learner.world_size=4", "rollout.num_workers=2"))
    assert plan.groups["shared"] == [{"CPU": 4.0, "GPU": 1.0}] * 2 + [{"CPU": 2.0, "GPU": 1.0}] * 2
    assert plan.where[("learner", 3)] == ("shared", 3) and plan.where[("rollout", 1)] == ("shared", 1)
    assert plan.groups["prm"] == [{"CPU": 2.0, "GPU": 1.0}]  # not in cluster.colocate: its own group
    assert plan.total("GPU") == 5
    # the PRM may join the shared GPUs too, if the shares still fit one GPU
    shared = plan_placement(
        _cfg(
            "cluster=gpu_colocated",
            "rollout.num_workers=1",
            "cluster.colocate=[learner,rollout,prm]",
            "cluster.learner.num_gpus=0.4",
            "cluster.rollout.num_gpus=0.4",
            "cluster.prm.num_gpus=0.2",
        )
    )
    # bundle 0: rank 0 + worker 0 + replica 0; bundle 1: rank 1 alone, still a whole GPU reserved
    assert shared.groups == {"shared": [{"CPU": 6.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]}


def test_separate_gpu_preset_gives_each_actor_its_own_gpus():
    plan = plan_placement(
        _cfg("cluster=gpu_separate", "learner.world_size=4", "rollout.num_workers=1", "cluster.rollout.num_gpus=2")
    )
    assert plan.groups["learner"] == [{"CPU": 2.0, "GPU": 1.0}] * 4
    assert plan.groups["rollout"] == [{"CPU": 2.0, "GPU": 2.0}]
    assert plan.total("GPU") == 7


def test_reward_prm_num_gpus_still_sets_the_prm_gpus():
    """The older key wins over cluster.prm.num_gpus, so configs written before the cluster group keep
    their meaning; the error names the key that asked."""
    plan = plan_placement(_cfg("reward.prm.num_gpus=0.5"))
    assert plan.groups["prm"] == [{"CPU": 0.1, "GPU": 0.5}]
    with pytest.raises(ResourceError, match=r"reward\.prm\.num_gpus=0\.5"):
        check_resources(plan, {"CPU": 2.0}, [{"CPU": 2.0}])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["cluster.placement=hybrid"], "cluster.placement='hybrid'"),
        (["cluster.strategy=pack"], "cluster.strategy='pack'"),
        (["cluster.placement=colocated", "cluster.colocate=[learner,ref]"], "unknown role 'ref'"),
        (
            ["cluster=gpu_colocated", "cluster.rollout.num_gpus=0.7"],
            r"cluster.rollout.num_gpus=0.7 = 1.2 GPU",
        ),
        (["cluster=gpu_colocated", "cluster.learner.num_gpus=2"], "cluster.learner.num_gpus=2: with"),
        (["cluster.rollout.num_gpus=1.5"], "cluster.rollout.num_gpus=1.5: more than one GPU"),
        (["cluster.learner.num_cpus=-1"], "cluster.learner.num_cpus=-1"),
        (["cluster.prm.num_cpus=0"], "cluster.prm.num_cpus=0 and cluster.prm.num_gpus=0"),
        (["reward.prm.device=cuda"], "needs cluster.prm.num_gpus > 0"),
    ],
)
def test_impossible_cluster_configs_name_the_key(overrides, match):
    from rlloop.validate import validate_config

    with pytest.raises(ConfigError, match=match.replace("[", r"\[")):
        validate_config(_cfg(*overrides))


def test_resource_check_names_roles_keys_and_numbers():
    gpu = plan_placement(_cfg("cluster.rollout.num_gpus=1"))
    with pytest.raises(ResourceError) as err:
        check_resources(gpu, {"CPU": 2.0}, [{"CPU": 2.0}])
    assert "asks for 1 GPU(s) but the Ray cluster has 0" in str(err.value)
    assert "rollout: 1 worker(s) x cluster.rollout.num_gpus=1" in str(err.value)
    cpu = plan_placement(_cfg("cluster.learner.num_cpus=4"))
    with pytest.raises(
        ResourceError,
        match=r"8.55 CPU\(s\) but the Ray cluster has 2: learner: 2 rank\(s\) x "
        r"cluster.learner.num_cpus=4",
    ):
        check_resources(cpu, {"CPU": 2.0}, [{"CPU": 2.0}])
    check_resources(cpu, {"CPU": 9.0}, [{"CPU": 9.0}])  # enough: no error


def test_multi_node_fit_bundle_by_bundle():
    """Two 4-GPU nodes hold 8 one-GPU ranks (bundles spread over nodes), but no 8-GPU rollout worker."""
    nodes = [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 32.0, "GPU": 4.0}]
    cluster = {"CPU": 64.0, "GPU": 8.0}
    ranks = plan_placement(
        _cfg("cluster=gpu_separate", "learner.world_size=6", "cluster.rollout.num_gpus=1", "reward=rule")
    )
    check_resources(ranks, cluster, nodes)
    wide = plan_placement(
        _cfg("cluster=gpu_separate", "learner.world_size=1", "cluster.rollout.num_gpus=6", "reward=rule")
    )
    with pytest.raises(ResourceError, match=r"fits on no single node .*cluster.rollout.num_gpus"):
        check_resources(wide, cluster, nodes)
    packed = plan_placement(
        _cfg("cluster=gpu_separate", "learner.world_size=6", "cluster.strategy=STRICT_PACK", "reward=rule")
    )
    with pytest.raises(ResourceError, match="STRICT_PACK puts the whole learner group"):
        check_resources(packed, cluster, nodes)


def test_preflight_refuses_a_gpu_on_this_machine_before_anything_starts(tmp_path):
    """`python -m rlloop.train cluster.rollout.num_gpus=1` on a machine without GPUs: one error line
    naming the key, exit 2, no run folder, no Ray."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) not in (None, "") or _has_gpu():
        pytest.skip("this machine has a GPU: asking for one is not an error here")
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY_RUN, "cluster.rollout.num_gpus=1", f"hydra.run.dir={run_dir}"], timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "cluster.rollout.num_gpus=1" in errors[0], proc.stderr[-3000:]
    assert "has 0" in errors[0]
    assert not run_dir.exists()


def _has_gpu() -> bool:
    from rlloop.distributed.placement import local_resources

    return local_resources(1)["GPU"] > 0


# ---------------------------------------------------------------- real placement groups


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from rlloop.distributed.ray_setup import init_ray

    started = not ray.is_initialized()
    init_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def test_gpu_ask_fails_on_the_joined_cluster_before_any_group_or_actor(ray_local):
    """The controller's check (after ray.init): the Ray cluster has no GPU, so nothing is reserved."""
    from ray.util import placement_group_table

    before = {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
    with pytest.raises(
        ResourceError,
        match=r"2 GPU\(s\) but the Ray cluster has 0: learner: 2 rank\(s\) x cluster.learner.num_gpus=1",
    ):
        place(_cfg("cluster.learner.num_gpus=1"))
    after = {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
    assert after == before


def test_colocated_groups_are_real_and_actors_land_in_their_bundles(ray_local):
    ray = ray_local
    placement = place(_cfg("cluster.placement=colocated", "learner.world_size=2"))
    try:
        assert set(placement.groups) == {"shared", "prm"}
        shared = placement.groups["shared"]
        assert ray.util.placement_group_table(shared)["bundles"] == {0: {"CPU": 0.75}, 1: {"CPU": 0.5}}

        @ray.remote
        class Probe:
            def where(self):
                ctx = ray.get_runtime_context()
                return ctx.get_placement_group_id(), ctx.get_assigned_resources()

        probes = {
            (role, i): Probe.options(**placement.options(role, i)).remote()
            for role, i in [("learner", 0), ("learner", 1), ("rollout", 0), ("prm", 0)]
        }
        got = {k: ray.get(p.where.remote(), timeout=60) for k, p in probes.items()}
        assert got[("learner", 0)][0] == got[("rollout", 0)][0] == shared.id.hex()
        assert got[("prm", 0)][0] == placement.groups["prm"].id.hex()
        assert got[("rollout", 0)][1] == {"CPU": 0.25} and got[("learner", 1)][1] == {"CPU": 0.5}
        for p in probes.values():
            ray.kill(p)
    finally:
        placement.remove()
    assert ray.util.placement_group_table(shared)["state"] == "REMOVED"


def test_a_group_that_cannot_be_placed_times_out_naming_it(ray_local):
    """Enough CPUs in total on paper (the check passes) but not free now: a clear timeout, not a hang."""
    ray = ray_local
    hog = ray.util.placement_group([{"CPU": ray.cluster_resources()["CPU"] - 0.2}])
    ray.get(hog.ready(), timeout=60)
    try:
        plan = plan_placement(_cfg("reward=rule"))
        with pytest.raises(ResourceError, match=r"placement group 'learner' .* not placed within 2 s"):
            Placement(plan, timeout_s=2)
    finally:
        ray.util.remove_placement_group(hog)


# ---------------------------------------------------------------- a real run


@pytest.mark.slow
def test_colocated_run_trains_one_step(tmp_path):
    """cluster.placement=colocated end to end on the CPU: 2 learner ranks and the rollout worker share
    bundles of one placement group."""
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "cluster.placement=colocated",
            "trainer.total_steps=1",
            "trainer.eval_before=false",
            "reward=rule",
            f"hydra.run.dir={out}",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "placement (colocated, PACK): shared: 2 x {'CPU': 0.75}" in proc.stdout + proc.stderr
    assert (out / "metrics.jsonl").read_text().count('"reward/total"') == 1


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU (Ray sees none on this machine)")
def test_gpu_colocated_run_shares_one_gpu_between_learner_and_rollout(tmp_path):
    """cluster=gpu_colocated on one GPU: learner rank 0 and rollout worker 0 each take half of GPU 0 in
    one bundle, the PRM is off; one GRPO step trains."""
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "cluster=gpu_colocated",
            "cluster.learner.num_cpus=1",
            "cluster.rollout.num_cpus=1",
            "learner.world_size=1",
            "rollout.num_workers=1",
            "reward=rule",
            "trainer.total_steps=1",
            "trainer.eval_before=false",
            f"hydra.run.dir={out}",
        ],
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "placement (colocated, PACK): shared: 1 x {'CPU': 2.0, 'GPU': 1.0}" in proc.stdout + proc.stderr
    assert (out / "metrics.jsonl").read_text().count('"reward/total"') == 1


@pytest.mark.slow
def test_learner_ranks_on_two_nodes_train_one_step(tmp_path):
    """Multi-node on one machine: two 1-CPU Ray nodes, cluster.strategy=STRICT_SPREAD puts the two
    learner ranks on different nodes (Ray places the group only so), and the DeepSpeed group across them
    trains a step. The run joins the cluster through cluster.address, as under ray job submit."""
    import subprocess
    import sys

    from rlloop.distributed.env import without_dist_env

    out = tmp_path / "run"
    args = [
        *TINY_RUN,
        "task.num_test=4",
        "reward=rule",
        "trainer.total_steps=1",
        "trainer.eval_before=false",
        "cluster.strategy=STRICT_SPREAD",
        "cluster.learner.num_cpus=0.4",
        "cluster.rollout.num_cpus=0.1",
        f"hydra.run.dir={out}",
    ]
    env = without_dist_env({**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("two_node_run.py")), *args],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "placement (separate, STRICT_SPREAD): learner: 2 x {'CPU': 0.4}" in proc.stdout + proc.stderr, log
    assert "learner group up: 2 ranks" in proc.stdout + proc.stderr, log
    assert (out / "metrics.jsonl").read_text().count('"reward/total"') == 1


def test_thread_oversubscription_is_named_with_the_keys_to_change():
    from rlloop.distributed.placement import thread_oversubscription

    default = compose_config([*OLD_DEFAULTS, "model=tiny"])
    assert thread_oversubscription(default, cores=2) == []  # the default: 2 x 1 rollout, 2 x 1 learner
    (msg,) = thread_oversubscription(compose_config(["rollout.num_threads=2"]), cores=2)
    assert "rollout.num_workers x rollout.num_threads = 2 x 2" in msg and "rollout.num_threads=1" in msg
    (msg,) = thread_oversubscription(_cfg("learner.num_threads=4"), cores=4)
    assert "learner.world_size x learner.num_threads = 2 x 4" in msg and "learner.num_threads=2" in msg
    assert thread_oversubscription(_cfg("rollout.num_threads=8"), cores=16) == []
    # GPU roles keep their threads off the CPU's critical path
    gpu = compose_config(["cluster=gpu_separate", "rollout.num_threads=8", "learner.num_threads=8"])
    assert thread_oversubscription(gpu, cores=2) == []
