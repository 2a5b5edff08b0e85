"""What every rlloop Ray role shares: a lazily built actor class, `ping`, `peak_rss_gb`, weight loading,
and its end of the weight transports (`weight_endpoint`, `weight_join`: rlloop.distributed.transport).

Each role is a plain class, testable without Ray (`RolloutWorkerCore`, `PRMScorer`, ...); its module
exposes the Ray actor under another name, built on first access so that importing the module never
imports Ray:

    class PRMScorer(ActorCore): ...
    __getattr__ = lazy_actors(__name__, PRMService=PRMScorer)   # rlloop.rewards.prm.service.PRMService

`ModelActorCore` adds the float32 numpy state transfer of roles that hold one `self.model` and a
`self.version` (PRM, Q-RM, implicit PRM): the controller ships weights through the object store as numpy
arrays (zero-copy there, unlike torch tensors).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np


class ActorCore:
    """`ping` (a cheap liveness call) and `peak_rss_gb` (the controller's `mem/<role>_rss_gb`)."""

    def ping(self) -> bool:
        return True

    def peak_rss_gb(self) -> float:
        """This process's peak RSS in GiB."""
        from rlloop.distributed.procmem import peak_rss_gb

        return peak_rss_gb()

    # ----- weight transport endpoint (rlloop.distributed.transport): every role may send or receive buckets

    @property
    def weight_endpoint(self) -> Any:
        if getattr(self, "_weight_endpoint", None) is None:
            from rlloop.distributed.transport import Endpoint

            self._weight_endpoint = Endpoint()
        return self._weight_endpoint

    def weight_node_ip(self) -> str:
        """This actor's node address as Ray registered it (the collective group's store host)."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node["NodeID"] == node_id:
                return node["NodeManagerAddress"]
        return ray.util.get_node_ip_address()

    def weight_node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def weight_free_port(self) -> int:
        from rlloop.distributed.transport import free_port

        return free_port()

    def weight_join(self, spec: Any, rank: int) -> int:
        """Join a collective weight group (`rlloop.distributed.transport.CollectiveGroup.form`)."""
        return self.weight_endpoint.join(spec, rank)

    def weight_close(self) -> None:
        """Delete the /dev/shm files this actor wrote as a sender (called before the actor is killed)."""
        if getattr(self, "_weight_endpoint", None) is not None:
            self._weight_endpoint.close()


class ModelActorCore(ActorCore):
    """A role around one torch module `self.model` whose weights carry a version `self.version`."""

    model: Any
    version: int

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """The model's state dict as float32 numpy arrays (numpy has no bfloat16)."""
        import torch

        return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in self.model.state_dict().items()}

    def export_weights(self, transport: str, version: int) -> Any:
        """`state_dict_numpy()` as a payload of `transport` for the other replicas (the PRM's online
        broadcast: one bucket, version `version`)."""
        return self.weight_endpoint.send(transport, self.state_dict_numpy(), version, 0)

    def load_state_numpy(self, named_arrays: Any, version: int | None = None) -> int:
        """Load (a subset of) `state_dict_numpy()` names — the arrays or a transport's payload of them;
        returns the new version (`version`, or +1)."""
        import torch

        named_arrays = self.weight_endpoint.receive(named_arrays)
        who = f"{type(self).__name__}.load_state_numpy"
        state = self.model.state_dict()
        unknown = [k for k in named_arrays if k not in state]
        if unknown:
            raise KeyError(f"{who}: names not in the model: {unknown[:5]}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")  # Ray's object store is read-only
            tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in named_arrays.items()}
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(state[k].shape):
                raise ValueError(f"{who}: {k} has shape {tuple(t.shape)}, expected {tuple(state[k].shape)}")
        self.model.load_state_dict(tensors, strict=False)
        self.version = self.version + 1 if version is None else int(version)
        return self.version


def lazy_actors(module: str, **cores: type) -> Callable[[str], Any]:
    """A module `__getattr__` giving `ray.remote(core)` under each name, built once on first access."""
    built: dict[str, Any] = {}

    def __getattr__(name: str) -> Any:
        if name not in cores:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if name not in built:
            import ray

            built[name] = ray.remote(cores[name])
        return built[name]

    return __getattr__
