"""`python -m rlloop.rollout`: sample verified rollouts from a policy and write them as jsonl.

The output feeds `python -m rlloop.prm_train data.format=rollouts` and Q-RM pair building. Each line
is a `rlloop.types.Rollout` plus `correct` (the verifier's score). With `mc_samples=k > 0`, every step
prefix also gets `k` continuations whose mean verified score becomes its Monte-Carlo step label
(`step_labels`, Math-Shepherd style) for the ScalarPRM baseline.

    python -m rlloop.rollout model=arith-small num_prompts=64 rollout.n=4 out=rollouts.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from rlloop.confdir import conf_dir
from rlloop.config import ModelConfig, RolloutConfig, TaskConfig, VerifierConfig
from rlloop.errors import RlloopError, exit_on_user_error

logger = logging.getLogger("rlloop.rollout")


@dataclass
class RolloutCLIConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    out: str = "rollouts.jsonl"
    split: str = "train"  # train | test
    num_prompts: int = 64  # 0 = the whole split
    mc_samples: int = 0  # continuations per step prefix for Monte-Carlo step labels (0 = none)
    seed: int = 0


ConfigStore.instance().store(name="rollout_cli_schema", node=RolloutCLIConfig)


def verify(rollouts, verifier_cfg) -> None:
    """Score rollouts in this process with the configured verifier (the `code` verifier still runs
    model code only in its sandboxed child process)."""
    from rlloop.rewards.verifiers import VerifyRequest, get_verifier

    for ro in rollouts:
        name = verifier_cfg.sources.get(ro.data_source) or verifier_cfg.sources.get("*")
        if name is None:
            raise RlloopError(f"data_source {ro.data_source!r} has no verifier in verifier.sources")
        options = dict(verifier_cfg.options.get(name, {})) if verifier_cfg.options else {}
        res = get_verifier(name)(
            VerifyRequest(
                uid=ro.uid, data_source=ro.data_source, solution_str=ro.text, ground_truth=ro.ground_truth
            ),
            **options,
        )
        ro.outcome = {"correct": float(res.score), **res.scores}
        ro.outcome_info = res.info()


def mc_step_labels(worker, ro, cfg) -> list[float]:
    """Mean verified score of `mc_samples` continuations from each step prefix (the last step's label is
    the rollout's own outcome)."""
    labels = []
    for k, end in enumerate(ro.step_ends[:-1]):
        prefix_ids = ro.prompt_ids + ro.response_ids[: end + 1]
        prompt = {
            "uid": f"{ro.uid}/mc{k}",
            "prompt_ids": prefix_ids,
            "prompt_text": ro.prompt_text,
            "data_source": ro.data_source,
            "ground_truth": ro.ground_truth,
        }
        conts = worker.generate(
            [prompt],
            n=cfg.mc_samples,
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            seed=cfg.seed + 7 * k,
        )
        head = ro.text[: ro.step_char_ends[k]]
        for c in conts:
            c.text = head + c.text
        verify(conts, cfg.verifier)
        labels.append(sum(c.outcome["correct"] for c in conts) / len(conts))
    return [*labels, ro.outcome["correct"]] if ro.step_ends else []


def run(cfg: DictConfig) -> str:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from rlloop.data import build_datasets, render_prompt
    from rlloop.models import resolve_model
    from rlloop.rollout.worker import RolloutWorkerCore

    if cfg.split not in ("train", "test"):
        raise RlloopError(f"split={cfg.split!r}: choose train or test")
    if cfg.mc_samples < 0 or cfg.num_prompts < 0:
        raise RlloopError("mc_samples and num_prompts must be >= 0")
    torch.manual_seed(cfg.seed)
    train, test = build_datasets(cfg.task)
    samples = train if cfg.split == "train" else test
    if cfg.num_prompts:
        samples = samples[: cfg.num_prompts]
    if not samples:
        raise RlloopError(f"task {cfg.task.name!r}: the {cfg.split} split is empty")
    model_path = resolve_model(cfg.model, cfg.task)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    r = cfg.rollout
    worker = RolloutWorkerCore(
        model_path,
        engine=r.engine,
        dtype=cfg.model.dtype,
        # one process doing every worker's share: the threads of all rollout.num_workers
        num_threads=r.num_threads * r.num_workers,
        seed=cfg.seed,
        step_delimiter=r.step_delimiter,
        step_regex=r.step_regex,
    )
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    tmp = f"{cfg.out}.tmp"
    written = correct = 0
    with open(tmp, "w") as f:
        batch = max(1, r.prompts_per_step)
        for lo in tqdm(range(0, len(samples), batch), desc="rollouts", unit="batch"):
            prompts = []
            for s in samples[lo : lo + batch]:
                ids = render_prompt(s, tokenizer, cfg.task)
                prompts.append(
                    {
                        "uid": s.uid,
                        "prompt_ids": list(ids),
                        "prompt_text": tokenizer.decode(ids),
                        "data_source": s.data_source,
                        "ground_truth": s.ground_truth,
                    }
                )
            rollouts = worker.generate(
                prompts,
                n=r.n,
                max_new_tokens=r.max_new_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                seed=cfg.seed + lo,
            )
            verify(rollouts, cfg.verifier)
            for ro in rollouts:
                row = dataclasses.asdict(ro)
                row["correct"] = ro.outcome["correct"]
                if cfg.mc_samples and ro.step_ends:
                    row["step_labels"] = mc_step_labels(worker, ro, cfg)
                f.write(json.dumps(row) + "\n")
                written += 1
                correct += ro.outcome["correct"] >= 1.0
    os.replace(tmp, cfg.out)
    logger.info(
        "wrote %d rollouts (%.1f%% correct) to %s", written, 100.0 * correct / max(written, 1), cfg.out
    )
    return cfg.out


@hydra.main(version_base=None, config_path=conf_dir(), config_name="rollout_cli")
def _main(cfg: DictConfig) -> None:
    with exit_on_user_error(logger):
        print(run(cfg))


if __name__ == "__main__":
    _main()
