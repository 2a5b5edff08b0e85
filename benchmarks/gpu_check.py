"""One figure of benchmarks/gpu_check.sh per call, printed as one `gpu_check: ...` line. No Ray (the GPU
machine has none): each figure runs rlloop's own classes in this process, or, for the transports, in
processes started here.

    python benchmarks/gpu_check.py learner --model smollm2-shape
    python benchmarks/gpu_check.py engine --model qwen0.5b-shape
    python benchmarks/gpu_check.py prm --model smollm2-shape
    python benchmarks/gpu_check.py transports --model smollm2-shape
    python benchmarks/gpu_check.py all --model tiny --device cpu       # smoke test on a CPU machine

Models are random-init with real shapes (figures depend on shapes only; no hub, no SmolLM2 GGUF there):
smollm2-shape (SmolLM2-135M's Llama: 30 layers, 576 wide, vocab 49152, tied), qwen0.5b-shape
(Qwen2.5-0.5B's: 24 layers, 896 wide, vocab 151936, tied, 494 M parameters), tiny (CPU smoke test).
Each folder also gets a small BPE tokenizer trained here (the PRM encodes text; ids stay below the
model's vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "arith-small": dict(arch="llama", vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "smollm2-shape": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          tie_word_embeddings=True, rope_theta=100000.0),
    "qwen0.5b-shape": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                           num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           tie_word_embeddings=True, rope_theta=1000000.0),
}  # fmt: skip


def build_model(name: str, root: Path) -> str:
    """A random-init model of `name`'s shape with a small tokenizer, saved under root (cached there)."""
    out = root / name
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlloop.models.builders import tiny_corpus
    from rlloop.models.tokenizer import build_tokenizer

    shape = dict(SHAPES[name])
    arch = shape.pop("arch")
    tok = build_tokenizer(tiny_corpus(), vocab_size=512)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    model = model_cls(config_cls(max_position_embeddings=2048, **shape, **ids))
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def emit(figure: str, **values) -> None:
    parts = " ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in values.items())
    print(f"gpu_check: {figure} {parts}", flush=True)


def rollout_batch(vocab: int, rows: int, prompt_len: int, response_len: int, seed: int = 0, group: int = 1):
    """A learner batch whose response lengths spread as RL rollouts' do (benchmarks/learner_step.py);
    `group` consecutive rows answer the same prompt (GRPO's n samples)."""
    import numpy as np

    from rlloop.types import Batch

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(0.4 * response_len), 0.7, rows)), 8, response_len).astype(int)
    T = prompt_len + response_len
    ids = np.zeros((rows, T), dtype=np.int64)
    att, resp = np.zeros_like(ids), np.zeros((rows, T), dtype=np.float32)
    for b, n in enumerate(lengths):
        if b % group == 0:
            prompt = rng.integers(1, vocab, prompt_len)
        ids[b, :prompt_len] = prompt
        ids[b, prompt_len : prompt_len + n] = rng.integers(1, vocab, n)
        att[b, : prompt_len + n] = 1
        resp[b, prompt_len : prompt_len + n] = 1.0
    adv = np.where(np.arange(rows)[:, None] % 2 == 0, 1.0, -1.0).astype(np.float32) * resp
    return Batch(input_ids=ids, attention_mask=att, response_mask=resp, advantages=adv, returns=adv.copy(),
                 rollout_logprobs=None)  # fmt: skip


