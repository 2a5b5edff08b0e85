"""`python -m rlloop.train [overrides]` (also `rlloop-train`): one RL run, configured by Hydra.

With no arguments it trains the built-in `arith-small` model (pretraining it first if not cached) on
the built-in `arith` task, on a local Ray cluster, and prints held-out accuracy before and after.

Bad input (config, data, model or PRM paths, reward functions, the resume checkpoint) is caught by
`preflight` before Hydra creates or writes the run folder, and reported as one line naming the culprit
(exit code 2): rerunning with a typo into an existing run's folder leaves that run untouched.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlloop.confdir import conf_dir
from rlloop.config import register_configs
from rlloop.errors import ConfigError, RlloopError, exit_on_user_error

logger = logging.getLogger("rlloop.train")

CONF_DIR = conf_dir()  # the checkout's conf/, or an installed wheel's copy of it

register_configs()


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/config.yaml with `overrides`, as `python -m rlloop.train <overrides>` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def preflight(cfg: Any, run_dir: str | None = None) -> None:
    """Check everything the user gave that needs no actor; RlloopError naming the culprit otherwise.

    Config values and reward functions (validate_config), data sets and their data sources, the model
    and PRM folders, prompt lengths against the model's context (task.overlong_prompts), and the checkpoint to resume (looked up
    under `output_dir` or `run_dir`, the hydra.run.dir). Builds a built-in model on first use (cached, so
    the run itself reuses it).
    """
    from rlloop import checkpoint
    from rlloop.data import build_datasets
    from rlloop.data.check import check_task_golds
    from rlloop.data.loader import fit_prompt_lengths, max_positions
    from rlloop.distributed.placement import preflight_check
    from rlloop.models import resolve_model
    from rlloop.validate import check_data_sources, validate_config

    validate_config(cfg)
    preflight_check(cfg)  # cluster.*: more CPUs/GPUs than the local cluster will have
    # Cheap checks first: a bad path fails in a second, before data sets are built or a model pretrained.
    key = "model.path" if cfg.model.path else f"model={cfg.model.name}"
    if cfg.model.path:
        _check_model_folder(resolve_model(cfg.model, cfg.task), key, tokenizer=False)
    prm = cfg.reward.prm
    if prm.enabled and prm.path:
        # the PRM service tokenizes with the PRM folder's own tokenizer (steps map through text offsets)
        _check_model_folder(prm.path, "reward.prm.path")
    out_dir = cfg.output_dir or run_dir
    resume = None
    if cfg.trainer.resume and (out_dir or cfg.trainer.resume != "auto"):
        resume = checkpoint.find(cfg.trainer.resume, Path(out_dir or ".") / "checkpoints")
    train, test = build_datasets(cfg.task)
    if not train:
        raise ConfigError(f"task {cfg.task.name!r}: the training set is empty")
    check_data_sources(cfg.reward.verifier, {s.data_source for s in train + test})
    check_task_golds(cfg.task, cfg.reward.verifier, train, test)  # unverifiable golds: warn or raise
    model_path = resolve_model(cfg.model, cfg.task)
    tokenizer = _check_model_folder(model_path, key)
    for split, samples in (("train", train), ("test", test)):
        kept = fit_prompt_lengths(
            samples,
            tokenizer,
            cfg.task,
            max_new_tokens=cfg.rollout.max_new_tokens,
            context=max_positions(model_path),
            split=split,
        )
        if samples and not kept:
            raise ConfigError(
                f"every {split} prompt is too long for the model with rollout.max_new_tokens="
                f"{cfg.rollout.max_new_tokens} (task.overlong_prompts={cfg.task.overlong_prompts})"
            )
    if resume is not None:
        checkpoint.load_state(
            resume, fingerprint=checkpoint.model_identity(model_path), total_steps=cfg.trainer.total_steps
        )


def _check_model_folder(path: str, key: str, *, tokenizer: bool = True) -> Any:
    """A local HF folder has a parseable config.json and weights; returns the tokenizer (when asked).

    A policy given by hub name (`model.path=org/model`) arrives here as the local folder resolve_model
    fetched it into.
    """
    from rlloop.models import ModelError

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{key}={path} does not exist")
    if not (p / "config.json").is_file():
        raise ModelError(f"{key}={path} is a folder without config.json (not an HF model folder)")
    try:
        json.loads((p / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelError(f"{key}={path}: config.json is not valid JSON ({err})") from None
    weights = (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )
    if not any((p / w).is_file() for w in weights):
        raise ModelError(f"{key}={path} has no weights (none of {', '.join(weights)})")
    if not tokenizer:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        raise ModelError(f"{key}={path}: cannot load its tokenizer ({type(err).__name__}: {err})") from None


def input_error(argv: list[str]) -> str | None:
    """The one-line error for bad input in `argv` (command-line overrides), or None when all checks pass.

    Arguments with Hydra flags (--cfg, --multirun, ...) are left to Hydra (None); their jobs still run
    validate_config before any actor starts.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in argv):
        return None
    try:
        run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
        preflight(compose_config(argv), run_dirs[-1] if run_dirs else None)
    except (RlloopError, FileNotFoundError) as err:
        return f"error: {err}"
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra's wording keeps the key (e.g. "Key 'bogus' not in 'AlgoConfig'") but spreads it over lines
        parts = [str(err), str(err.__cause__ or "").split("\n    reference_type=")[0]]
        return "error: " + " ".join(" ".join(p.split()) for p in parts if p)
    return None


