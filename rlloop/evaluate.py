"""Evaluation on named eval sets: per `data_source` accuracy, pass@k, maj@k and PRM Best-of-k from ONE set
of samples; during training (`Trainer.evaluate`, every trainer.eval_every steps) and as a command on any
model folder (a run's final `checkpoint/`, an `rlloop export` folder, a hub name):

    python -m rlloop.evaluate model.path=outputs/run/checkpoint task=file task.test_path=test.parquet \\
        +eval.sets.gsm8k=data/gsm8k_test.parquet trainer.eval_samples=8 eval.ks=[1,4,8] \\
        reward.prm.path=/models/Qwen2.5-Math-PRM-7B reward.prm.trust_remote_code=true output_dir=out
    rlloop eval ...                                  (the same)

It takes the training config's overrides (task, model, rollout, reward, eval) and writes `eval_report.json`
(eval.output, default `<output_dir>/eval_report.json`): the flat metrics, per set and source, and every
prompt's samples (correctness, voted answer, PRM score).

The sets and metrics are rlloop.evaluation's (see there).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, List, Optional

from rlloop.evaluation import evaluate_sets, load_eval_sets, resolve_ks
from rlloop.types import Rollout, Sample

logger = logging.getLogger("rlloop.evaluate")


# ----- the command ---------------------------------------------------------------------------------------


class LocalEvaluator:
    """The policy (a rollout worker), the verifiers and the PRM in this process, for `rlloop eval`."""

    def __init__(self, cfg: Any, model_path: str):
        from transformers import AutoTokenizer

        from rlloop.config import to_dict
        from rlloop.rewards.verifiers.worker import VerifierWorkerCore
        from rlloop.rollout.worker import RolloutWorkerCore

        r = cfg.rollout
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.worker = RolloutWorkerCore(
            model_path,
            engine=r.engine,
            dtype=cfg.model.dtype,
            num_threads=r.num_threads,
            seed=cfg.trainer.seed,
            step_delimiter=r.step_delimiter,
            step_regex=r.step_regex,
            **(to_dict(r.vllm) if r.engine == "vllm" else {}),
        )
        self.verifier = VerifierWorkerCore.from_config(cfg.reward.verifier)
        self.prm = None
        p = cfg.reward.prm
        if p.path:  # a PRM given by path scores (whatever the reward preset); an untrained head would not
            from rlloop.rewards.prm.service import PRMScorer

            self.prm = PRMScorer(
                p.path,
                dtype=p.dtype,
                num_threads=p.num_threads,
                batch_size=p.batch_size,
                max_batch_tokens=p.max_batch_tokens,
                device=p.device,
                step_delimiter=r.step_delimiter,
                step_regex=r.step_regex,
                max_length=p.max_length,
                adapter=p.adapter,
                adapter_options=to_dict(p.adapter_options),
                trust_remote_code=p.trust_remote_code,
            )
        self.samples: dict[str, Sample] = {}

    def _prompt(self, s: Sample) -> dict:
        from rlloop.data import render_prompt

        ids = render_prompt(s, self.tokenizer, self.cfg.task)
        return {
            "uid": s.uid,
            "prompt_ids": list(ids),
            "prompt_text": self.tokenizer.decode(ids, skip_special_tokens=False),
            "data_source": s.data_source,
            "ground_truth": s.ground_truth,
        }

    def generate(self, samples: list[Sample], n: int, temperature: float) -> list[Rollout]:
        from rlloop.rewards.verifiers.base import VerifyRequest

        r = self.cfg.rollout
        rollouts: list[Rollout] = []
        for start in range(0, len(samples), max(1, r.max_batch_size // max(n, 1))):
            chunk = samples[start : start + max(1, r.max_batch_size // max(n, 1))]
            rollouts += self.worker.generate(
                [self._prompt(s) for s in chunk],
                n=n,
                max_new_tokens=r.max_new_tokens,
                temperature=temperature,
                top_p=r.top_p,
                seed=self.cfg.trainer.seed + start,
            )
        by_uid = {s.uid: s for s in samples}
        requests = [
            VerifyRequest(
                uid=ro.uid, data_source=ro.data_source, solution_str=ro.text, ground_truth=ro.ground_truth,
                prompt=ro.prompt_text, extra=dict(by_uid[ro.group].extra), raw_prompt=by_uid[ro.group].prompt,
            )
            for ro in rollouts
        ]  # fmt: skip
        for ro, res in zip(rollouts, self.verifier.verify_many(requests), strict=True):
            ro.outcome = {"correct": float(res.score), **{k: float(v) for k, v in res.scores.items()}}
        return rollouts

    def score(self, rollouts: list[Rollout]) -> None:
        assert self.prm is not None
        results = self.prm.score(
            [ro.prompt_text for ro in rollouts],
            [ro.text for ro in rollouts],
            [ro.step_char_ends for ro in rollouts],
        )
        for ro, res in zip(rollouts, results, strict=True):
            ro.step_values = list(res["step_values"])


def _check_model_folder(model_path: str) -> None:
    """A local folder must be an HF model (a DeepSpeed training checkpoint is exported first)."""
    p = Path(model_path)
    if p.is_dir() and not (p / "config.json").is_file():
        from rlloop.errors import ConfigError

        raise ConfigError(
            f"model.path={model_path} has no config.json: not an HF model folder (a training checkpoint "
            "under <run>/checkpoints/ is written as one by `rlloop export`; a run's final policy is <run>/checkpoint)"
        )


def run(cfg: Any, evaluator: Any = None) -> dict[str, Any]:
    """Evaluate `cfg.model` on the eval sets; returns the report (also written to eval.output)."""
    from rlloop.config import Config, to_dict
    from rlloop.models import resolve_model
    from rlloop.tracking import redact
    from rlloop.validate import check_data_sources, check_eval, check_keys, check_verifiers

    t0 = time.perf_counter()
    check_keys(cfg, Config)
    check_eval(cfg)  # a bad k fails before any model loads
    n = int(cfg.trainer.eval_samples)
    sets = load_eval_sets(cfg)
    if not sets:
        from rlloop.errors import ConfigError

        raise ConfigError("nothing to evaluate: the task has no held-out split and eval.sets is empty")
    check_verifiers(cfg.reward.verifier)
    check_data_sources(cfg.reward.verifier, {s.data_source for samples in sets.values() for s in samples})
    model_path = resolve_model(cfg.model, cfg.task)
    _check_model_folder(model_path)
    evaluator = evaluator or LocalEvaluator(cfg, model_path)
    metrics, per_set = evaluate_sets(
        sets,
        evaluator.generate,
        n=n,
        ks=cfg.eval.ks,
        greedy_temperature=cfg.rollout.eval_temperature,
        temperature=cfg.rollout.temperature,
        score=evaluator.score if evaluator.prm is not None else None,
        bon_aggregation=cfg.eval.bon_aggregation,
    )
    report = {
        "model_path": model_path,
        "prm_path": cfg.reward.prm.path if evaluator.prm is not None else None,
        "samples_per_prompt": n,
        "ks": resolve_ks(cfg.eval.ks, n),
        "temperature": cfg.rollout.temperature,
        "greedy_temperature": cfg.rollout.eval_temperature,
        "seconds": time.perf_counter() - t0,
        "metrics": metrics,
        "prompts": {name: [asdict(r) for r in results] for name, results in per_set.items()},
        "config": redact(to_dict(cfg)),  # as the trackers log it: no secrets in a shared report
    }
    out = Path(cfg.eval.output or Path(cfg.output_dir or ".") / "eval_report.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    report["path"] = str(out)
    return report


def format_metrics(metrics: dict[str, float]) -> str:
    return "\n".join(f"{key:48s} {value:.4f}" for key, value in sorted(metrics.items()))


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m rlloop.evaluate [overrides]` / `rlloop eval [overrides]`; exit 2 on bad input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlloop.errors import RlloopError
    from rlloop.train import compose_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    try:
        report = run(compose_config(argv))
    except (RlloopError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
    print(format_metrics(report["metrics"]))
    print(f"report: {report['path']}")


if __name__ == "__main__":
    main()
