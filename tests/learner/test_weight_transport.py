"""Weight transports (rlloop.distributed.transport): the bucket layout, shm files, the choice of
`cluster.weight_transport`; then, with Ray, every transport leaves the rollout workers with the learner's
weights, and a worker killed mid-run is restarted, the collective group formed again, and the next sync
reaches it (the lifecycle's own sync_weights / generate / restore code)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from rlloop.distributed.transport import (
    Endpoint,
    Layout,
    ShmPayload,
    TransportError,
    resolve_transport,
)

from .conftest import algo_cfg, learner_cfg

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.bias": rng.standard_normal(7).astype(np.float32),
        "scalar": np.array(2.5, dtype=np.float32),
        "steps": np.arange(3, dtype=np.int64),
    }


def test_layout_round_trip_without_copies():
    arrays = _arrays()
    layout = Layout.of(arrays)
    assert all(offset % 64 == 0 for *_, offset in layout.entries)
    buf = layout.pack(arrays)
    out = layout.unpack(buf)
    assert list(out) == list(arrays)
    for name, value in arrays.items():
        assert out[name].dtype == value.dtype and out[name].shape == value.shape
        np.testing.assert_array_equal(out[name], value)
        assert np.shares_memory(out[name], buf)  # views, not copies


def test_shm_files_are_written_once_mapped_and_cleaned(tmp_path, monkeypatch):
    import rlloop.distributed.transport as transport

    monkeypatch.setattr(transport, "SHM_DIR", str(tmp_path))
    sender, receiver = Endpoint(), Endpoint()
    arrays = _arrays()
    payloads = {v: sender.send("shm", arrays, v, 0) for v in (1, 2, 3)}
    assert isinstance(payloads[3], ShmPayload)
    out = receiver.receive(payloads[3])
    for name, value in arrays.items():
        np.testing.assert_array_equal(out[name], value)
    assert isinstance(out["a.weight"].base, np.memmap) or isinstance(out["a.weight"], np.memmap)
    assert not out["a.weight"].flags.writeable  # mapped read-only
    # two slots by version parity: 3 overwrote 1's file in place, 2's stays (a restarted worker may open it)
    assert payloads[3].path == payloads[1].path != payloads[2].path
    assert len(list(tmp_path.iterdir())) == 2
    np.testing.assert_array_equal(receiver.receive(payloads[2])["a.weight"], arrays["a.weight"])
    sender.close()
    assert not list(tmp_path.iterdir())
    assert receiver.receive(arrays) is arrays  # the object store's payload is the arrays themselves


def test_resolve_transport_and_its_errors():
    one = dict(sender_node="n0", receiver_nodes=["n0", "n0"])
    two = dict(sender_node="n0", receiver_nodes=["n0", "n1"])
    assert resolve_transport("auto", **one, gpus=False) == "object_store"
    assert resolve_transport("auto", **two, gpus=False) == "object_store"
    assert resolve_transport("auto", **one, gpus=True) == "cuda_ipc"
    assert resolve_transport("auto", **two, gpus=True) == "collective"
    assert resolve_transport("object_store", **two, gpus=False) == "object_store"
    with pytest.raises(TransportError, match="weight_transport=shm: receivers on nodes"):
        resolve_transport("shm", **two, gpus=False)
    with pytest.raises(TransportError, match="weight_transport=cuda_ipc needs GPU"):
        resolve_transport("cuda_ipc", **one, gpus=False)
    with pytest.raises(TransportError, match="weight_transport='nccl': unknown"):
        resolve_transport("nccl", **one, gpus=False)
    with pytest.raises(TransportError, match="cuda_ipc weight send: no CUDA"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        Endpoint().send("cuda_ipc", _arrays(), 1, 0)


# ---------------------------------------------------------------- with Ray: learner -> 2 rollout workers


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    from rlloop.config import ModelConfig
    from rlloop.models.builders import build_tiny

    cfg = ModelConfig(name="tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    return build_tiny(cfg, tmp_path_factory.mktemp("tiny_lm") / "model")


def _worker_weights(ray, worker) -> dict[str, np.ndarray]:
    return ray.get(worker.engine_state.remote(), timeout=60)


@pytest.mark.slow
def test_every_transport_syncs_and_a_restarted_worker_rejoins_the_collective_group(ray_cluster, tiny_lm):
    import ray

    from rlloop.distributed.lifecycle import Actors, Supervisor
    from rlloop.distributed.transport import CollectiveGroup
    from rlloop.learner.group import LearnerGroup
    from rlloop.rollout.worker import RolloutWorkerCore

    from .test_weight_sync import _prompts

    class Worker(RolloutWorkerCore):  # defined here, so Ray ships it by value
        def engine_state(self) -> dict[str, np.ndarray]:
            return {k: v.detach().numpy().copy() for k, v in self.engine.model.state_dict().items()}

    learner = LearnerGroup(
        tiny_lm, learner_cfg(world_size=1, zero_stage=0), algo_cfg(use_ref=False), temperature=1.0,
        train_batch_size=2, num_cpus_per_rank=0.2, timeout_s=300,
    )  # fmt: skip
    workers = [
        ray.remote(Worker).options(num_cpus=0.1, max_restarts=2).remote(tiny_lm, seed=i)
        for i in range(2)
    ]
    actors = Actors.__new__(Actors)  # the lifecycle's sync and restore code, without starting a whole run
    actors.cfg = SimpleNamespace(learner=SimpleNamespace(sync_bucket_mb=1e-3, sync_timeout_s=120.0))
    actors.supervisor = Supervisor(max_restarts=2, timeout_s=120)
    actors.learner, actors.workers = learner, workers
    actors.policy_version, actors.last_sync, actors.pending_sync = 0, None, None
    try:
        ray.get([w.__ray_ready__.remote() for w in workers], timeout=120)
        want = ray.get(learner.state_dict_ref(), timeout=60)

        def check(version: int) -> None:
            assert ray.get([w.get_policy_version.remote() for w in workers], timeout=60) == [version] * 2
            for w in workers:
                got = _worker_weights(ray, w)
                for name, value in want.items():
                    np.testing.assert_array_equal(got[name], value, err_msg=name)

        # every transport, one after the other, each a new version of the same weights
        for transport in ("object_store", "shm", "collective"):
            actors.weight_transport = transport
            actors.weight_group = CollectiveGroup("gloo", 60.0) if transport == "collective" else None
            metrics = actors.sync_weights()
            assert metrics["sync/buckets"] > 3  # tiny buckets: one per tensor
            check(actors.policy_version)
        generation = actors.weight_group.generation

        # worker 1 dies mid-run; generating restarts it and restores the current version (rank 0's copy)
        ray.kill(workers[1], no_restart=False)
        gen = {"n": 1, "max_new_tokens": 4, "temperature": 1.0}
        outs = list(actors.generate(_prompts(tiny_lm), seed=0, **gen))
        assert {ro.policy_version for out in outs for ro in out} == {actors.policy_version}
        assert actors.restarts == {"rollout worker 1": 1} and actors.weight_group.stale
        # the next sync forms the group again (a new generation) and reaches the new process
        actors.sync_weights()
        assert actors.weight_group.generation == generation + 1 and not actors.weight_group.stale
        check(actors.policy_version)
        outs = list(actors.generate(_prompts(tiny_lm), seed=0, **gen))
        assert {ro.policy_version for out in outs for ro in out} == {actors.policy_version}
    finally:
        learner.shutdown()
        for w in workers:
            ray.kill(w)