def fig_learner(args, path: str) -> None:
    """One GRPO update (fused old logprobs) per learner.batching arm, DeepSpeed ZeRO-0 world size 1."""
    import socket

    import torch

    from rlloop.learner.policy import PolicyLearner, row_lengths

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    batch = rollout_batch(512, args.rows, args.prompt_len, args.response_len, group=args.group)
    tokens = int(batch.attention_mask.sum())
    learner = None
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    arms = ("padded", "sorted", "packed")
    for r in range(args.steps + 1):  # round 0 warms every arm up; rounds alternate the arms' order
        for arm in arms if r % 2 == 0 else arms[::-1]:
            cfg = {"world_size": 1, "zero_stage": 2 if args.device == "cuda" else 0, "lr": 1e-6, "micro_batch_size": args.micro_batch,
                   "bf16": args.device == "cuda", "num_threads": 4 if args.device == "cuda" else 2, "batching": "packed",
                   "gradient_checkpointing": args.gradient_checkpointing}  # fmt: skip
            algo = {"use_ref": False, "loss_agg": "token-mean"}
            if learner is None:
                learner = PolicyLearner(path, cfg, algo, rank=0, world_size=1, master_addr="127.0.0.1",
                                        master_port=port, train_batch_size=args.rows)  # fmt: skip
            # one engine for the three arms (made packed, so its model runs segment attention): same
            # weights, only the batching differs
            learner.batching = arm
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            learner.train_step(batch)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if r > 0:
                wall.setdefault(arm, []).append(time.perf_counter() - t0)
                cpu.setdefault(arm, []).append(time.process_time() - c0)  # CPU seconds of every thread
    mask = torch.tensor(batch.response_mask, dtype=torch.float32)
    for arm in arms:
        step = statistics.median(wall[arm])
        positions = sum(len(rows) * int(row_lengths(batch.attention_mask[rows]).max()) if arm != "packed"
                        else learner._micro_batch(batch, rows, mask).packed.ids.numel()
                        for rows in _plan(learner, arm, batch))  # fmt: skip
        emit("learner_step", model=args.model, device=args.device, batching=arm, rows=args.rows, group=args.group,
             tokens=tokens, positions=positions, step_s=step, cpu_s=statistics.median(cpu[arm]),
             tokens_per_s=tokens / step, steps=len(wall[arm]), load=os.getloadavg()[0],
             peak_gb=torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0)  # fmt: skip


def _plan(learner, arm: str, batch) -> list:
    learner.batching = arm
    return learner._row_plan(batch)


def fig_engine(args, path: str) -> None:
    """HFEngine.generate tokens/s: 32 prompts x n=4, up to --gen-tokens new tokens, bf16 on CUDA."""
    import numpy as np

    from rlloop.rollout.engine import HFEngine

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    engine = HFEngine(path, dtype=dtype, device=args.device, num_threads=4, max_batch_size=128)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(5, 500, 48))) for _ in range(32)]
    kw = dict(n=4, max_new_tokens=args.gen_tokens, temperature=1.0)
    engine.generate(prompts[:4], **{**kw, "max_new_tokens": 8})  # warm-up
    times, counts = [], []
    for r in range(args.steps):
        t0 = time.perf_counter()
        out = engine.generate(prompts, **kw, seed=r)
        times.append(time.perf_counter() - t0)
        counts.append(sum(len(o.response_ids) for group in out for o in group))
    step = statistics.median(times)
    emit("hf_engine", model=args.model, device=args.device, dtype=dtype, sequences=128,
         tokens=int(statistics.median(counts)), seconds=step, tokens_per_s=statistics.median(counts) / step)  # fmt: skip


def fig_prm(args, path: str) -> None:
    """PRMScorer.score (a fresh value head on the backbone): 256 trajectories of 8 steps."""
    from rlloop.rewards.prm.service import PRMScorer

    scorer = PRMScorer(path, device=args.device, batch_size=64, max_batch_tokens=32768, num_threads=4)
    step = "12 + 30 = 42, then 42 - 7 = 35 and so on"
    prompts = ["What is 12 + 30 - 7? Think step by step."] * 256
    responses = ["\n\n".join([step] * 8) + "\n\n\\boxed{35}"] * 256
    scorer.score(prompts[:8], responses[:8])  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = scorer.score_request(prompts, responses)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    emit("prm_scoring", model=args.model, device=args.device, trajectories=256, tokens=int(out["tokens"]),
         seconds=seconds, trajectories_per_s=256 / seconds, tokens_per_s=out["tokens"] / seconds)  # fmt: skip


