"""HF generation (one rollout worker's share of a step) under glibc's default malloc vs a fixed 1 MiB mmap
threshold (MALLOC_MMAP_THRESHOLD_=1048576, what `learner.malloc_mmap_threshold_mb=1` sets in the learner).

    python benchmarks/generation_malloc.py --model smollm2 --prompts 2 --n 8 --tokens 128 --rounds 2

Each arm runs in a fresh process (the variable acts at process start, and the peak RSS is its own): an
HFEngine of 1 thread generates --prompts random 50-token prompts x --n samples x --tokens tokens at
temperature 1, --repeats times. Arms alternate within each round. Prints the median generate time, the
peak RSS and the ratios to the default arm. The learner's side is `benchmarks/learner_step.py` (arm
modifier mmap1m).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from _subprocess import run_arm

ARMS = {"default": None, "mmap1m": str(1 << 20)}


def worker(args) -> None:
    import resource

    import numpy as np
    from hydra import compose, initialize_config_dir

    from rlloop.config import register_configs
    from rlloop.models import resolve_model
    from rlloop.rollout.engine import HFEngine

    register_configs()
    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={args.model}"])
    engine = HFEngine(resolve_model(cfg.model, cfg.task), num_threads=1, seed=0)
    rng = np.random.default_rng(0)
    vocab = int(engine.model.config.vocab_size)  # token ids 100..999 (fewer on a tiny vocabulary)
    prompts = [[int(t) for t in rng.integers(min(100, vocab // 2), min(1000, vocab), size=50)] for _ in range(args.prompts)]
    times = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        engine.generate(prompts, n=args.n, max_new_tokens=args.tokens, temperature=1.0, seed=rep)
        times.append(time.perf_counter() - t0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps({"times": times, "peak_rss_gb": peak_gb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model.name: tiny | arith-small | smollm2")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            env.pop("MALLOC_MMAP_THRESHOLD_", None)
            if ARMS[arm] is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = ARMS[arm]
            cmd = [sys.executable, __file__, "--worker"] + [
                a for k in ("model", "prompts", "n", "tokens", "repeats") for a in (f"--{k}", str(getattr(args, k)))
            ]
            res = run_arm(cmd, env, arm)
            results[arm].append(res)
            print(f"round {r} {arm}: {[round(t, 2) for t in res['times']]} s, peak {res['peak_rss_gb']:.2f} GB", flush=True)
    med = {
        arm: (
            statistics.median(t for res in rs for t in res["times"]),
            statistics.median(res["peak_rss_gb"] for res in rs),
        )
        for arm, rs in results.items()
    }
    base_t, base_m = med["default"]
    print(f"\n{args.model}: {args.prompts} prompts x {args.n} samples x {args.tokens} tokens, 1 thread")
    print("| arm | generate s (median) | peak RSS GB | time vs default | RSS vs default |")
    print("|---|---|---|---|---|")
    for arm, (t, m) in med.items():
        print(f"| {arm} | {t:.2f} | {m:.2f} | {t / base_t:.2f} | {m / base_m:.2f} |")


if __name__ == "__main__":
    main()
