"""What every rlloop Ray role shares: a lazily built actor class, `ping`, `peak_rss_gb`, weight loading.

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


class ModelActorCore(ActorCore):
    """A role around one torch module `self.model` whose weights carry a version `self.version`."""

    model: Any
    version: int

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """The model's state dict as float32 numpy arrays (numpy has no bfloat16)."""
        import torch

        return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in self.model.state_dict().items()}

    def load_state_numpy(self, named_arrays: dict[str, np.ndarray], version: int | None = None) -> int:
        """Load (a subset of) `state_dict_numpy()` names; returns the new version (`version`, or +1)."""
        import torch

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
