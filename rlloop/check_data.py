"""`python -m rlloop.check_data [overrides]`: look at a data set before training on it.

Takes the same overrides as `rlloop.train` (e.g. `task=file task.train_path=data/train.jsonl`). Prints the
first training prompt as the model will see it (chat template applied), then every row whose gold
answer its verifier cannot use: unverifiable (no parse covers the whole gold) or not verifying against
itself when boxed as a model would write it. Each row is named by file and line (jsonl) or row (parquet).

Exit status: 0 when every checked gold is usable, 1 when any row is listed, 2 for bad input.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, List, Optional

from rlloop.data.check import check_golds, describe, gold_checker, row_labels
from rlloop.types import Sample

logger = logging.getLogger("rlloop.check_data")

# built-in models whose tokenizer is rlloop's own (rlloop.models.tokenizer): rendered without building them
_OWN_TEMPLATE = ("tiny", "arith-small", "chain-small")


def rendered_prompt(sample: Sample, cfg: Any) -> str:
    """The prompt text a rollout feeds the model (rlloop.data.loader.prompt_text)."""
    from rlloop.data.loader import (
        chat_messages,
        chat_template_kwargs,
        prompt_text,
        raw_prompt_text,
        uses_chat_template,
    )

    if not uses_chat_template(cfg.task):
        return raw_prompt_text(sample, cfg.task)
    if not cfg.model.path and cfg.model.name in _OWN_TEMPLATE:
        import jinja2

        from rlloop.models.tokenizer import CHAT_TEMPLATE

        return jinja2.Template(CHAT_TEMPLATE).render(
            messages=chat_messages(sample, cfg.task),
            add_generation_prompt=True,
            **chat_template_kwargs(cfg.task),
        )
    from transformers import AutoTokenizer

    from rlloop.models import resolve_model

    return prompt_text(sample, AutoTokenizer.from_pretrained(resolve_model(cfg.model, cfg.task)), cfg.task)


def check(cfg: Any, out=None) -> int:
    """Print the report for `cfg`'s data sets (to `out`, default the current sys.stdout, looked up at call
    time: a default bound at import would keep whatever stream was current then); the number of rows
    listed."""
    out = sys.stdout if out is None else out
    from rlloop.data import build_datasets
    from rlloop.rewards.verifiers.worker import route
    from rlloop.validate import check_data_sources

    train, test = build_datasets(cfg.task)
    check_data_sources(cfg.reward.verifier, {s.data_source for s in train + test})
    if train:
        print(f"first training prompt (uid {train[0].uid!r}), as rendered for the model:", file=out)
        print(rendered_prompt(train[0], cfg), file=out)
        print("-" * 72, file=out)
    sources = dict(cfg.reward.verifier.sources)
    listed = 0
    for split, samples, path in (("train", train, cfg.task.train_path), ("test", test, cfg.task.test_path)):
        if not samples:
            continue
        names = sorted({route(sources, s.data_source) for s in samples})
        unchecked = [n for n in names if gold_checker(n) is None]
        problems = check_golds(samples, cfg.reward.verifier, self_check=True)
        labels: Optional[List[str]] = row_labels(path) if cfg.task.name == "file" and path else None
        where = path if cfg.task.name == "file" else f"task={cfg.task.name}"
        note = f"; not checked (verifier has no gold check): {unchecked}" if unchecked else ""
        print(
            f"{split}: {where}: {len(samples)} rows, verifier(s) {names}: "
            f"{len(problems)} gold(s) unusable{note}",
            file=out,
        )
        for line in describe(problems, labels):
            print("  " + line, file=out)
        listed += len(problems)
    print(
        f"{listed} row(s) whose gold does not verify"
        if listed
        else "every checked gold verifies against itself",
        file=out,
    )
    return listed


def main(argv: Optional[List[str]] = None) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlloop.errors import RlloopError
    from rlloop.train import compose_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # math-verify warns once that its SIGALRM timeouts are off (the check keeps its own time limit)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    try:
        listed = check(compose_config(argv))
    except (RlloopError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if listed else 0)


if __name__ == "__main__":
    main()
