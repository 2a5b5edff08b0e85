"""PRM quality on the built-in `arith` task: TD(0)-PRM vs ScalarPRM trained on the same rollouts.

Samples rollouts from `arith-small` (HF engine, temperature 1) on train and held-out test prompts, verifies
them (the `\\boxed{}` integer against the ground truth), writes them in rlloop's rollout format (what
`rlloop.prm_train data.format=rollouts` reads), trains two PRMs from the policy's backbone with fresh
value heads — TD(0) (γ = 0.8) and ScalarPRM (every step's target = the outcome, `td=mc`) — with identical
settings, and reports on the held-out rollouts: AUROC of V_last against the verified outcome, V_last
accuracy, and smoothness (mean |V_{k+1} - V_k|, lower is smoother).

    python benchmarks/prm_quality.py --out /tmp/prm_quality      # ~10-20 min on 2 CPU cores

Results go to `<out>/prm_quality.json` and are copied by hand into benchmarks/RESULTS.md ("## PRM quality").
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

logger = logging.getLogger("prm_quality")


def verified(text: str, ground_truth: str) -> float:
    """1.0 iff the last `\\boxed{}` of `text` is the integer `ground_truth`."""
    from rlloop.rewards.verifiers.math import last_boxed

    got = last_boxed(text)
    try:
        return float(got is not None and int(got.replace(",", "").strip()) == int(ground_truth))
    except ValueError:
        return 0.0


def sample_rollouts(
    model_path: str,
    samples,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_prompts: int = 16,
    num_threads: int = 2,
) -> list[dict]:
    """Rollouts (as dicts of `Rollout` fields + `correct`) of `samples`, `n` per prompt; empty ones dropped."""
    from rlloop.config import TaskConfig
    from rlloop.data import render_prompt
    from rlloop.rollout.worker import RolloutWorkerCore

    worker = RolloutWorkerCore(model_path, engine="hf", num_threads=num_threads, seed=seed)
    task_cfg = TaskConfig()
    out = []
    for lo in range(0, len(samples), batch_prompts):
        chunk = samples[lo : lo + batch_prompts]
        prompts = []
        for s in chunk:
            ids = render_prompt(s, worker.tokenizer, task_cfg)
            prompts.append(
                {
                    "uid": s.uid,
                    "prompt_ids": ids,
                    "ground_truth": s.ground_truth,
                    "data_source": "arith",
                    "prompt_text": worker.tokenizer.decode(ids, skip_special_tokens=False),
                }
            )
        for r in worker.generate(
            prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + lo
        ):
            if not r.step_char_ends:
                continue
            row = asdict(r)
            row["correct"] = verified(r.text, r.ground_truth)
            out.append(row)
        logger.info("sampled %d/%d prompts", min(lo + batch_prompts, len(samples)), len(samples))
    return out


def train_and_eval(
    model_path: str,
    train_rows: list[dict],
    eval_rows: list[dict],
    *,
    td: str,
    lr: float,
    epochs: int,
    batch_size: int,
    gamma: float,
    seed: int,
) -> dict:
    """Train a PRM (fresh head on the policy backbone) on `train_rows`; metrics on `eval_rows` (held out)."""
    from transformers import AutoTokenizer

    from rlloop.rewards.prm.model import ValueHeadModel
    from rlloop.rewards.prm.td_trainer import TDPRMTrainer

    torch.manual_seed(seed)
    model = ValueHeadModel.from_backbone(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    trainer = TDPRMTrainer(
        model, tok, lr=lr, td=td, gamma=gamma, micro_batch_size=batch_size, weight_decay=0.001
    )

    def cols(rows):
        return (
            [r["prompt_text"] for r in rows],
            [r["text"] for r in rows],
            [r["step_char_ends"] for r in rows],
            [r["correct"] for r in rows],
        )

    rng = random.Random(seed)
    order = list(range(len(train_rows)))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        rng.shuffle(order)
        for lo in range(0, len(order), batch_size):
            m = trainer.step(*cols([train_rows[i] for i in order[lo : lo + batch_size]]))
        logger.info("%s epoch %d: last batch %s", td, epoch, {k: round(v, 4) for k, v in m.items()})
    return {
        "td": td,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "train": trainer.evaluate(*cols(train_rows)),
        "heldout": trainer.evaluate(*cols(eval_rows)),
    }


def run(
    *,
    out: str,
    train_prompts: int,
    eval_prompts: int,
    n: int,
    max_new_tokens: int,
    temperature: float,
    epochs: int,
    lr: float,
    batch_size: int,
    gamma: float,
    seed: int,
    model_name: str = "arith-small",
) -> dict:
    from rlloop.config import ModelConfig, TaskConfig
    from rlloop.models import resolve_model
    from rlloop.tasks.arith import make_splits

    torch.set_num_threads(2)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(ModelConfig(name=model_name), TaskConfig())
    train_samples, test_samples = make_splits(TaskConfig())
    t0 = time.perf_counter()
    train_rows = sample_rollouts(
        model_path,
        train_samples[:train_prompts],
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    eval_rows = sample_rollouts(
        model_path,
        test_samples[:eval_prompts],
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed + 10_000,
    )
    sample_s = time.perf_counter() - t0
    for name, rows in (("train_rollouts.jsonl", train_rows), ("heldout_rollouts.jsonl", eval_rows)):
        (out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {
        "model": model_name,
        "settings": {
            "train_prompts": train_prompts,
            "eval_prompts": eval_prompts,
            "n": n,
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "gamma": gamma,
            "seed": seed,
        },
        "rollouts": {
            "train": len(train_rows),
            "heldout": len(eval_rows),
            "train_accuracy": sum(r["correct"] for r in train_rows) / len(train_rows),
            "heldout_accuracy": sum(r["correct"] for r in eval_rows) / len(eval_rows),
            "mean_steps": sum(len(r["step_char_ends"]) for r in train_rows) / len(train_rows),
            "sample_seconds": round(sample_s, 1),
        },
    }
    for td in ("td0", "mc"):
        result[td] = train_and_eval(
            model_path,
            train_rows,
            eval_rows,
            td=td,
            lr=lr,
            epochs=epochs,
            batch_size=batch_size,
            gamma=gamma,
            seed=seed,
        )
    (out_dir / "prm_quality.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/prm_quality")
    ap.add_argument("--train-prompts", type=int, default=128)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gamma", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = run(
        out=args.out,
        train_prompts=args.train_prompts,
        eval_prompts=args.eval_prompts,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        gamma=args.gamma,
        seed=args.seed,
    )
    print(json.dumps({k: res[k] for k in ("rollouts",)}, indent=2))
    for td in ("td0", "mc"):
        h = res[td]["heldout"]
        print(
            f"{td:5s} held-out: AUROC(V_last) {h.get('prm/auroc', float('nan')):.3f}  "
            f"V_last acc {h['prm/v_last_acc']:.3f}  smoothness {h['prm/smoothness']:.4f}"
        )


if __name__ == "__main__":
    main()
