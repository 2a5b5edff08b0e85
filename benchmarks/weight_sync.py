"""Weight-sync time, learner -> rollout workers, for every weight transport in one run
(rlloop.distributed.transport): rounds alternate the transports; medians per transport.

    python benchmarks/weight_sync.py                       # arith-small and smollm2, 2 workers, 3 rounds
    python benchmarks/weight_sync.py --model tiny --rounds 1 --transport object_store --transport shm

Each round is one complete sync of a new version through the real path (Actors.sync_weights: the learner
gathers bucket by bucket, the transport moves each bucket, every worker stages all buckets and loads them
into its engine; the call returns when every worker serves the new version). arith-small is built
random-init with conf/model/arith-small.yaml's shapes (sync time depends on the shapes only); smollm2 is
the real SmolLM2-135M-Instruct. Prints a table and, per model, the line

    weight_sync: model=M object_store_ms=A collective_ms=B shm_ms=C

`learner side ms` is push_weights' part (gather + send every bucket; for collective it includes the
workers' receive); the rest of a sync is the workers receiving and loading. `MB moved` is what the
transport writes per sync: the object store and shm write each bucket once (the
workers map it), the collective sends it to each worker; every worker's engine then copies the weights
into its model (not counted). The cuda_ipc transport needs a GPU: benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Architectures of conf/model/{tiny,arith-small}.yaml. Sync time depends on the shapes only, so these
# are built random-init (arith-small's SFT would take minutes and change no byte count).
SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=300),
    "arith-small": dict(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=512, vocab_size=384),
}
TRANSPORTS = ("object_store", "collective", "shm")


def model_path(name: str, tmp: Path) -> str:
    from rlloop.config import ModelConfig
    from rlloop.models import build_tiny, resolve_model

    if Path(name).is_dir():
        return name
    if name in SHAPES:
        return build_tiny(ModelConfig(name="tiny", **SHAPES[name]), tmp / name)
    return resolve_model(ModelConfig(name=name))


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    import tempfile

    import ray

    from rlloop.distributed.lifecycle import Actors, Supervisor
    from rlloop.distributed.transport import CollectiveGroup
    from rlloop.learner.group import LearnerGroup
    from rlloop.rollout.worker import RolloutWorker

    path = model_path(name, Path(tempfile.mkdtemp(prefix="weight_sync_")))
    learner_cfg = {"world_size": args.world_size, "zero_stage": args.zero_stage, "lr": 1e-5,
                   "micro_batch_size": 2, "num_threads": 1, "zero3_param_persistence_threshold": 0}  # fmt: skip
    learner = LearnerGroup(path, learner_cfg, {"use_ref": False}, temperature=1.0, train_batch_size=2,
                           num_cpus_per_rank=0.1, timeout_s=900)  # fmt: skip
    workers = [RolloutWorker.options(num_cpus=0.1).remote(path, seed=i) for i in range(args.workers)]
    ray.get([w.__ray_ready__.remote() for w in workers], timeout=900)
    # the lifecycle's own sync (Actors.sync_weights), without starting a whole run
    actors = Actors.__new__(Actors)
    actors.cfg = SimpleNamespace(learner=SimpleNamespace(sync_bucket_mb=args.bucket_mb, sync_timeout_s=900.0))
    actors.supervisor = Supervisor(max_restarts=0, timeout_s=900)
    actors.learner, actors.workers = learner, workers
    actors.policy_version, actors.last_sync, actors.pending_sync = 0, None, None
    groups = {t: CollectiveGroup("gloo", 900.0) if t == "collective" else None for t in args.transport}
    times: dict[str, list[float]] = {t: [] for t in args.transport}
    sends: dict[str, list[float]] = {t: [] for t in args.transport}
    info: dict[str, dict] = {}
    try:
        for r in range(args.rounds + 1):  # round 0 warms up (first gather, first load, the group forms)
            order = args.transport if r % 2 == 0 else args.transport[::-1]
            for transport in order:
                actors.weight_transport, actors.weight_group = transport, groups[transport]
                if actors.weight_group is not None and actors.weight_group.stale:
                    actors.weight_group.form(learner.actors[0], workers)  # once, outside the timing
                start = time.perf_counter()
                metrics = actors.sync_weights()
                seconds = time.perf_counter() - start
                send_s = actors.last_sync.gather_s  # learner side: gather and send every bucket
                got = ray.get([w.get_policy_version.remote() for w in workers], timeout=60)
                assert got == [actors.policy_version] * len(workers), got
                if r > 0:
                    times[transport].append(seconds)
                    sends[transport].append(send_s)
                per_sync = metrics["sync/mb"] * (len(workers) if transport == "collective" else 1)
                info[transport] = {"buckets": int(metrics["sync/buckets"]), "mb": metrics["sync/mb"], "moved": per_sync}
    finally:
        learner.shutdown()
        for w in workers:
            ray.kill(w)
    return [
        {
            "model": name,
            "transport": t,
            "buckets": info[t]["buckets"],
            "mb": round(info[t]["mb"], 1),
            "mb_moved": round(info[t]["moved"], 1),
            "median_ms": round(1000 * statistics.median(times[t]), 1),
            "send_ms": round(1000 * statistics.median(sends[t]), 1),
            "rounds_ms": [round(1000 * s, 1) for s in times[t]],
        }
        for t in args.transport
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="tiny | arith-small | smollm2 | HF folder")
    parser.add_argument("--transport", action="append", choices=TRANSPORTS, help="default: all three")
    parser.add_argument("--bucket-mb", type=float, default=256.0, help="learner.sync_bucket_mb")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after 1 warm-up")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="rollout workers")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    args.model = args.model or ["arith-small", "smollm2"]
    args.transport = args.transport or list(TRANSPORTS)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rlloop.distributed.ray_setup import init_ray

    init_ray(num_cpus=max(4, os.cpu_count() or 2))
    load = os.getloadavg()[0]
    rows = [row for name in args.model for row in bench_model(name, args)]
    print(
        f"\nweight sync, learner world size {args.world_size} ZeRO-{args.zero_stage} -> {args.workers} rollout "
        f"workers, buckets of {args.bucket_mb:g} MB; {platform.machine()}, {os.cpu_count()} CPUs, load "
        f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at the end; {args.rounds} rounds after 1 warm-up\n"
    )
    print("| model | transport | buckets | MB | MB moved | median ms | learner side ms | rounds ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['transport']} | {r['buckets']} | {r['mb']} | {r['mb_moved']} | "
              f"{r['median_ms']} | {r['send_ms']} | {', '.join(str(t) for t in r['rounds_ms'])} |")  # fmt: skip
    for name in args.model:
        ms = {r["transport"]: r["median_ms"] for r in rows if r["model"] == name}
        print(f"weight_sync: model={name} " + " ".join(f"{t}_ms={ms[t]}" for t in args.transport))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
