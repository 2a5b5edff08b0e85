"""`python -m rlloop.verify_reward [--rows N] [--split train|test] [--solution TEXT] [--completions FILE]
[overrides]`: a dry run of the configured reward, before training with it.

Takes the same overrides as `rlloop.train` (e.g. `task=file task.train_path=data/train.parquet
reward.verifier.custom_fn=my_reward.py:score`). Scores the first N rows of the task's data (default 8)
exactly as a training step would (same routing, options, batching and time limits, in this process):

- by default each row's gold answer is the completion, written into `--solution` (default
  `The answer is \\boxed{{gold}}.`; `{gold}` is replaced), so a correct reward should give the maximum;
- with `--completions FILE` (jsonl with a `completion` column, and a `uid` column to match rows; else
  by order), those completions are scored instead.

Prints one line per row (uid, score, named scores, reason) and the mean. Exit status: 0 when every row
was scored, 1 when the reward could not judge some row (an exception, a timeout, a None), 2 for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

from rlloop.rewards.verifiers.base import VerifyRequest, VerifyResult

DEFAULT_SOLUTION = "The answer is \\boxed{{gold}}."
_CHUNK = 16  # the pool's largest call: a batched reward function sees batches of this size at most


def _completions(path: str, uids: List[str]) -> List[str]:
    from rlloop.data.loader import DataError, jsonl_rows

    rows = jsonl_rows(Path(path).expanduser())
    if not all(isinstance(r, dict) and isinstance(r.get("completion"), str) for _, r in rows):
        raise DataError(f"{path}: every line needs a 'completion' text column")
    by_uid = {str(r["uid"]): r["completion"] for _, r in rows if r.get("uid") is not None}
    if by_uid:
        missing = [u for u in uids if u not in by_uid]
        if missing:
            raise DataError(f"{path}: no completion for uid(s) {missing[:5]}")
        return [by_uid[u] for u in uids]
    if len(rows) < len(uids):
        raise DataError(f"{path}: {len(rows)} completions for {len(uids)} rows (add a 'uid' column to match)")
    return [r["completion"] for _, r in rows[: len(uids)]]


def _prompt_renderer(cfg: Any) -> Callable[[Any], str]:
    """sample -> the prompt text the model would see (the tokenizer loaded once, when one is needed)."""
    from rlloop.check_data import _OWN_TEMPLATE, rendered_prompt
    from rlloop.data.loader import prompt_text, uses_chat_template

    if not uses_chat_template(cfg.task) or (not cfg.model.path and cfg.model.name in _OWN_TEMPLATE):
        return lambda s: rendered_prompt(s, cfg)
    from transformers import AutoTokenizer

    from rlloop.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model, cfg.task))
    return lambda s: prompt_text(s, tokenizer, cfg.task)


def verify(
    cfg: Any, *, rows: int, split: str, solution: str, completions: Optional[str]
) -> List[VerifyResult]:
    """Score the first `rows` samples of `split` with cfg.reward.verifier; results in row order."""
    from rlloop.data import build_datasets
    from rlloop.rewards.verifiers.worker import VerifierWorkerCore
    from rlloop.validate import check_data_sources, check_verifiers

    train, test = build_datasets(cfg.task)
    samples = (train if split == "train" else test)[:rows]
    if not samples:
        raise ValueError(f"the {split} set is empty")
    check_verifiers(cfg.reward.verifier)
    check_data_sources(cfg.reward.verifier, {s.data_source for s in samples})
    texts = (
        _completions(completions, [s.uid for s in samples])
        if completions
        else [solution.replace("{gold}", s.ground_truth) for s in samples]
    )
    core = VerifierWorkerCore.from_config(cfg.reward.verifier)
    render = _prompt_renderer(cfg)
    requests = [
        VerifyRequest(
            uid=s.uid,
            data_source=s.data_source,
            solution_str=text,
            ground_truth=s.ground_truth,
            prompt=render(s),
            extra=dict(s.extra),
            raw_prompt=s.prompt,
        )
        for s, text in zip(samples, texts)
    ]
    results: List[VerifyResult] = []
    for start in range(0, len(requests), _CHUNK):
        results += core.verify_many(requests[start : start + _CHUNK])
    return results


def report(results: List[VerifyResult], out: Any = None) -> int:
    """Print one line per result and a summary (to `out`, default stdout); the number the reward could
    not judge."""
    out = out or sys.stdout
    for r in results:
        named = {k: round(v, 4) for k, v in r.scores.items() if k != "score"}
        line = f"{r.uid}: score {r.score:.4g}" + (f" {named}" if named else "")
        if r.reason:
            line += f"  [{r.info().get('kind', '')}: {r.reason}]"
        print(line, file=out)
    unscored = sum(1 for r in results if r.info().get("kind") == "unscored")
    mean = sum(r.score for r in results) / len(results)
    print(f"{len(results)} rows: mean score {mean:.4g}; {unscored} could not be scored", file=out)
    return unscored


def main(argv: Optional[List[str]] = None) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlloop.errors import RlloopError
    from rlloop.train import compose_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(
        prog="python -m rlloop.verify_reward",
        description="Score N rows of the task's data with the configured reward (gold answers or given "
        "completions). Other arguments are rlloop.train's Hydra overrides.",
    )
    parser.add_argument("--rows", type=int, default=8, help="rows to score (default 8)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument(
        "--solution", default=DEFAULT_SOLUTION, help="completion made from each gold ({gold})"
    )
    parser.add_argument(
        "--completions", help="jsonl of completions to score instead (columns completion[, uid])"
    )
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.rows < 1:
        parser.error("--rows must be >= 1")
    try:
        cfg = compose_config(overrides)
        results = verify(
            cfg, rows=args.rows, split=args.split, solution=args.solution, completions=args.completions
        )
    except (RlloopError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if report(results) else 0)


if __name__ == "__main__":
    main()
