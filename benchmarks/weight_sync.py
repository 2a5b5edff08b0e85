"""Weight-sync time: learner ranks -> rollout workers, bucketed (rlloop.distributed.weight_sync) vs one
full state-dict copy, for a few bucket sizes. Rounds alternate the variants; the table gives medians.

    python benchmarks/weight_sync.py --model tiny --model arith-small --bucket-mb 1 --bucket-mb 256

Each round is one complete sync of a new version: the learner gathers (ZeRO-3: bucket by bucket), the
buckets go through the Ray object store, every worker stages them and loads the whole version. `full`
is the path rlloop used before buckets: rank 0 gathers the whole model into one object, each worker
loads it. CPU numbers here; on a GPU machine the same script measures the same (object-store) path,
since NCCL/CUDA-IPC transports are not implemented yet.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# Architectures of conf/model/{tiny,arith-small}.yaml. Sync time depends on the shapes only, so these
# are built random-init (arith-small's SFT would take minutes and change no byte count).
SHAPES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=300),
    "arith-small": dict(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=512, vocab_size=384),
}


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

    from rlloop.distributed.weight_sync import MB, push_weights, wait_loaded
    from rlloop.learner.group import LearnerGroup
    from rlloop.rollout.worker import RolloutWorker

    path = model_path(name, Path(tempfile.mkdtemp(prefix="weight_sync_")))
    learner_cfg = {
        "world_size": args.world_size,
        "zero_stage": args.zero_stage,
        "lr": 1e-5,
        "micro_batch_size": 2,
        "num_threads": 1,
        "zero3_param_persistence_threshold": 0,
    }
    algo_cfg = {"use_ref": False}
    group = LearnerGroup(path, learner_cfg, algo_cfg, temperature=1.0, train_batch_size=2, timeout_s=900)
    workers = [RolloutWorker.options(num_cpus=0.1).remote(path, seed=i) for i in range(args.workers)]
    ray.get([w.__ray_ready__.remote() for w in workers], timeout=900)
    variants = [f"bucket {mb:g} MB" for mb in args.bucket_mb] + (["full"] if args.full else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    info: dict[str, dict] = {}
    version = 0
    try:
        for _ in range(args.rounds + 1):  # round 0 warms up (first gather, first load)
            for variant in variants:
                version += 1
                start = time.perf_counter()
                if variant == "full":
                    ref = group.state_dict_ref()
                    got = ray.get([w.update_weights.remote(ref, version) for w in workers], timeout=900)
                    nbytes = sum(v.nbytes for v in ray.get(ref).values())
                    buckets = 1
                else:
                    mb = float(variant.split()[1])
                    result = push_weights(group, workers, version, bucket_mb=mb, timeout_s=900)
                    got = wait_loaded(result, timeout_s=900)
                    nbytes, buckets = sum(result.bucket_bytes), len(result.bucket_refs)
                seconds = time.perf_counter() - start
                assert got == [version] * len(workers), got
                if version > len(variants):
                    times[variant].append(seconds)
                info[variant] = {"buckets": buckets, "mb": nbytes / MB}
    finally:
        group.shutdown()
        for w in workers:
            ray.kill(w)
    rows = []
    for variant in variants:
        rows.append(
            {
                "model": name,
                "variant": variant,
                "buckets": info[variant]["buckets"],
                "mb": round(info[variant]["mb"], 2),
                "median_s": round(statistics.median(times[variant]), 4),
                "rounds_s": [round(t, 4) for t in times[variant]],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="tiny | arith-small | smollm2 | HF folder")
    parser.add_argument("--bucket-mb", action="append", type=float, help="bucket sizes (MB) to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="rollout workers")
    parser.add_argument("--no-full", dest="full", action="store_false", help="skip the full-copy variant")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    args.model = args.model or ["tiny", "arith-small"]
    args.bucket_mb = args.bucket_mb or [1.0, 256.0]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rlloop.distributed.ray_setup import init_ray

    init_ray(num_cpus=max(4, os.cpu_count() or 2))
    rows = [row for name in args.model for row in bench_model(name, args)]
    print(
        f"\nweight sync, {args.world_size} learner ranks ZeRO-{args.zero_stage} -> {args.workers} rollout "
        f"worker(s); {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
        f"{args.rounds} rounds after 1 warm-up\n"
    )
    print("| model | variant | buckets | MB | median s | rounds s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['variant']} | {r['buckets']} | {r['mb']} | {r['median_s']} | "
            f"{', '.join(str(t) for t in r['rounds_s'])} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
