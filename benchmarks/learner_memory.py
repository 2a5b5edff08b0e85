"""Peak memory of one policy-learner rank: full fine-tuning vs LoRA (learner.lora), with and without
ZeRO-Offload of the optimizer (learner.offload_optimizer), each arm in a fresh process.

    python benchmarks/learner_memory.py --model smollm2
    python benchmarks/learner_memory.py --model tiny --rows 4 --prompt-len 10 --response-len 8
    python benchmarks/learner_memory.py --estimate    # computed GPU estimate for 1.5B and 7B, no run

An arm builds a PolicyLearner at world size 1 with the reference policy on (algo.use_ref: a KL term, as
in most RL runs; full fine-tuning keeps a frozen copy for it, LoRA switches its adapter off instead),
computes the reference logprobs of one batch and takes --steps GRPO updates on it. It reports the peak RSS
of the process (ru_maxrss: weights, reference, gradients, optimizer state, activations, and the ~0.5 GB
of torch/DeepSpeed/transformers themselves), the RSS after start-up, and the trainable parameters.
Arms (comma-separated): full, lora, full+offload, lora+offload, each with +zero2 (the default: ZeRO-2,
which offload needs) or +zero0 (no ZeRO partitioning, the single-rank preset).
On a CPU-only machine "offload" moves the optimizer state from CPU memory to CPU memory: the arm shows
what ZeRO-Offload costs there, not what it saves on a GPU (--estimate computes that).

--estimate: model-state memory (weights, gradients, Adam, the reference policy; no activations) of one
GPU rank with bf16 on, as rlloop lays it out, for Qwen2.5-1.5B and Qwen2.5-7B shapes, next to DeepSpeed's
own estimator for the same ZeRO settings (which counts no reference model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

from _subprocess import run_arm

ARMS = ("full+zero0", "lora+zero0", "full+zero2", "full+offload+zero2", "lora+zero2", "lora+offload+zero2")


def parse_arm(arm: str) -> dict:
    """'lora+offload+zero2' -> {'lora': True, 'offload': True, 'zero_stage': 2}; SystemExit naming a bad arm."""
    base, *mods = arm.split("+")
    zeros = [m for m in mods if m in ("zero0", "zero2")]
    if base not in ("full", "lora") or any(m not in ("offload", "zero0", "zero2") for m in mods) or len(zeros) > 1:
        sys.exit(f"--arms: bad arm {arm!r}: full|lora, then +offload and/or +zero0|+zero2")
    zero_stage = int(zeros[0][4:]) if zeros else 2
    if "offload" in mods and zero_stage == 0:
        sys.exit(f"--arms: {arm!r}: offload needs ZeRO (zero2)")
    return {"lora": base == "lora", "offload": "offload" in mods, "zero_stage": zero_stage}


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 2**20


def worker(args) -> None:
    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    from rlloop.config import register_configs
    from rlloop.learner.policy import PolicyLearner
    from rlloop.models import resolve_model
    from rlloop.types import Batch

    arm = parse_arm(args.worker)
    register_configs()
    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={args.model}"])
    path = resolve_model(cfg.model, cfg.task)
    rng = np.random.default_rng(0)
    vocab = int(json.load(open(os.path.join(path, "config.json")))["vocab_size"])
    T = args.prompt_len + args.response_len
    ids = rng.integers(1, vocab, size=(args.rows, T)).astype(np.int64)
    att = np.ones_like(ids)
    resp = np.zeros((args.rows, T), dtype=np.float32)
    resp[:, args.prompt_len :] = 1.0
    adv = np.where(np.arange(args.rows)[:, None] % 2 == 0, 1.0, -1.0).astype(np.float32) * resp
    batch = Batch(
        input_ids=ids, attention_mask=att, response_mask=resp, advantages=adv, returns=adv.copy(), rollout_logprobs=None
    )
    lora = {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "target_modules": "all-linear", "dropout": 0.0}
    learner = PolicyLearner(
        path,
        {
            "world_size": 1, "zero_stage": arm["zero_stage"], "lr": 1e-6, "micro_batch_size": args.micro_batch,
            "num_threads": args.threads, "offload_optimizer": arm["offload"],
            "lora": lora if arm["lora"] else {**lora, "rank": 0},
        },
        {"advantage": "grpo", "kl_coef": 0.01, "use_ref": True},
        rank=0, world_size=1, master_addr="127.0.0.1", master_port=args.port, temperature=1.0,
        train_batch_size=args.rows,
    )  # fmt: skip
    after_init = rss_gb()
    trainable = sum(p.numel() for p in learner.engine.module.parameters() if p.requires_grad)
    torch.manual_seed(0)
    batch.ref_logprobs = learner.compute_logprobs(batch, "ref")
    for _ in range(args.steps):
        learner.train_step(batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps({"arm": args.worker, "peak_rss_gb": peak, "init_rss_gb": after_init,
                                  "trainable": trainable}), flush=True)  # fmt: skip


# (hidden, intermediate, layers, kv dim, vocab, tied embeddings) of the Qwen2.5 models
SHAPES = {"Qwen2.5-1.5B": (1536, 8960, 28, 256, 151936, True), "Qwen2.5-7B": (3584, 18944, 28, 512, 152064, False)}
GB = 1e9


def param_counts(hidden: int, inter: int, layers: int, kv: int, vocab: int, tied: bool, rank: int) -> tuple[int, int]:
    """(parameters, LoRA parameters at `rank` on every linear layer of the decoder: r x (in + out) each)."""
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    per_layer = sum(i * o for i, o in linears) + hidden + 2 * kv + 2 * hidden  # + q/k/v biases, 2 norms
    total = vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden
    return total, layers * sum(rank * (i + o) for i, o in linears)


def estimate(rank: int) -> None:
    """Model-state GB per GPU (and in host memory) for rlloop's learner settings; see the module doc.

    Per trained parameter, DeepSpeed's own multipliers (its estimators below): bf16 weights 2 B, bf16 and
    fp32 gradients 2 + 4, fp32 master weights 4, Adam momentum and variance 8: 20 B on the GPU, or with
    offload_optimizer 2 B there and 16 B in host memory (offload_params: 18 B in host memory, the largest
    layer gathered on the GPU). rlloop's reference policy is a frozen float32 copy (4 B/param) on the
    learner's device; with LoRA there is none (the adapter is switched off) and the frozen base holds only
    bf16 weights (2 B/param). DeepSpeed's figures include its 1.5x host buffer factor; rlloop's do not.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    print("| model | params | setting | GPU GB (rlloop) | host GB (rlloop) | fits 80 GB | DeepSpeed estimator GPU / host GB |")
    print("|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        n, n_lora = param_counts(*shape, rank=rank)
        largest = shape[4] * shape[0]  # the embedding
        ds2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=1, num_nodes=1, cpu_offload=False)
        ds2o = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=1, num_nodes=1, cpu_offload=True)
        ds3o = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=1, num_nodes=1,
                                                     cpu_offload=True, cpu_offload_params=True, zero_init=True)  # fmt: skip
        rows = [
            ("full FT, ZeRO-2", 20 * n + 4 * n, 0, ds2),
            ("full FT, ZeRO-2 + offload_optimizer", 2 * n + 4 * n, 16 * n, ds2o),
            ("full FT, ZeRO-3 + offload_optimizer + offload_params", 4 * largest + 4 * n, 18 * n, ds3o),
            (f"LoRA r={rank} all-linear ({n_lora / 1e6:.0f} M trained)", 2 * n + 20 * n_lora, 0, None),
            (f"LoRA r={rank} + ZeRO-2 offload_optimizer", 2 * n + 2 * n_lora, 16 * n_lora, None),
        ]
        for setting, gpu, host, ds in rows:
            ds_txt = "-" if ds is None else f"{ds[1] / GB:.1f} / {ds[0] / GB:.1f} (no reference)"
            print(f"| {name} | {n / 1e9:.2f} B | {setting} | {gpu / GB:.1f} | {host / GB:.1f} | "
                  f"{'yes' if gpu < 80 * GB else 'no'} | {ds_txt} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--port", type=int, default=0, help="torch.distributed port of the arms (0: a free one)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--estimate", action="store_true", help="print the computed 1.5B / 7B GPU table and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.estimate:
        estimate(16)
        return
    if args.worker:
        worker(args)
        return
    arms = [a for a in args.arms.split(",") if a]
    for arm in arms:
        parse_arm(arm)
    if not args.port:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = int(sock.getsockname()[1])
    rows = []
    for arm in arms:
        cmd = [sys.executable, __file__, "--worker", arm] + [
            a for k, v in vars(args).items() if k not in ("worker", "arms", "estimate") and v is not None
            for a in (f"--{k.replace('_', '-')}", str(v))
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        res = run_arm(cmd, env, arm)
        rows.append(res)
        print(f"{arm}: peak RSS {res['peak_rss_gb']:.2f} GB, after start-up {res['init_rss_gb']:.2f} GB", flush=True)
    print(f"\n{args.model}: {args.rows} rows x ({args.prompt_len} prompt + {args.response_len} response), "
          f"micro-batch {args.micro_batch}, LoRA rank {args.lora_rank} all-linear, reference on, {args.steps} steps")  # fmt: skip
    base = rows[0]["peak_rss_gb"]
    print(f"| arm | trainable params | RSS after start-up GB | peak RSS GB | peak vs {arms[0]} |\n|---|---|---|---|---|")
    for res in rows:
        print(f"| {res['arm']} | {res['trainable']:,} | {res['init_rss_gb']:.2f} | {res['peak_rss_gb']:.2f} "
              f"| {res['peak_rss_gb'] / base:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
