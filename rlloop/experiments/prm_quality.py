"""Experiment 2, PRM quality on the built-in `arith` task: TD(0) / n-step / TD(λ) vs ScalarPRM, same rollouts.

Samples rollouts from the policy (`arith-small` by default, HF engine, temperature 1) on train and held-out
test prompts, verifies them (the `\\boxed{}` integer against the ground truth), writes them in rlloop's
rollout format (what `rlloop.prm_train data.format=rollouts` reads), trains one PRM per kind from the
policy's backbone with a fresh value head and identical settings — TD(0), n-step and TD(λ) (γ = 0.8), and
the ScalarPRM baseline (every step's target = the outcome, `td=mc`) — saves each as a PRM folder (what
`reward.prm.path` loads), and reports on the held-out rollouts: AUROC of V_last against the verified
outcome, V_last accuracy, smoothness (mean |V_{k+1} - V_k|, lower is smoother), and Best-of-N accuracy
at N = 1, 4, 16 (pick the sample with the highest V_last among the first N of each prompt), next to
majority vote and pass@N.

    python -m rlloop.experiments.prm_quality --out outputs/experiments/prm_quality   # ~15-30 min, 2 cores

Results: `<out>/prm_quality.json`, `<out>/prm_quality.md`; the trained PRMs under `<out>/prms/<kind>/`.
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

logger = logging.getLogger(__name__)

KINDS = ("td0", "nstep", "td_lambda", "mc")
BON_N = (1, 4, 16)


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
    save_dir: Path | None = None,
) -> dict:
    """Train a PRM (fresh head on the policy backbone) on `train_rows`; metrics and Best-of-N on
    `eval_rows` (held out); saved (with the policy's tokenizer) to `save_dir` when given."""
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
    train_s = time.perf_counter() - t0
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(save_dir))
        tok.save_pretrained(str(save_dir))
    values = trainer.step_values(*cols(eval_rows)[:3])
    return {
        "td": td,
        "train_seconds": round(train_s, 1),
        "train": trainer.evaluate(*cols(train_rows)),
        "heldout": trainer.evaluate(*cols(eval_rows)),
        "best_of_n": best_of_n(eval_rows, [v[-1] for v in values]),
        "path": str(save_dir) if save_dir is not None else None,
    }


def best_of_n(rows: list[dict], scores: list[float], ns: tuple[int, ...] = BON_N) -> dict[str, float]:
    """Accuracy of picking, per prompt, the highest-scored of its first N samples (ties: the first).

    Also majority vote over the first N answers and pass@N (any of them correct), the ceiling of any
    selection. Prompts with fewer than N samples are left out of that N.
    """
    from rlloop.search.aggregate import majority_vote
    from rlloop.search.bon import extract_answer

    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.get("group", r["uid"]), []).append(i)  # rollouts of one prompt share `group`
    out: dict[str, float] = {}
    for n in ns:
        picked, voted, any_ok, count = 0.0, 0.0, 0.0, 0
        for idx in groups.values():
            if len(idx) < n:
                continue
            first = idx[:n]
            best = max(first, key=lambda i: (scores[i], -i))
            picked += rows[best]["correct"]
            answers = [extract_answer(rows[i]["text"]) for i in first]
            vote = majority_vote(answers)
            voted += rows[first[vote]]["correct"] if vote is not None else 0.0
            any_ok += float(any(rows[i]["correct"] for i in first))
            count += 1
        if count:
            out[f"bon@{n}"] = picked / count
            out[f"vote@{n}"] = voted / count
            out[f"pass@{n}"] = any_ok / count
            out[f"prompts@{n}"] = float(count)
    return out


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
    eval_n: int = 16,
    kinds: tuple[str, ...] = KINDS,
    model_overrides: dict | None = None,
) -> dict:
    from rlloop.config import ModelConfig, TaskConfig
    from rlloop.models import resolve_model
    from rlloop.tasks.arith import make_splits

    torch.set_num_threads(2)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    task_cfg = TaskConfig()  # the arith-small build and the train/test problems share it
    model_path = resolve_model(ModelConfig(name=model_name, **(model_overrides or {})), task_cfg)
    train_samples, test_samples = make_splits(task_cfg)
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
        n=eval_n,
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
            "eval_n": eval_n,
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
    result["model_path"] = model_path
    for td in kinds:
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
            save_dir=out_dir / "prms" / td,
        )
    (out_dir / "prm_quality.json").write_text(json.dumps(result, indent=2))
    (out_dir / "prm_quality.md").write_text(markdown(result) + "\n")
    return result


NAMES = {
    "td0": "TD(0)",
    "nstep": "n-step (n=2)",
    "td_lambda": "TD(λ=0.7)",
    "mc": "ScalarPRM (outcome labels)",
}


def markdown(result: dict) -> str:
    """The held-out table: one row per PRM kind."""
    ns = [n for n in BON_N if f"bon@{n}" in next(iter(result[k] for k in KINDS if k in result))["best_of_n"]]
    head = "| PRM | AUROC(V_last) | V_last acc | smoothness | " + " | ".join(f"BoN@{n}" for n in ns) + " |"
    lines = [head, "|" + "---|" * (4 + len(ns))]
    for k in KINDS:
        if k not in result:
            continue
        h, b = result[k]["heldout"], result[k]["best_of_n"]
        lines.append(
            f"| {NAMES[k]} | {h.get('prm/auroc', float('nan')):.3f} | {h['prm/v_last_acc']:.3f} | "
            f"{h['prm/smoothness']:.4f} | " + " | ".join(f"{b[f'bon@{n}']:.3f}" for n in ns) + " |"
        )
    any_b = next(result[k]["best_of_n"] for k in KINDS if k in result)
    lines.append(
        "| majority vote (no PRM) | | | | " + " | ".join(f"{any_b[f'vote@{n}']:.3f}" for n in ns) + " |"
    )
    lines.append("| pass@N (ceiling) | | | | " + " | ".join(f"{any_b[f'pass@{n}']:.3f}" for n in ns) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="outputs/experiments/prm_quality")
    ap.add_argument(
        "--model", default="arith-small", help="built-in model name (arith-small | tiny | smollm2)"
    )
    ap.add_argument("--eval-n", type=int, default=16, help="samples per held-out prompt (Best-of-N up to it)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="PRM kinds to train, comma-separated")
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
        model_name=args.model,
        eval_n=args.eval_n,
        kinds=tuple(k for k in args.kinds.split(",") if k),
    )
    print(json.dumps({k: res[k] for k in ("rollouts",)}, indent=2))
    print(markdown(res))


if __name__ == "__main__":
    main()
