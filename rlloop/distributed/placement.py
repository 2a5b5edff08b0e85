"""Where each role's actors run: the `cluster` config turned into Ray placement groups.

Roles and their actors: `learner` (one per DeepSpeed rank, learner.world_size), `rollout`
(rollout.num_workers), `prm` (reward.prm.num_replicas, when the PRM is on). Each actor asks for its role's
`cluster.<role>.num_cpus` / `num_gpus`.

- `separate`: one placement group per role, one bundle per actor ({CPU, GPU} of that actor). Rollout
  workers with their own GPUs receive weights over NCCL; the learner keeps its GPUs to itself.
- `colocated` ("hybrid", as verl's hybrid engine and OpenRLHF's colocate_all_models): the roles in
  `cluster.colocate` share ONE placement group; bundle b hosts actor b of every shared role, and each actor
  takes its role's fraction of the bundle's GPU (learner 0.5 + rollout 0.5 = one GPU per bundle). The
  other roles get groups of their own, as in `separate`.

`cluster.strategy` is Ray's: PACK fills a node before the next, SPREAD puts bundles on different nodes,
STRICT_* insists. Multi-node needs nothing else: Ray places bundles on whichever nodes fit them, and the
learner's rank 0 announces its own node's address to the others.

`plan_placement` is pure (config in, bundles out) and `check_resources` compares the plan with what the
Ray cluster has, so that a config asking for more than exists fails before any actor starts, naming the
role, the key and the numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from rlloop.errors import ConfigError, RlloopError

logger = logging.getLogger(__name__)

ROLES = ("learner", "rollout", "prm", "critic")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_COUNT_KEY = {
    "learner": "learner.world_size",
    "rollout": "rollout.num_workers",
    "prm": "reward.prm.num_replicas",
    "critic": "algo.critic.world_size",
}
_ACTOR = {"learner": "rank", "rollout": "worker", "prm": "replica", "critic": "rank"}


class ResourceError(RlloopError):
    """The config asks for more CPUs or GPUs than the Ray cluster has (or than any one node has)."""


@dataclass(frozen=True)
class RoleDemand:
    """`count` actors of `role`, each asking for `num_cpus` CPUs and `num_gpus` GPUs (keys: where from)."""

    role: str
    count: int
    num_cpus: float
    num_gpus: float
    cpu_key: str
    gpu_key: str

    def describe(self, resource: str) -> str:
        per, key = (self.num_gpus, self.gpu_key) if resource == "GPU" else (self.num_cpus, self.cpu_key)
        return f"{self.role}: {self.count} {_ACTOR.get(self.role, 'actor')}(s) x {key}={per:g}"


@dataclass
class PlacementPlan:
    """Bundles per placement group, and which bundle each (role, index) actor sits in."""

    mode: str
    strategy: str
    demands: dict[str, RoleDemand]
    groups: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # group name -> bundles
    where: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)  # (role, i) -> (group, b)
    unplaced: list[RoleDemand] = field(default_factory=list)  # actors outside any group (verifiers, ...)

    def total(self, resource: str) -> float:
        placed = sum(b.get(resource, 0.0) for bundles in self.groups.values() for b in bundles)
        key = "num_gpus" if resource == "GPU" else "num_cpus"
        return placed + sum(d.count * getattr(d, key) for d in self.unplaced)


def prm_num_gpus(cfg: Any) -> tuple[float, str]:
    """GPUs per PRM replica and the key that set them: reward.prm.num_gpus (older spelling) when set,
    else cluster.prm.num_gpus."""
    if cfg.reward.prm.num_gpus is not None:
        return float(cfg.reward.prm.num_gpus), "reward.prm.num_gpus"
    return float(cfg.cluster.prm.num_gpus), "cluster.prm.num_gpus"


def role_demands(cfg: Any) -> dict[str, RoleDemand]:
    """The placed roles of a composed Config (the PRM only when reward.prm.enabled, the critic only when
    algo.advantage=gae)."""
    c = cfg.cluster
    counts = {
        "learner": int(cfg.learner.world_size),
        "rollout": int(cfg.rollout.num_workers),
        "prm": int(cfg.reward.prm.num_replicas) if cfg.reward.prm.enabled and not cfg.reward.prm.oracle else 0,
        "critic": int(cfg.algo.critic.world_size) if cfg.algo.advantage == "gae" else 0,
    }
    demands = {}
    for role in ROLES:
        if counts[role] == 0:
            continue
        res = c[role]
        gpus, gpu_key = (
            prm_num_gpus(cfg) if role == "prm" else (float(res.num_gpus), f"cluster.{role}.num_gpus")
        )
        demands[role] = RoleDemand(
            role, counts[role], float(res.num_cpus), gpus, f"cluster.{role}.num_cpus", gpu_key
        )
    return demands


def extra_demands(cfg: Any) -> list[RoleDemand]:
    """Actors the controller starts outside placement groups: verifier workers, Q-RM, implicit PRM."""
    rw = cfg.reward
    extra = [
        RoleDemand(
            "verifier",
            int(rw.verifier.num_workers),
            float(rw.verifier.worker_num_cpus),
            0.0,
            "reward.verifier.worker_num_cpus",
            "-",
        )
    ]
    for name in ("qrm", "implicit_prm"):
        if rw[name].enabled:
            extra.append(RoleDemand(name, 1, 0.1, 0.0, f"reward.{name} (fixed)", "-"))
    return extra


def plan_placement(cfg: Any) -> PlacementPlan:
    """Bundles for the `cluster` config of `cfg` (pure). ConfigError naming the key for impossible asks."""
    c = cfg.cluster
    if c.placement not in ("separate", "colocated"):
        raise ConfigError(f"config cluster.placement={c.placement!r}: choose separate or colocated")
    if c.strategy not in STRATEGIES:
        raise ConfigError(f"config cluster.strategy={c.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    for role in c.colocate:
        if role not in ROLES:
            raise ConfigError(
                f"config cluster.colocate={list(c.colocate)}: unknown role {role!r}; roles: {ROLES}"
            )
    demands = role_demands(cfg)
    for d in demands.values():
        if d.num_cpus < 0:
            raise ConfigError(f"config {d.cpu_key}={d.num_cpus:g}: must be >= 0")
        if d.num_gpus < 0:
            raise ConfigError(f"config {d.gpu_key}={d.num_gpus:g}: must be >= 0")
        if d.num_cpus == 0 and d.num_gpus == 0:
            raise ConfigError(
                f"config {d.cpu_key}=0 and {d.gpu_key}=0: a {d.role} {_ACTOR[d.role]} must ask for some "
                "CPU or GPU (Ray cannot reserve an empty bundle)"
            )
        if d.num_gpus > 1 and d.num_gpus != int(d.num_gpus):
            raise ConfigError(
                f"config {d.gpu_key}={d.num_gpus:g}: more than one GPU must be a whole number (Ray)"
            )
    plan = PlacementPlan(mode=c.placement, strategy=c.strategy, demands=demands, unplaced=extra_demands(cfg))
    shared = [r for r in ROLES if r in demands and c.placement == "colocated" and r in c.colocate]
    if shared:
        _plan_shared(plan, [demands[r] for r in shared])
    for role, d in demands.items():
        if role not in shared:
            bundle = {"CPU": d.num_cpus} | ({"GPU": d.num_gpus} if d.num_gpus else {})
            plan.groups[role] = [dict(bundle) for _ in range(d.count)]
            plan.where.update({(role, i): (role, i) for i in range(d.count)})
    return plan


def _plan_shared(plan: PlacementPlan, shared: list[RoleDemand]) -> None:
    """One group whose bundle b hosts actor b of each shared role; their GPU shares must fit one GPU."""
    for d in shared:
        if d.num_gpus > 1:
            raise ConfigError(
                f"config {d.gpu_key}={d.num_gpus:g}: with cluster.placement=colocated each {d.role} "
                f"{_ACTOR[d.role]} takes a share (<= 1) of the GPU it shares with "
                f"{', '.join(x.role for x in shared if x is not d)}"
            )
    bundles: list[dict[str, float]] = []
    for b in range(max(d.count for d in shared)):
        members = [d for d in shared if b < d.count]
        gpu_share = sum(d.num_gpus for d in members)
        if gpu_share > 1 + 1e-9:
            keys = " + ".join(f"{d.gpu_key}={d.num_gpus:g}" for d in members)
            raise ConfigError(
                f"config cluster.placement=colocated: {keys} = {gpu_share:g} GPU on one shared GPU; "
                "the shares of the colocated roles must add up to at most 1"
            )
        bundle = {"CPU": sum(d.num_cpus for d in members)}
        if gpu_share:
            bundle["GPU"] = float(math.ceil(gpu_share))  # the whole GPU: no other job slips onto it
        bundles.append(bundle)
        plan.where.update({(d.role, b): ("shared", b) for d in members})
    plan.groups["shared"] = bundles


def _fmt(x: float) -> str:
    return f"{x:g}"


def check_resources(
    plan: PlacementPlan,
    cluster: dict[str, float],
    nodes: list[dict[str, float]],
    what: str = "the Ray cluster",
) -> None:
    """ResourceError when the plan needs more CPUs/GPUs than `cluster` (ray.cluster_resources()) has in
    total, or a bundle larger than every node in `nodes` (each node's resources), naming roles and keys."""
    for resource in ("GPU", "CPU"):
        need = plan.total(resource)
        have = float(cluster.get(resource, 0.0))
        if need > have + 1e-9:
            parts = [
                d.describe(resource)
                for d in [*plan.demands.values(), *plan.unplaced]
                if (d.num_gpus if resource == "GPU" else d.num_cpus) > 0
            ]
            shared = (
                " (shared bundles round colocated GPU shares up to whole GPUs)"
                if "shared" in plan.groups
                else ""
            )
            raise ResourceError(
                f"the config asks for {_fmt(need)} {resource}(s) but {what} has {_fmt(have)}: "
                f"{'; '.join(parts)}{shared}. Lower those keys, pick another cluster preset "
                "(cluster=local on a CPU machine), or join a bigger cluster (cluster.address / RAY_ADDRESS)"
            )
    for name, bundles in plan.groups.items():
        for bundle in bundles:
            if nodes and not any(
                all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes
            ):
                roles = sorted({r for (r, _), (g, _) in plan.where.items() if g == name})
                keys = ", ".join(f"{plan.demands[r].cpu_key}/{plan.demands[r].gpu_key}" for r in roles)
                biggest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
                raise ResourceError(
                    f"a {'/'.join(roles)} bundle {bundle} fits on no single node (largest: "
                    f"{ {k: biggest.get(k, 0.0) for k in bundle} }); one actor cannot span nodes: lower {keys}"
                )
    if plan.strategy in ("STRICT_PACK", "STRICT_SPREAD") and nodes:
        for name, bundles in plan.groups.items():
            whole = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
            if plan.strategy == "STRICT_PACK" and not any(
                all(node.get(k, 0.0) + 1e-9 >= v for k, v in whole.items()) for node in nodes
            ):
                raise ResourceError(
                    f"cluster.strategy=STRICT_PACK puts the whole {name} group ({_fmt(whole['CPU'])} CPU, "
                    f"{_fmt(whole['GPU'])} GPU) on one node, and no node has that much; use PACK"
                )
            if plan.strategy == "STRICT_SPREAD" and len(bundles) > len(nodes):
                raise ResourceError(
                    f"cluster.strategy=STRICT_SPREAD puts each of the {len(bundles)} {name} bundles on its own "
                    f"node, but the Ray cluster has {len(nodes)} node(s)"
                )


class Placement:
    """The plan's placement groups, created and ready; `options(role, i)` are that actor's Ray options."""

    def __init__(self, plan: PlacementPlan, *, timeout_s: float) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.plan = plan
        self.groups: dict[str, Any] = {}
        try:
            for name, bundles in plan.groups.items():
                self.groups[name] = placement_group(bundles, strategy=plan.strategy)
            for name, pg in self.groups.items():
                try:
                    ray.get(pg.ready(), timeout=timeout_s)
                except ray.exceptions.GetTimeoutError as err:
                    raise ResourceError(
                        f"placement group {name!r} ({len(plan.groups[name])} bundles {plan.groups[name][0]}, "
                        f"strategy {plan.strategy}) not placed within {timeout_s:.0f} s "
                        f"(cluster.ready_timeout_s); free now: {ray.available_resources()}"
                    ) from err
        except BaseException:
            self.remove()
            raise
        logger.info(
            "placement (%s, %s): %s",
            plan.mode,
            plan.strategy,
            "; ".join(f"{n}: {len(b)} x {b[0]}" for n, b in plan.groups.items()),
        )

    def options(self, role: str, index: int) -> dict[str, Any]:
        """`.options(**...)` for actor `index` of `role`: its resources and its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        d = self.plan.demands[role]
        group, bundle = self.plan.where[(role, index)]
        opts: dict[str, Any] = {
            "num_cpus": d.num_cpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.groups[group], placement_group_bundle_index=bundle
            ),
        }
        if d.num_gpus:
            opts["num_gpus"] = d.num_gpus  # Ray sets CUDA_VISIBLE_DEVICES only for actors that ask
        return opts

    def num_gpus(self, role: str) -> float:
        d = self.plan.demands.get(role)
        return d.num_gpus if d is not None else 0.0

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already gone (cluster shut down)
                pass
        self.groups = {}


def local_resources(num_cpus: int | None) -> dict[str, float]:
    """What a fresh local Ray cluster (init_ray without an address) will have: cluster.num_cpus (or every
    core) and the GPUs Ray detects on this node (as Ray counts them: NVML, limited by CUDA_VISIBLE_DEVICES)."""
    import os

    gpus = 0
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        gpus = int(manager.get_current_node_num_accelerators() or 0)
        visible = manager.get_current_process_visible_accelerator_ids()
        if visible is not None:
            gpus = min(gpus, len(visible))
    except Exception:  # noqa: BLE001 - Ray's private API moved: ask torch instead
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": float(num_cpus or os.cpu_count() or 2), "GPU": float(gpus)}


def thread_oversubscription(cfg: Any, cores: int) -> list[str]:
    """Warnings for CPU roles whose processes run at the same time with more torch threads than `cores`.

    The rollout workers generate together and the learner ranks compute together; torch's OpenMP
    threads spin while they wait, so oversubscribed cores cost far more than their share: 2 rollout
    workers x 2 threads on 2 cores generated 3.5x slower than 2 x 1 (benchmarks/RESULTS.md,
    "Rollout workers"). Fractional Ray CPUs do not limit threads; these keys do."""
    out = []
    r, lr = cfg.rollout, cfg.learner
    roles = [
        ("rollout.num_workers", r.num_workers, "rollout.num_threads", r.num_threads, cfg.cluster.rollout.num_gpus),
        ("learner.world_size", lr.world_size, "learner.num_threads", lr.num_threads, cfg.cluster.learner.num_gpus),
    ]
    for procs_key, procs, threads_key, threads, gpus in roles:
        if gpus or procs * threads <= cores:
            continue
        out.append(
            f"{procs_key} x {threads_key} = {procs} x {threads} torch threads working at once on {cores} "
            f"cores oversubscribe the CPU (spinning OpenMP threads); set {threads_key}={max(1, cores // procs)}"
        )
    return out


def preflight_check(cfg: Any) -> None:
    """Before Ray starts: the plan is possible, and fits the local cluster init_ray would start (a cluster
    to join, cluster.address or $RAY_ADDRESS, is checked by `place` once joined). Warns about torch
    threads that oversubscribe this machine's cores."""
    import os

    plan = plan_placement(cfg)
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    local = local_resources(cfg.cluster.num_cpus)
    check_resources(plan, local, [local], what="the local Ray cluster (this machine)")
    for warning in thread_oversubscription(cfg, os.cpu_count() or 1):
        logger.warning(warning)


def place(cfg: Any) -> Placement:
    """Plan, check against the joined Ray cluster, then create the placement groups (after init_ray)."""
    import ray

    plan = plan_placement(cfg)
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    check_resources(plan, ray.cluster_resources(), nodes)
    return Placement(plan, timeout_s=cfg.cluster.ready_timeout_s)
