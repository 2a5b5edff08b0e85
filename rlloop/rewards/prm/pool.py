"""Several PRM scoring replicas behind one submit/gather pair.

Each replica is a `PRMService` actor; its Ray mailbox is the request queue, so a caller submits work as it
becomes available (e.g. each rollout worker's share as soon as that worker returns) and gathers later:
scoring overlaps whatever the caller does in between. A request is split across the replicas in shares of
near-equal token count (`split_balanced`); gathering puts the results back in submission order.

Online TD mode keeps ONE trainer replica (index 0, the only one with an optimizer); after each of its
updates `broadcast` loads its weights into the others under the same version number, so every replica
scores with the same PRM. The pool keeps what a restarted replica needs (the trainer's settings, the
latest weights and version) and restores it itself when a `Supervisor` (rlloop.distributed.lifecycle)
awaits its calls; nothing calls back into the controller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlloop.rewards.prm.batching import split_balanced


@dataclass
class PendingScores:
    """A submitted request: per share, (replica, row indices of the request, ref, args to re-issue)."""

    size: int
    shares: list[tuple[int, list[int], Any, tuple]] = field(default_factory=list)


class PRMPool:
    """`actors`: PRMService handles (replica 0 is the trainer in online mode)."""

    def __init__(self, actors: Sequence[Any], supervisor: Any = None, timeout_s: float = 600.0) -> None:
        """supervisor: a rlloop.distributed.lifecycle.Supervisor that restarts a dead replica, which the
        pool then restores and re-issues its work to; None: a plain ray.get with `timeout_s`."""
        if not actors:
            raise ValueError("PRMPool needs at least one PRMService actor")
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self.supervisor = supervisor
        self.online_kwargs: dict[str, Any] | None = None  # the trainer replica's TDPRMTrainer settings
        self.weights_ref: Any = None  # the online PRM's latest weights (object-store ref)
        self.version = 0
        # how `broadcast` moves replica 0's weights to the others (rlloop.distributed.transport)
        self.transport = "object_store"
        self.group: Any = None  # the collective group of the replicas (transport collective)

    @classmethod
    def start(
        cls,
        num_replicas: int,
        model_path: str,
        *,
        num_cpus: float = 0.1,
        num_gpus: float = 0.0,
        max_restarts: int = 0,
        supervisor: Any = None,
        timeout_s: float = 600.0,
        actor_options: Sequence[dict[str, Any]] | None = None,
        **scorer_kwargs: Any,
    ) -> PRMPool:
        """Start `num_replicas` PRMService actors with the same PRMScorer arguments (not awaited).

        actor_options: per replica Ray options (resources and placement-group bundle, from
        rlloop.distributed.placement); they replace num_cpus/num_gpus.
        """
        from rlloop.rewards.prm.service import PRMService

        if num_replicas < 1:
            raise ValueError(f"reward.prm.num_replicas={num_replicas}: must be >= 1")
        options: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": max_restarts}
        if num_gpus:
            options["num_gpus"] = num_gpus  # Ray makes a GPU visible to an actor only when it asks for one
        per_replica = [
            options if actor_options is None else {**actor_options[i], "max_restarts": max_restarts}
            for i in range(num_replicas)
        ]
        actors = [PRMService.options(**o).remote(model_path, **scorer_kwargs) for o in per_replica]
        return cls(actors, supervisor, timeout_s)

    def name(self, i: int) -> str:
        """The replica's name in logs and restart counts ("PRM service" when there is one)."""
        return "PRM service" if len(self.actors) == 1 else f"PRM service {i}"

    def call(self, i: int, ref: Any, reissue: Callable[[Any], Any], what: str) -> Any:
        """Replica i's result of `ref`; under a supervisor a dead replica is restarted, restored
        (`restore`) and `reissue(actor)` runs the same work again."""
        if self.supervisor is None:
            from rlloop.distributed.ray_setup import get

            return get(ref, timeout=self.timeout_s, what=f"{self.name(i)}: {what}")
        return self.supervisor.call(
            self.name(i), lambda: self.actors[i], ref, reissue, what=what, restore=lambda: self.restore(i)
        )

    def set_transport(self, transport: str, group: Any = None) -> None:
        """Broadcast the online PRM's weights by `transport` (cluster.weight_transport, resolved for the
        replicas' nodes); `group`: an unformed CollectiveGroup for `collective`, formed on first use."""
        self.transport = transport
        self.group = group if transport == "collective" else None

    def restore(self, i: int) -> None:
        """A restarted replica reloads its initial weights; in online mode it gets the latest weights
        back, and the trainer replica (0) its TD trainer (whose optimizer state starts afresh)."""
        actor = self.actors[i]
        if self.group is not None:
            self.group.stale = True  # the new process joins the group's next generation
        if self.online_kwargs is not None and i == 0:
            self._get(actor.enable_online.remote(**self.online_kwargs), "PRM enable_online after restart")
        if self.weights_ref is not None:
            self._get(actor.load_state_numpy.remote(self.weights_ref, self.version), "PRM reload")

    def _get(self, refs: Any, what: str) -> Any:
        from rlloop.distributed.ray_setup import get

        timeout = self.supervisor.timeout_s if self.supervisor is not None else self.timeout_s
        return get(refs, timeout=timeout, what=what)

    # ----- scoring -------------------------------------------------------------------------------------

    def submit(
        self,
        prompt_texts: Sequence[str],
        response_texts: Sequence[str],
        step_char_ends: Sequence[Sequence[int]],
        weights: Sequence[float] | None = None,
    ) -> PendingScores:
        """Queue a scoring request on the replicas, split by `weights` (default: characters, a proxy for
        the PRM's tokens); returns at once."""
        n = len(prompt_texts)
        if not (len(response_texts) == len(step_char_ends) == n):
            raise ValueError(
                f"PRMPool.submit: {n} prompts, {len(response_texts)} responses, "
                f"{len(step_char_ends)} step lists"
            )
        if weights is None:
            weights = [len(p) + len(r) for p, r in zip(prompt_texts, response_texts, strict=True)]
        pending = PendingScores(n)
        for replica, rows in enumerate(split_balanced(weights, len(self.actors))):
            args = (
                [prompt_texts[i] for i in rows],
                [response_texts[i] for i in rows],
                [list(step_char_ends[i]) for i in rows],
            )
            ref = self.actors[replica].score_request.remote(*args)
            pending.shares.append((replica, rows, ref, args))
        return pending

    def gather(self, pending: PendingScores) -> tuple[list[dict], dict[str, float]]:
        """Results of a submitted request in its own row order, and what it cost: `seconds` (replica
        busy time, summed), `tokens`, `padded_tokens`, `batches`."""
        results: list[dict | None] = [None] * pending.size
        stats = {"seconds": 0.0, "tokens": 0.0, "padded_tokens": 0.0, "batches": 0.0}
        for replica, rows, ref, args in pending.shares:
            out = self.call(
                replica,
                ref,
                lambda actor, args=args: actor.score_request.remote(*args),
                f"score ({len(rows)} trajectories)",
            )
            if len(out["results"]) != len(rows):
                raise RuntimeError(
                    f"{self.name(replica)} returned {len(out['results'])} scores for {len(rows)} trajectories"
                )
            for i, res in zip(rows, out["results"], strict=True):
                results[i] = res
            for key in stats:
                stats[key] += float(out[key])
        return results, stats  # type: ignore[return-value]

    def score(
        self,
        prompt_texts: Sequence[str],
        response_texts: Sequence[str],
        step_char_ends: Sequence[Sequence[int]],
        weights: Sequence[float] | None = None,
    ) -> list[dict]:
        """submit + gather: `PRMScorer.score`'s results, spread over the replicas."""
        return self.gather(self.submit(prompt_texts, response_texts, step_char_ends, weights))[0]

    # ----- online mode: one trainer replica, the others follow its weights --------------------------

    def broadcast(self, weights_ref: Any, version: int) -> None:
        """Load the trainer replica's weights into every other replica as `version`, by the pool's
        transport: the object-store ref of `state_dict_numpy()` itself, or replica 0's payload of them
        (shm, cuda_ipc: written once; collective: broadcast in the replicas' group). A replica that
        reports another version fails the call; one that died gets `weights_ref` after its restart."""
        from rlloop.distributed.transport import CollectiveTicket

        receivers = [(i, a) for i, a in enumerate(self.actors) if i]
        if self.transport == "object_store":
            payload = weights_ref
        elif self.transport == "collective":
            if self.group.stale:
                self.group.form(self.actors[0], [a for _, a in receivers])
            payload = CollectiveTicket(self.group.generation)
        else:
            payload = self._get(self.actors[0].export_weights.remote(self.transport, version), "PRM weights out")
        refs = {i: a.load_state_numpy.remote(payload, version) for i, a in receivers}
        if self.transport == "collective":  # the receivers wait in the broadcast; replica 0 sends
            self._get(self.actors[0].export_weights.remote(self.transport, version), "PRM weights out")
        versions = {
            i: self.call(
                i, ref, lambda actor: actor.load_state_numpy.remote(weights_ref, version), "load weights"
            )
            for i, ref in refs.items()
        }
        wrong = {self.name(i): v for i, v in versions.items() if v != version}
        if wrong:
            raise RuntimeError(f"PRM weight broadcast: replicas report versions {wrong}, expected {version}")

    def enable_online(self, **trainer_kwargs: Any) -> None:
        """Make replica 0 the online TD trainer (kwargs of TDPRMTrainer: lr, td, gamma, n, lam, ema, ...)."""
        self.online_kwargs = dict(trainer_kwargs)
        self._get(self.actors[0].enable_online.remote(**self.online_kwargs), "PRM enable_online")

    def td_update(self, prompt_texts: list[str], texts: list[str], step_char_ends: list, outcomes: list[float]) -> Any:
        """Queue one TD step of the trainer replica on verified trajectories; returns its ref (see `updated`)."""
        return self.actors[0].td_update.remote(prompt_texts, texts, step_char_ends, outcomes)

    def updated(self, update: Any) -> dict[str, float]:
        """Metrics of a queued `td_update`; the other replicas then score with the new weights."""
        metrics = self._get(update, "PRM service td_update")
        self.version = int(metrics.get("prm/version", self.version))
        self.weights_ref = self.actors[0].state_dict_numpy.remote()
        if len(self.actors) > 1:
            self.broadcast(self.weights_ref, self.version)
        return metrics

    def set_version(self, version: int) -> None:
        """Resume: every replica loaded the checkpoint's PRM; they continue its version."""
        self.version = version
        self._get([a.load_state_numpy.remote({}, version) for a in self.actors], "PRM version (resume)")

    def save(self, path: str) -> None:
        """The trainer replica's PRM folder (backbone, value head, tokenizer)."""
        self._get(self.actors[0].save.remote(path), "PRM save")

    def kill(self) -> None:
        import ray

        if self.transport == "shm":
            try:  # the trainer replica's /dev/shm weight files
                ray.get(self.actors[0].weight_close.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - dead or hung: its files stay
                pass
        for actor in self.actors:
            ray.kill(actor)
