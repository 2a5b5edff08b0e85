"""Several PRM scoring replicas behind one submit/gather pair.

Each replica is a `PRMService` actor; its Ray mailbox is the request queue, so a caller submits work as it
becomes available (e.g. each rollout worker's share as soon as that worker returns) and gathers later:
scoring overlaps whatever the caller does in between. A request is split across the replicas in shares of
near-equal token count (`split_balanced`); gathering puts the results back in submission order.

Online TD mode keeps ONE trainer replica (index 0, the only one with an optimizer); after each of its
updates `broadcast` loads its weights into the others under the same version number, so every replica
scores with the same PRM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlloop.rewards.prm.batching import split_balanced

# call(replica index, ref, reissue(actor) -> ref, what) -> result: how a result is awaited. The default
# is a plain ray.get with a timeout; the controller passes one that restarts a dead replica and re-issues.
Call = Callable[[int, Any, Callable[[Any], Any], str], Any]


@dataclass
class PendingScores:
    """A submitted request: per share, (replica, row indices of the request, ref, args to re-issue)."""

    size: int
    shares: list[tuple[int, list[int], Any, tuple]] = field(default_factory=list)


class PRMPool:
    """`actors`: PRMService handles (replica 0 is the trainer in online mode)."""

    def __init__(self, actors: Sequence[Any], call: Call | None = None, timeout_s: float = 600.0) -> None:
        if not actors:
            raise ValueError("PRMPool needs at least one PRMService actor")
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self.call: Call = call or self._plain_get

    @classmethod
    def start(
        cls,
        num_replicas: int,
        model_path: str,
        *,
        num_cpus: float = 0.1,
        num_gpus: float = 0.0,
        max_restarts: int = 0,
        call: Call | None = None,
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
        return cls(actors, call, timeout_s)

    def name(self, i: int) -> str:
        """The replica's name in logs and restart counts ("PRM service" when there is one)."""
        return "PRM service" if len(self.actors) == 1 else f"PRM service {i}"

    def _plain_get(self, i: int, ref: Any, reissue: Callable[[Any], Any], what: str) -> Any:
        from rlloop.distributed.ray_setup import get

        return get(ref, timeout=self.timeout_s, what=f"{self.name(i)}: {what}")

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
        """Load the trainer replica's weights (an object-store ref of `state_dict_numpy()`) into every
        other replica as `version`; a replica that reports another version fails the call."""
        refs = {i: a.load_state_numpy.remote(weights_ref, version) for i, a in enumerate(self.actors) if i}
        versions = {
            i: self.call(
                i, ref, lambda actor: actor.load_state_numpy.remote(weights_ref, version), "load weights"
            )
            for i, ref in refs.items()
        }
        wrong = {self.name(i): v for i, v in versions.items() if v != version}
        if wrong:
            raise RuntimeError(f"PRM weight broadcast: replicas report versions {wrong}, expected {version}")

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