def _restart_cfg(cfg: DictConfig, out_dir: str) -> DictConfig:
    """The config of a restarted attempt: resume from the run's newest complete checkpoint, or from what
    the user resumed from, or from scratch (then the failed attempt's metrics are dropped)."""
    from rlloop import checkpoint
    from rlloop.loop import truncate_metrics

    again = copy.deepcopy(cfg)
    if checkpoint.list_complete(Path(out_dir) / "checkpoints"):
        again.trainer.resume = "auto"
    elif not cfg.trainer.resume:
        truncate_metrics(Path(out_dir) / "metrics.jsonl", -1)
    return again


def run(cfg: DictConfig, out_dir: str) -> dict:
    """Build the actors, train, evaluate and save; returns a summary dict.

    A learner rank that dies or hangs takes its DeepSpeed group down (its peers wait in collectives);
    the run then shuts every actor down and restarts from its last complete checkpoint, at most
    trainer.max_restarts times. Rollout workers, verifiers and PRM replicas are restarted in place by
    the controller instead (trainer.max_actor_restarts).
    """
    from rlloop.controller import Trainer
    from rlloop.learner.group import LearnerError

    restarts: list[dict[str, Any]] = []
    attempt_cfg = cfg
    while True:
        trainer = Trainer(attempt_cfg, out_dir)
        if restarts:
            restarts[-1]["recover_s"] = round(time.monotonic() - restarts[-1].pop("_t"), 1)
            restarts[-1]["resumed_at_step"] = trainer.step
            logger.warning(
                "restart %d: back up at step %d after %.1f s",
                len(restarts),
                trainer.step,
                restarts[-1]["recover_s"],
            )
        try:
            summary = trainer.run()
            if restarts:
                summary["restarts"] = restarts
                (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
            return summary
        except LearnerError as err:
            if not err.lost or len(restarts) >= cfg.trainer.max_restarts:
                if err.lost:
                    logger.error("learner lost again after %d restart(s): giving up", len(restarts))
                raise
            # Ray's death notices run to a paragraph; the first line names the rank, the method and the cause
            error = str(err).splitlines()[0]
            restarts.append({"step": trainer.step, "error": error, "_t": time.monotonic()})
            logger.error(
                "step %d: %s; restarting the run from its last complete checkpoint (%d of at most %d)",
                trainer.step,
                error,
                len(restarts),
                cfg.trainer.max_restarts,
            )
        finally:
            trainer.shutdown()
        attempt_cfg = _restart_cfg(cfg, out_dir)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    out_dir = cfg.output_dir or HydraConfig.get().runtime.output_dir
    # The user's input is wrong: one clear line naming the culprit, no traceback.
    with exit_on_user_error(logger), logging_redirect_tqdm():
        OmegaConf.save(cfg, f"{out_dir}/config_resolved.yaml", resolve=True)
        summary = run(cfg, out_dir)
    logger.debug("summary: %s", json.dumps(summary))  # also <out_dir>/summary.json
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before is not None and after is not None:
        line = f"held-out accuracy: before {before:.3f} -> after {after:.3f} (greedy)"
        sb, sa = summary.get("eval_before_sampled"), summary.get("eval_after_sampled")
        if sb is not None and sa is not None:
            line += f"; sampled at the training temperature: {sb:.3f} -> {sa:.3f}"
        pb, pa = summary.get("eval_before_pass_at_k"), summary.get("eval_after_pass_at_k")
        if pb is not None and pa is not None:
            line += f"; pass@{cfg.trainer.eval_samples}: {pb:.3f} -> {pa:.3f}"
        print(line)
    print(f"outputs: {out_dir}  (metrics.jsonl, training.png, checkpoint/)")


def main() -> None:
    error = input_error(sys.argv[1:])
    if error is not None:
        print(error, file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
