"""PRM scoring speed: one forward pass per trajectory (rlloop) vs one pass per prefix (TDRM's release),
and micro-batches packed under a token budget vs a fixed number of rows.

    python benchmarks/prm_scoring.py                       # tiny random Llama + BPE built on the fly
    python benchmarks/prm_scoring.py --model PATH --trajectories 32 --steps 4 8 16
    python benchmarks/prm_scoring.py --batching-trajectories 96 --repeats 5   # the batching comparison

Both methods use PRMScorer's batching (right padding, batches sorted by length); the per-prefix method
scores `prompt + response[:end of step k]` for every k, reading V at the prefix's last step token. The
script prints wall time per method, the speed-up, and the largest |V_one_pass - V_per_prefix|.

Batching: trajectories of 1..2*steps steps in random order, scored (one pass each) in batches of
`--batch-size` rows vs batches packed under a token budget equal to the fixed arm's largest batch
(rows x longest row), i.e. the same peak activation memory. Arms alternate; medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time

import torch

from rlloop.rewards.prm.batching import pack_by_token_budget
from rlloop.rewards.prm.service import PRMScorer
from rlloop.rollout.steps import split_steps

WORDS = "we add the numbers then carry one so the sum is and check it again".split()


def build_tiny(path: str, hidden: int, layers: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS) + "\n\n" + str(i) for i in range(200)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 3,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def make_trajectories(n: int, steps: int, words_per_step: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    prompts = [f"Question {i}: what is {rng.randint(1, 99)} + {rng.randint(1, 99)}?\n\n" for i in range(n)]
    responses = [
        "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(words_per_step)) + "." for _ in range(steps))
        for _ in range(n)
    ]
    return prompts, responses


def batching_comparison(
    scorer: PRMScorer, trajectories: int, max_steps: int, words_per_step: int, repeats: int
) -> dict:
    """Fixed-row batches vs token-budget batches on trajectories of mixed length (same peak tokens)."""
    rng = random.Random(1)
    prompts, responses = [], []
    for i in range(trajectories):
        p, r = make_trajectories(1, rng.randint(1, max_steps), words_per_step, seed=1000 + i)
        prompts += p
        responses += r
    lengths = [len(scorer.encode(p, r).input_ids) for p, r in zip(prompts, responses, strict=True)]
    rows = scorer.batch_size
    budget = max(max(lengths[i] for i in b) * len(b) for b in pack_by_token_budget(lengths, None, rows))
    arms = {"fixed_rows": (None, rows), "token_budget": (budget, len(lengths))}

    def run(arm: str) -> tuple[float, dict]:
        scorer.max_batch_tokens, scorer.batch_size = arms[arm]
        t0 = time.perf_counter()
        out = scorer.score_request(prompts, responses)
        return time.perf_counter() - t0, out

    for arm in arms:
        run(arm)  # warm-up
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    outs: dict[str, dict] = {}
    for _ in range(repeats):
        for arm in arms:  # alternating, so load from other jobs hits both arms alike
            sec, outs[arm] = run(arm)
            seconds[arm].append(sec)
    scorer.max_batch_tokens, scorer.batch_size = None, rows
    fixed, packed = outs["fixed_rows"], outs["token_budget"]
    diff = max(
        abs(a - b)
        for x, y in zip(fixed["results"], packed["results"], strict=True)
        for a, b in zip(x["step_values"], y["step_values"], strict=True)
    )
    result = {
        "trajectories": trajectories,
        "tokens_min_median_max": [min(lengths), int(statistics.median(lengths)), max(lengths)],
        "fixed_rows": rows,
        "token_budget": budget,
        "max_abs_value_diff": diff,
    }
    for arm, out in outs.items():
        result[arm + "_s"] = round(statistics.median(seconds[arm]), 4)
        result[arm + "_batches"] = out["batches"]
        result[arm + "_padded_tokens"] = out["padded_tokens"]
        batches = pack_by_token_budget(lengths, arms[arm][0], arms[arm][1])
        result[arm + "_peak_tokens"] = max(max(lengths[i] for i in b) * len(b) for b in batches)
    result["real_tokens"] = fixed["tokens"]
    result["speedup"] = round(result["fixed_rows_s"] / result["token_budget_s"], 2)
    return result


def compare_methods(scorer: PRMScorer, args: argparse.Namespace, steps: int) -> dict:
    """One pass per trajectory vs one pass per prefix on `args.trajectories` trajectories of `steps` steps:
    tokens each method feeds the model, best wall time of `args.repeats`, and their value agreement."""
    prompts, responses = make_trajectories(args.trajectories, steps, args.words_per_step, seed=0)
    prefix_prompts, prefix_responses, prefix_ends = [], [], []
    for p, r in zip(prompts, responses, strict=True):
        for _, end in split_steps(r):
            prefix_prompts.append(p)
            prefix_responses.append(r[:end])
            prefix_ends.append([end])

    def one_pass():
        return scorer.score(prompts, responses)

    def per_prefix():
        return scorer.score(prefix_prompts, prefix_responses, prefix_ends)

    timings = {}
    for name, fn in [("one_pass", one_pass), ("per_prefix", per_prefix)]:
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = (best, out)

    one = [v for res in timings["one_pass"][1] for v in res["step_values"]]
    per = [res["step_values"][0] for res in timings["per_prefix"][1]]
    max_diff = max(abs(a - b) for a, b in zip(one, per, strict=True))

    def count(ps, rs):
        return sum(len(scorer.encode(p, r).input_ids) for p, r in zip(ps, rs, strict=True))

    tokens, prefix_tokens = count(prompts, responses), count(prefix_prompts, prefix_responses)
    return {
        "steps_per_trajectory": steps,
        "tokens_per_trajectory": tokens / args.trajectories,
        "one_pass_tokens": tokens,
        "per_prefix_tokens": prefix_tokens,
        "token_ratio": round(prefix_tokens / tokens, 2),
        "one_pass_s": round(timings["one_pass"][0], 4),
        "per_prefix_s": round(timings["per_prefix"][0], 4),
        "speedup": round(timings["per_prefix"][0] / timings["one_pass"][0], 2),
        "max_abs_value_diff": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="PRM folder or causal LM (default: a tiny random Llama)"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16], help="steps per trajectory, one row each")
    parser.add_argument("--words-per-step", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-batch-tokens", type=int, default=None, help="token budget of the one-pass/per-prefix runs"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--batching-trajectories", type=int, default=0, help="also compare batching on this many (0 = skip)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if model_path is None:
            model_path = tmp
            build_tiny(tmp, args.hidden, args.layers)
        scorer = PRMScorer(
            model_path,
            batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            num_threads=args.threads,
            device=args.device,
        )
        with torch.no_grad():  # a random head, so values differ between prefixes
            torch.manual_seed(0)
            scorer.model.head.weight.normal_(0.0, 0.5)
        result = {
            "model": args.model or f"tiny-llama h{args.hidden} L{args.layers}",
            "device": args.device,
            "threads": args.threads,
            "trajectories": args.trajectories,
            "by_steps": [compare_methods(scorer, args, steps) for steps in args.steps],
        }
        if args.batching_trajectories:
            result["batching"] = batching_comparison(
                scorer, args.batching_trajectories, 2 * args.steps[0], args.words_per_step, args.repeats
            )
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
