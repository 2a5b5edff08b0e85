"""`python -m rlloop.qrm_pairs`: preference pairs for Q-RM from rlloop's own data — no external data set.

source=rollouts (default): sample `n` completions per prompt of the task from `model`, grade them with
  the math verifier, and pair a correct with a wrong completion of the same prompt.
source=rollouts_file: the same from a jsonl of rlloop rollouts (`prompt_text`, `text`, `group`, and
  `correct` or `outcome`) that a run already wrote.
source=solutions: the `arith` task's worked solutions (chosen) against copies with one wrong number
  (rejected; `corruption=result|copy`) — instant, and the pair records where the error is.

    python -m rlloop.qrm_pairs model=arith-small num_prompts=256 n=8 out_path=/tmp/qrm/pairs.jsonl
    python -m rlloop.qrm_train data.train_path=/tmp/qrm/pairs.jsonl model=arith-small

Each pair's `prompt` is the prompt exactly as the policy sees it (chat template applied), so the Q-RM
trains on the same tokens it scores in RL (`qrm_train data.prompt_format=raw`, the default).
Writes the pairs (jsonl) and `<out_path stem>_summary.json` (rollout accuracy, prompts with both
outcomes, pair count).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from rlloop.config import ModelConfig, TaskConfig
from rlloop.errors import ConfigError, exit_on_user_error

logger = logging.getLogger("rlloop.qrm_pairs")

SOURCES = ("rollouts", "rollouts_file", "solutions")


@dataclass
class QRMPairsConfig:
    # No YAML of its own: this schema is the primary config; `model=tiny`, `task=arith` pick the presets
    # in conf/model, conf/task as for the other entry points.
    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"model": None}, {"task": None}])
    source: str = "rollouts"  # rollouts | rollouts_file | solutions
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    split: str = "train"  # task split the prompts come from: train | test
    num_prompts: int = 256
    n: int = 8  # samples per prompt (source=rollouts)
    max_new_tokens: int = 96
    temperature: float = 1.0
    prompts_per_call: int = 16  # prompts per generate call
    max_pairs_per_prompt: int = 4
    corruption: str = "result"  # source=solutions: result | copy
    rollouts_path: Optional[str] = None  # source=rollouts_file
    out_path: Optional[str] = None  # default: <hydra run dir>/qrm_pairs.jsonl
    seed: int = 0
    num_threads: int = 1


ConfigStore.instance().store(name="rlloop_qrm_pairs_schema", node=QRMPairsConfig)


def _check(cfg: Any) -> None:
    if cfg.source not in SOURCES:
        raise ConfigError(f"source={cfg.source!r}: use one of {list(SOURCES)}")
    if cfg.split not in ("train", "test"):
        raise ConfigError(f"split={cfg.split!r}: use train | test")
    if cfg.source == "rollouts_file" and not cfg.rollouts_path:
        raise ConfigError("source=rollouts_file needs rollouts_path (a jsonl of rlloop rollouts)")
    if cfg.source == "solutions" and cfg.task.name != "arith":
        raise ConfigError(
            f"source=solutions needs task=arith (worked solutions), got task.name={cfg.task.name!r}"
        )
    if cfg.num_prompts < 1 or cfg.n < 2 or cfg.max_pairs_per_prompt < 1:
        raise ConfigError(
            f"num_prompts >= 1, n >= 2 and max_pairs_per_prompt >= 1 needed "
            f"(got {cfg.num_prompts}, {cfg.n}, {cfg.max_pairs_per_prompt})"
        )


def _prompts(cfg: Any, tokenizer) -> tuple[list, list[list[int]], list[str]]:
    """(samples, prompt ids, prompt texts) of the first `num_prompts` samples of the split."""
    from rlloop.data import build_datasets, render_prompt

    train, test = build_datasets(cfg.task)
    samples = (train if cfg.split == "train" else test)[: cfg.num_prompts]
    if not samples:
        raise ConfigError(f"task split {cfg.split!r} has no samples")
    ids = [render_prompt(s, tokenizer, cfg.task) for s in samples]
    texts = [tokenizer.decode(p, skip_special_tokens=False) for p in ids]
    return samples, ids, texts


def sample_verified_rollouts(cfg: Any, model_path: str) -> list[dict]:
    """`n` verified rollouts per prompt: dicts {uid, group, prompt, text, correct, finish_reason}."""
    from tqdm import tqdm

    from rlloop.rewards.verifiers.base import VerifyRequest
    from rlloop.rewards.verifiers.math import verify_math
    from rlloop.rollout.worker import RolloutWorkerCore

    worker = RolloutWorkerCore(model_path, num_threads=cfg.num_threads, seed=cfg.seed)
    samples, ids, texts = _prompts(cfg, worker.tokenizer)
    out = []
    for b in tqdm(range(0, len(samples), cfg.prompts_per_call), desc="rollouts", unit="call"):
        chunk = range(b, min(b + cfg.prompts_per_call, len(samples)))
        prompts = [{"uid": samples[i].uid, "prompt_ids": ids[i], "prompt_text": texts[i]} for i in chunk]
        rollouts = worker.generate(
            prompts,
            n=cfg.n,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed + b,
        )
        gold = {samples[i].uid: samples[i] for i in chunk}
        for ro in rollouts:
            s = gold[ro.group]
            res = verify_math(VerifyRequest(ro.uid, s.data_source, ro.text, s.ground_truth))
            out.append(
                {
                    "uid": ro.uid,
                    "group": ro.group,
                    "prompt": ro.prompt_text,
                    "text": ro.text,
                    "correct": float(res.score),
                    "finish_reason": ro.finish_reason,
                }
            )
    return out


def build(cfg: Any) -> tuple[list[dict], dict]:
    """(pairs, summary) for `cfg.source`."""
    _check(cfg)
    from rlloop.rewards.qrm.data import pairs_from_rollouts, pairs_from_solutions

    summary: dict[str, Any] = {"source": cfg.source}
    if cfg.source == "solutions":
        from transformers import AutoTokenizer

        from rlloop.models import resolve_model
        from rlloop.tasks.arith import split_problems

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model, cfg.task))
        samples, _, texts = _prompts(cfg, tokenizer)
        train, test = split_problems(cfg.task)
        problems = (train if cfg.split == "train" else test)[: len(samples)]
        pairs = pairs_from_solutions(
            problems, texts, seed=cfg.seed, groups=[s.uid for s in samples], kind=cfg.corruption
        )
        summary["num_prompts"] = len(samples)
    else:
        if cfg.source == "rollouts":
            from rlloop.models import resolve_model

            rollouts = sample_verified_rollouts(cfg, resolve_model(cfg.model, cfg.task))
        else:
            from rlloop.rewards.prm.data import load_rollouts

            rollouts = [
                {
                    "group": r["group"] or r["prompt_text"],
                    "prompt": r["prompt_text"],
                    "text": r["response_text"],
                    "correct": r["outcome"],
                    "uid": r["uid"],
                }
                for r in load_rollouts(cfg.rollouts_path)
            ]
        pairs = pairs_from_rollouts(rollouts, max_pairs_per_prompt=cfg.max_pairs_per_prompt, seed=cfg.seed)
        groups: dict[str, list[float]] = {}
        for r in rollouts:
            groups.setdefault(str(r["group"]), []).append(float(r["correct"]) > 0.5)
        summary.update(
            num_rollouts=len(rollouts),
            num_prompts=len(groups),
            rollout_accuracy=sum(sum(g) for g in groups.values()) / max(1, len(rollouts)),
            prompts_with_both_outcomes=sum(1 for g in groups.values() if any(g) and not all(g)),
        )
    summary["num_pairs"] = len(pairs)
    return pairs, summary


def _main(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rlloop.rewards.qrm.data import write_pairs

    out_path = cfg.out_path or os.path.join(HydraConfig.get().runtime.output_dir, "qrm_pairs.jsonl")
    t0 = time.perf_counter()
    with exit_on_user_error(logger):
        pairs, summary = build(cfg)
    if not pairs:
        logger.error("error: no pairs: no prompt had both a correct and a wrong completion (%s)", summary)
        sys.exit(2)
    write_pairs(pairs, out_path)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    Path(out_path).with_name(Path(out_path).stem + "_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    print(f"pairs: {out_path}")


def main() -> None:
    import hydra

    from rlloop.confdir import conf_dir

    config_path = conf_dir()
    hydra.main(version_base=None, config_path=config_path, config_name="rlloop_qrm_pairs_schema")(_main)()


if __name__ == "__main__":
    main()
