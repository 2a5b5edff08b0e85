"""Supervised pretraining of the built-in models on their task's worked solutions (`python -m rlloop.sft`).

`chain-small` learns `chain` from a teacher with known misconceptions (rlloop/tasks/chain.py): it ends
preferring some wrong results while sampling the right ones often, the room RL is meant to use.
`arith-small` learns `arith` and is stopped early on purpose. Each learns the solution format (steps
separated by blank lines, a final `\\boxed{}`); the end of pretraining prints held-out greedy, sampled
and pass@8 accuracy.
Training runs through DeepSpeed ZeRO at world size 1 (the same engine the learner uses); the loss
covers only the solution tokens (and the closing EOS), never the prompt.

    python -m rlloop.sft                       # build the default model (chain-small) into the cache
    python -m rlloop.sft output_dir=/tmp/as model.sft_steps=300 task.max_digits=3
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from rlloop.models.builders import BUILD_VERSION, arch_fields, llama_config, save_model
from rlloop.models.tokenizer import build_tokenizer
from rlloop.tasks import BUILTIN, arith
from rlloop.types import Sample

logger = logging.getLogger(__name__)

PASS_K = 8  # sampled answers per held-out prompt at the end of pretraining (pass@k)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def encode_example(sample: Sample, tokenizer, task_cfg: Any) -> tuple[list[int], int]:
    """(prompt + solution + EOS token ids, number of prompt tokens) for one sample with a solution."""
    from rlloop.data import render_prompt

    prompt_ids = render_prompt(sample, tokenizer, task_cfg)
    solution_ids = tokenizer(sample.extra["solution"], add_special_tokens=False).input_ids
    return prompt_ids + solution_ids + [tokenizer.eos_token_id], len(prompt_ids)


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` [B, T]; labels are -100 on prompt and pad."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(examples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        labels[b, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def length_grouped(perm: list[int], lengths: list[int], batch_size: int, rng: random.Random, window: int = 16) -> list[int]:
    """`perm` reordered so that each run of `batch_size` indices holds examples of similar length: every
    window of `window` batches is sorted by length and cut into batches, whose order is then shuffled.
    A padded batch costs its longest row times its rows; on chain's corpus random batches are 74 % tokens
    and 26 % padding, grouped ones nearly all tokens."""
    out: list[int] = []
    span = window * batch_size
    for start in range(0, len(perm), span):
        chunk = sorted(perm[start : start + span], key=lambda i: lengths[i])
        batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        out += [i for b in batches for i in b]
    return out


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    samples: list[Sample],
    task_cfg: Any,
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 96,
    batch_size: int = 100,
    seed: int = 0,
    k: int = 1,
) -> dict[str, float]:
    """Accuracy (boxed answer == ground truth) and well-formed rate of generations on `samples`.

    With `k` > 1 (sampling), each prompt gets k answers: `accuracy` is their mean (pass@1 of the
    sampling distribution) and `pass_at_k` the share of prompts with at least one right answer.
    """
    from rlloop.data import render_prompt

    model.eval()
    torch.manual_seed(seed)
    correct = formed = hit = 0
    pad = tokenizer.pad_token_id
    rows = max(1, batch_size // k)
    for i in range(0, len(samples), rows):
        chunk = samples[i : i + rows]
        prompts = [render_prompt(s, tokenizer, task_cfg) for s in chunk for _ in range(k)]
        T = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])  # left pad for generate
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        kw = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **kw,
        )
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, T:].tolist()]
        for j, s in enumerate(chunk):
            right = [arith.boxed_answer(t) == s.ground_truth for t in texts[j * k : (j + 1) * k]]
            correct += sum(right)
            hit += any(right)
            formed += sum(arith.is_well_formed(t) for t in texts[j * k : (j + 1) * k])
    n = max(1, len(samples))
    out = {"accuracy": correct / (n * k), "well_formed": formed / (n * k)}
    if k > 1:
        out["pass_at_k"] = hit / n
    return out


def pretrain_builtin(
    model_cfg: Any, task_cfg: Any, out_dir: str, *, progress: bool = True, eval_every: int = 0
) -> dict:
    """Train a built-in model from scratch on the worked solutions of the built-in task `task_cfg.name`
    (`rlloop.tasks.BUILTIN[...].sft_corpus`) and save it (model + tokenizer) to `out_dir`.

    Returns metrics: final training loss, wall time, held-out accuracy (greedy, and T=1 sampled with
    `PASS_K` answers per prompt: mean accuracy and pass@PASS_K) and the well-formed rate. `eval_every`
    > 0 also logs greedy accuracy on 100 held-out problems every that many steps (for choosing
    `model.sft_steps`).
    """
    from tqdm.auto import tqdm

    from rlloop.models.ds_engine import build_ds_engine, destroy_distributed

    t0 = time.time()
    torch.set_num_threads(int(os.environ.get("RLLOOP_SFT_THREADS", os.cpu_count() or 1)))
    seed = int(_get(task_cfg, "seed", 0))
    torch.manual_seed(seed)
    rng = random.Random(seed)

    task = BUILTIN[task_cfg.name]
    test = task.make_splits(task_cfg)[1]
    train = task.sft_corpus(task_cfg, exclude={s.prompt for s in test})
    tokenizer = build_tokenizer(
        (s.prompt + "\n" + s.extra["solution"] for s in train[:5000]), vocab_size=int(model_cfg.vocab_size)
    )
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(model_cfg, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    steps, batch_size = int(model_cfg.sft_steps), int(model_cfg.sft_batch_size)
    examples = [encode_example(s, tokenizer, task_cfg) for s in train]
    # evaluation's room: the longest worked solution trained on, + slack for a longer wrong one (a fixed
    # 96 tokens cut 16-step chains short and counted them as wrong)
    budget = max(len(ids) - n_prompt for ids, n_prompt in examples) + 16
    too_long = [
        s.uid
        for s, (ids, _) in zip(train, examples, strict=True)
        if len(ids) > model_cfg.max_position_embeddings
    ]
    if too_long:
        raise ValueError(
            f"{len(too_long)} {task_cfg.name} examples (e.g. {too_long[0]}) exceed model.max_position_embeddings="
            f"{model_cfg.max_position_embeddings}; raise it or lower the task's max_ops/max_digits"
        )
    logger.info(
        "SFT %s: %.2f M params, %d steps x %d sequences, %d train problems",
        model_cfg.name,
        n_params / 1e6,
        steps,
        batch_size,
        len(examples),
    )
    engine = build_ds_engine(
        model,
        lr=float(model_cfg.sft_lr),
        zero_stage=2,
        micro_batch_size=batch_size,
        grad_clip=1.0,
        weight_decay=0.01,
        betas=(0.9, 0.98),
        total_steps=steps,
        warmup_steps=max(1, steps // 20),
    )
    engine.train()
    order: list[int] = []
    lengths = [len(ids) for ids, _ in examples]
    group = bool(_get(model_cfg, "sft_group_by_length", False))
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"pretraining {model_cfg.name}", disable=not progress, mininterval=2.0)
    for step in bar:
        if len(order) < batch_size:  # epochs over a reshuffled training set
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += length_grouped(perm, lengths, batch_size, rng) if group else perm
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            acc = evaluate(engine.module, tokenizer, test[:100], task_cfg, max_new_tokens=budget)
            engine.train()
            logger.info("step %d: loss %.3f, held-out greedy %s", step + 1, losses[-1], acc)
    train_s = time.time() - t0
    destroy_distributed()

    model = engine.module
    model.eval()
    window = max(1, min(20, steps // 4))  # non-overlapping loss averages at the start and the end
    greedy = evaluate(model, tokenizer, test, task_cfg, temperature=0.0, max_new_tokens=budget)
    sampled = evaluate(
        model, tokenizer, test, task_cfg, temperature=1.0, seed=seed, k=PASS_K, max_new_tokens=budget
    )
    metrics = {
        "params_m": n_params / 1e6,
        "sft_steps": steps,
        "first_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "train_wall_s": train_s,
        "test_acc_greedy": greedy["accuracy"],
        "test_well_formed_greedy": greedy["well_formed"],
        "test_acc_sampled_t1": sampled["accuracy"],
        "test_well_formed_sampled_t1": sampled["well_formed"],
        f"test_pass_at_{PASS_K}_t1": sampled["pass_at_k"],
        "num_test": len(test),
    }
    metrics["total_wall_s"] = time.time() - t0
    meta = {
        "name": model_cfg.name,
        "version": BUILD_VERSION,
        **arch_fields(model_cfg),
        "task": {"name": task_cfg.name, **task.knobs(task_cfg)},
        "metrics": metrics,
    }
    save_model(model, tokenizer, out_dir, meta)
    (Path(out_dir) / "sft_metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("SFT done: %s", json.dumps(metrics))
    # the demo's first chapter: how much room the pretrained model leaves RL (stdout, not a log line)
    print(
        f"pretrained {model_cfg.name} in {metrics['total_wall_s']:.0f} s: held-out ({len(test)} problems) "
        f"greedy {greedy['accuracy']:.3f}, sampled {sampled['accuracy']:.3f}, "
        f"pass@{PASS_K} {sampled['pass_at_k']:.3f}",
        flush=True,
    )
    return metrics


def _main(cfg: Any) -> None:
    from rlloop.models import resolve_model

    # DeepSpeed probes for libaio with a test compile that setuptools' compiler logs line by line
    logging.getLogger("compilers").setLevel(logging.WARNING)

    if cfg.output_dir:  # train into an explicit folder (no cache)
        pretrain_builtin(cfg.model, cfg.task, cfg.output_dir)
        return
    logger.info("%s is at %s", cfg.model.name, resolve_model(cfg.model, cfg.task))


def main() -> None:
    """Hydra entry point (`python -m rlloop.sft`, `rlloop-sft`) over the project's conf/ tree."""
    import hydra

    from rlloop.confdir import conf_dir
    from rlloop.config import register_configs

    register_configs()
    config_path = conf_dir()
    hydra.main(version_base=None, config_path=config_path, config_name="config")(_main)()


if __name__ == "__main__":
    main()