def _transport_member(rank: int, size: int, port: int, path: str, transports: list[str], rounds: int,
                      inboxes, done, results) -> None:  # fmt: skip
    """One process of the transport figure: rank 0 sends the model's weights as one bucket by each
    transport, `rounds` + 1 times (the first a warm-up); the others receive with the real Endpoint code
    and report when they have the arrays."""
    from rlloop.distributed.transport import CollectiveTicket, Endpoint, GroupSpec

    endpoint = Endpoint()
    if rank == 0:
        from transformers import AutoModelForCausalLM

        arrays = {k: v.float().numpy() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}
    for generation, transport in enumerate(transports, start=1):
        backend = {"collective_gloo": "gloo", "collective_nccl": "nccl"}.get(transport)
        status = "ok"
        if backend is not None:
            try:
                endpoint.join(GroupSpec("127.0.0.1", port + generation, size, generation, backend, 60.0), rank)
            except Exception as err:  # noqa: BLE001 - reported as the figure's reason
                status = f"unavailable ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        if rank == 0:
            results.put(("status", transport, status))
        if status != "ok":
            continue
        for r in range(rounds + 1):
            if rank == 0:
                t0 = time.perf_counter()
                if backend is None:
                    payload = endpoint.send(transport, arrays, r + 1, 0)
                    for inbox in inboxes:
                        inbox.put(payload)
                else:
                    endpoint.send("collective", arrays, r + 1, 0)
                for _ in range(size - 1):
                    done.get(timeout=300)
                if r > 0:
                    results.put(("time", transport, time.perf_counter() - t0))
            else:
                payload = CollectiveTicket(generation) if backend is not None else inboxes[rank - 1].get(timeout=300)
                assert len(endpoint.receive(payload)) > 0
                done.put(rank)
        endpoint.leave()
    endpoint.close()


def fig_transports(args, path: str) -> None:
    """The weights as one bucket from a sender process to 2 receiver processes, per transport: shm,
    collective over gloo, collective over NCCL (needs one GPU per member: on a one-GPU machine NCCL
    refuses two ranks on the same device, reported as unavailable) and CUDA IPC (GPU only)."""
    import multiprocessing as mp

    from rlloop.distributed.transport import free_port

    transports = ["shm", "collective_gloo"] + (["collective_nccl", "cuda_ipc"] if args.device == "cuda" else [])
    ctx = mp.get_context("spawn")
    inboxes, done, results = [ctx.Queue(), ctx.Queue()], ctx.Queue(), ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_transport_member,
                         args=(rank, 3, port, path, transports, args.steps, inboxes, done, results))
             for rank in range(3)]  # fmt: skip
    for p in procs:
        p.start()
    times: dict[str, list[float]] = {}
    status: dict[str, str] = {}
    deadline = time.monotonic() + 600
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        _drain(results, times, status)
        time.sleep(0.2)
    _drain(results, times, status)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    mb = sum(os.path.getsize(p) for p in Path(path).glob("*.safetensors")) / 2**20
    for t in transports:
        if t in times:
            emit("transport", model=args.model, transport=t, receivers=2, model_mb=round(mb, 1),
                 median_ms=1000 * statistics.median(times[t]))  # fmt: skip
        else:
            emit("transport", model=args.model, transport=t, receivers=2,
                 status=status.get(t, "failed").replace(" ", "_"))  # fmt: skip


def _drain(results, times: dict, status: dict) -> None:
    import queue

    while True:
        try:
            kind, transport, value = results.get_nowait()
        except queue.Empty:
            return
        if kind == "time":
            times.setdefault(transport, []).append(value)
        else:
            status[transport] = value


def fig_build(args, path: str) -> None:
    """The model folder (built before any figure runs): its size."""
    mb = sum(os.path.getsize(p) for p in Path(path).glob("*.safetensors")) / 2**20
    emit("build", model=args.model, path=path, safetensors_mb=round(mb, 1))


FIGURES = {"build": fig_build, "learner": fig_learner, "engine": fig_engine, "prm": fig_prm, "transports": fig_transports}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("figure", choices=[*FIGURES, "all"])
    ap.add_argument("--model", default="smollm2-shape", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "rlloop_gpu_check"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--group", type=int, default=1, help="learner figure: rows per prompt (GRPO's n)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="learner figure")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = build_model(args.model, Path(args.models_dir))
    print(f"# model {args.model} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    for name in FIGURES if args.figure == "all" else [args.figure]:
        t0 = time.perf_counter()
        try:
            FIGURES[name](args, path)
        except Exception as err:  # noqa: BLE001 - one line per figure, whatever happens
            emit(name, model=args.model, status="FAILED", error=json.dumps(f"{type(err).__name__}: {err}"[:300]))
        print(f"# {name} on {args.model}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
