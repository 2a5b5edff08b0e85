"""One GRPO update of the policy learner: the LM head on response positions only (`logits_to_keep`, what
rlloop does) vs logits at every position (what it did before), in one run, arms alternating.

    python benchmarks/learner_step.py --model smollm2 --rows 32 --prompt-len 70 --response-len 128
    python benchmarks/learner_step.py --model tiny --rows 8 --prompt-len 20 --response-len 16 --rounds 1
    python benchmarks/learner_step.py --model smollm2 --rows 32 --spread rollout --rounds 3 \
        --arms response-only+zero0,response-only+zero0+sorted,response-only+zero0+packed

Each arm runs in a fresh subprocess (so its peak RSS is its own): a PolicyLearner at world size 1 (the arm's ZeRO
stage, the thread count of --threads), one warm-up step, then --steps timed `train_step`s over the same batch
(rows of prompt-len +- 10 % prompt tokens then response-len response tokens, random token ids,
advantages +-1, micro-batches of --micro-batch rows, fused old logprobs as in the default run). With
--spread rollout the response lengths vary as RL rollouts' do under a length cap: log-normal with median
0.4 x response-len and sigma 0.7, at least 8 tokens, clipped at response-len (about 10 % of the rows run
to the cap); the same lengths for every arm (seed 0).
Prints per arm the median step time, the peak RSS of the process and the ratios to the first arm.
Arms: a base, all-positions (logits everywhere) or response-only (the default), then '+'-joined modifiers:
gc (learner.gradient_checkpointing), bf16 (learner.bf16: DeepSpeed bf16 weights and activations, fp32
master weights; on a CPU with avx512_bf16 the matmuls run in bf16), zero0 / zero1 / zero2 (learner.zero_stage;
ZeRO-2 when none is named), plainlp (log_softmax + gather and a separate entropy pass, as before the chunked
`rlloop.algos.logprobs`), mmap1m (learner.malloc_mmap_threshold_mb=1: glibc mmaps blocks of 1 MiB and
more; else glibc's dynamic threshold), sorted / packed (learner.batching: micro-batches of rows sorted by
length cut at micro-batch x the longest row tokens, padded or packed into one row; else padded), e.g.
response-only+gc+zero0+mmap1m.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from _subprocess import run_arm

ARMS = ("all-positions", "response-only", "response-only+gc", "response-only+bf16")
BASES = ("all-positions", "response-only")
MODIFIERS = ("gc", "bf16", "zero0", "zero1", "zero2", "plainlp", "mmap1m", "sorted", "packed")


def parse_arm(arm: str) -> tuple[str, set[str]]:
    """'response-only+gc+zero0' -> ('response-only', {'gc', 'zero0'}); SystemExit naming a bad part."""
    base, *mods = arm.split("+")
    if base not in BASES or any(m not in MODIFIERS for m in mods) or len(set(mods)) != len(mods):
        sys.exit(f"--arms: bad arm {arm!r}: a base of {list(BASES)} then '+'-joined modifiers of {list(MODIFIERS)}")
    if sum(m.startswith("zero") for m in mods) > 1:
        sys.exit(f"--arms: arm {arm!r} names more than one ZeRO stage")
    if {"sorted", "packed"} <= set(mods):
        sys.exit(f"--arms: arm {arm!r} names both sorted and packed")
    return base, set(mods)


def response_lengths(args) -> list[int]:
    """Each row's response tokens: --response-len for every row, or with --spread rollout a log-normal
    spread under the cap (see the module docstring)."""
    import numpy as np

    if args.spread == "none":
        return [args.response_len] * args.rows
    draw = np.random.default_rng(0).lognormal(np.log(0.4 * args.response_len), 0.7, size=args.rows)
    return [int(n) for n in np.clip(np.round(draw), 8, args.response_len)]


def worker(args) -> None:
    import numpy as np
    import torch

    import rlloop.learner.policy as policy
    from rlloop.models import resolve_model
    from rlloop.types import Batch

    base, mods = parse_arm(args.worker)
    zero_stage = next((int(m[4:]) for m in mods if m.startswith("zero")), 2)
    if "plainlp" in mods:  # the learner before the chunked logprobs: log_softmax + gather, entropy apart
        import rlloop.algos.logprobs as logprobs_mod
        from rlloop.algos.losses import entropy_from_logits

        def plain(logits, input_ids, temperature=1.0, start=0, *, with_entropy=True):
            z = logits[:, :-1].float() / temperature
            picked = torch.log_softmax(z, dim=-1).gather(-1, input_ids[:, start + 1 :, None]).squeeze(-1)
            with torch.no_grad():
                ent = entropy_from_logits(logits[:, :-1].float() / temperature) if with_entropy else torch.zeros_like(picked)
            pad = (start + 1, 0)
            return torch.nn.functional.pad(picked, pad), torch.nn.functional.pad(ent, pad)

        logprobs_mod.sampled_logprobs = plain  # token_logprobs' (compute_logprobs)
        policy.sampled_logprobs = plain  # train_step's
    if base == "all-positions":
        policy._keeps_logits = lambda model: False  # the learner before logits_to_keep
    from hydra import compose, initialize_config_dir

    from rlloop.config import register_configs

    register_configs()
    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={args.model}"])
    path = resolve_model(cfg.model, cfg.task)
    rng = np.random.default_rng(0)
    vocab = int(json.load(open(os.path.join(path, "config.json")))["vocab_size"])
    T = int(args.prompt_len * 1.1) + args.response_len
    ids = np.zeros((args.rows, T), dtype=np.int64)
    att = np.zeros_like(ids)
    resp = np.zeros((args.rows, T), dtype=np.float32)
    for b, n in enumerate(response_lengths(args)):
        p = int(rng.integers(int(args.prompt_len * 0.9), int(args.prompt_len * 1.1) + 1))
        ids[b, : p + n] = rng.integers(1, vocab, size=p + n)
        att[b, : p + n] = 1
        resp[b, p : p + n] = 1.0
    adv = np.where(np.arange(args.rows)[:, None] % 2 == 0, 1.0, -1.0).astype(np.float32) * resp
    batch = Batch(input_ids=ids, attention_mask=att, response_mask=resp, advantages=adv, returns=adv.copy(), rollout_logprobs=None)
    learner = policy.PolicyLearner(
        path,
        {
            "world_size": 1, "zero_stage": zero_stage, "lr": 1e-6, "weight_decay": 0.0, "betas": [0.9, 0.99],
            "micro_batch_size": args.micro_batch, "grad_clip": 1.0, "bf16": "bf16" in mods, "num_threads": args.threads,
            "master_port": 0, "gradient_checkpointing": "gc" in mods,
            "malloc_mmap_threshold_mb": 1.0 if "mmap1m" in mods else 0.0,
            "batching": next((m for m in ("sorted", "packed") if m in mods), "padded"),
        },
        {
            "advantage": "grpo", "policy_loss": "ppo", "clip_low": 0.2, "clip_high": 0.2,
            "clip_ratio_c": 3.0, "loss_agg": "token-mean", "kl_coef": 0.0, "entropy_coef": 0.0,
            "use_ref": False, "tis_cap": None, "ppo_epochs": 1,
        },
        rank=0, world_size=1, master_addr="127.0.0.1", master_port=args.port, temperature=1.0,
        train_batch_size=args.rows,
    )  # fmt: skip
    torch.manual_seed(0)
    learner.train_step(batch)  # warm-up
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        learner.train_step(batch)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # every thread's CPU seconds: the work, whatever the load
    positions = sum(len(rows) * int(policy.row_lengths(att[rows]).max()) if learner.batching != "packed"
                    else int(policy.row_lengths(att[rows]).sum()) for rows in learner._row_plan(batch))  # fmt: skip
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps({"arm": args.worker, "times": times, "cpu": cpu, "positions": positions,
                                  "peak_rss_gb": peak_gb}), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=70)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--spread", choices=("none", "rollout"), default="none",
                    help="response lengths: all --response-len, or spread as RL rollouts' (module docstring)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=29571)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated; each a base "
                    f"({'|'.join(BASES)}) then '+'-joined modifiers ({'|'.join(MODIFIERS)}; ZeRO-2 unless named)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    arms = [a for a in args.arms.split(",") if a]
    for arm in arms:
        parse_arm(arm)
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(args.rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            cmd = [sys.executable, __file__, "--worker", arm] + [
                a for k, v in vars(args).items() if k not in ("worker", "arms") and v is not None
                for a in (f"--{k.replace('_', '-')}", str(v))
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
            env.pop("MALLOC_MMAP_THRESHOLD_", None)  # glibc's default unless the arm says mmap1m
            res = run_arm(cmd, env, arm)
            results[arm].append(res)
            print(f"round {r} {arm}: steps {[round(t, 2) for t in res['times']]} s, CPU "
                  f"{[round(t, 2) for t in res['cpu']]} s, peak RSS {res['peak_rss_gb']:.2f} GB")  # fmt: skip
    med = {arm: statistics.median(t for res in results[arm] for t in res["times"]) for arm in arms}
    cpu = {arm: statistics.median(t for res in results[arm] for t in res["cpu"]) for arm in arms}
    positions = {arm: results[arm][0]["positions"] for arm in arms}
    rss = {arm: statistics.median(res["peak_rss_gb"] for res in results[arm]) for arm in arms}
    lengths = response_lengths(args)
    spread = (f"{args.response_len} response" if args.spread == "none" else
              f"{min(lengths)}-{max(lengths)} response, mean {sum(lengths) / len(lengths):.0f}, "
              f"{sum(n == args.response_len for n in lengths)} at the cap")  # fmt: skip
    print(f"\n{args.model}: {args.rows} rows x (~{args.prompt_len} prompt + {spread}), "
          f"micro-batch {args.micro_batch}, {args.threads} threads, load {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    base = arms[0]
    print(f"| arm | token positions | step s (median) | CPU s (median) | peak RSS GB | step vs {base} | "
          f"CPU vs {base} | RSS vs {base} |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for arm in arms:
        print(f"| {arm} | {positions[arm]} | {med[arm]:.2f} | {cpu[arm]:.2f} | {rss[arm]:.2f} | {med[arm] / med[base]:.2f} | "
              f"{cpu[arm] / cpu[base]:.2f} | {rss[arm] / rss[base]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
