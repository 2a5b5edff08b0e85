"""Gold answers a verifier cannot use, found before training: at load time and by `python -m rlloop.check_data`.

A verifier opts in by carrying a `check_gold(ground_truth, self_check=True) -> reason | None` attribute
(the `math` verifier does: a gold no parser covers as a whole is unverifiable, and every one of its
samples would be recorded as unscored). Verifiers without one (code, custom functions) are not checked.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, List, Mapping, NamedTuple, Optional

from rlloop.errors import ConfigError
from rlloop.types import Sample

logger = logging.getLogger(__name__)

MODES = ("warn", "error", "off")


class GoldProblem(NamedTuple):
    """One row whose gold a verifier cannot use. index: position in the sample list (= the file's
    data row, counting from 0)."""

    index: int
    uid: str
    gold: str
    reason: str


def _sources(verifier_cfg: Any) -> Mapping[str, str]:
    if verifier_cfg is None:
        return {"*": "math"}
    if isinstance(verifier_cfg, Mapping) and "sources" not in verifier_cfg:
        return dict(verifier_cfg)
    sources = verifier_cfg["sources"] if isinstance(verifier_cfg, Mapping) else verifier_cfg.sources
    return dict(sources)


def gold_checker(name: str) -> Optional[Callable[..., Optional[str]]]:
    """The `check_gold` of the verifier registered as `name`, or None when it has none."""
    from rlloop.rewards.verifiers import get_verifier

    return getattr(get_verifier(name), "check_gold", None)


def check_golds(
    samples: Iterable[Sample],
    verifier_cfg: Any = None,
    *,
    self_check: bool = True,
    timeout_s: float = 10.0,
) -> List[GoldProblem]:
    """The rows whose gold answer the verifier of their data_source cannot use, in row order.

    verifier_cfg: `reward.verifier` (its `sources` route each data_source to a verifier), a plain
    {data_source: verifier} mapping, or None for the math verifier everywhere. self_check: also box each
    gold as a model would write it and require a score of 1 (twice the cost of the parse alone). Each
    distinct (verifier, gold) is checked once, under `timeout_s` (when on the main thread).
    """
    from rlloop.rewards.verifiers.timeouts import SampleTimeout, time_limit
    from rlloop.rewards.verifiers.worker import import_plugins, route

    plugins = getattr(verifier_cfg, "plugins", None) if verifier_cfg is not None else None
    if plugins:
        import_plugins(list(plugins))
    sources = _sources(verifier_cfg)
    checkers: dict[str, Any] = {}
    verdicts: dict[tuple[str, str], Optional[str]] = {}
    problems = []
    for index, sample in enumerate(samples):
        try:
            name = route(sources, sample.data_source)
        except ValueError:
            continue  # an unrouted data_source is validate.check_data_sources' error, not a gold's
        if name not in checkers:
            checkers[name] = gold_checker(name)
        checker = checkers[name]
        if checker is None:
            continue
        key = (name, sample.ground_truth)
        if key not in verdicts:
            try:
                with time_limit(timeout_s):
                    verdicts[key] = checker(sample.ground_truth, self_check=self_check)
            except SampleTimeout:
                verdicts[key] = f"checking it took over {timeout_s:g} s"
            except Exception as err:  # noqa: BLE001 - a verifier bug on one gold names that gold
                verdicts[key] = f"the check crashed ({type(err).__name__}: {err})"
        if verdicts[key]:
            problems.append(GoldProblem(index, sample.uid, sample.ground_truth, verdicts[key]))
    return problems


def row_labels(path: Any) -> List[str]:
    """ "<file>: line N" (jsonl) or "<file>: row N" (parquet) for each data row of a file (or of each file
    of a list or glob), in the order load_samples reads them (so `GoldProblem.index` indexes this list)."""
    from rlloop.data.loader import _read_rows, _row_name, resolve_paths

    return [_row_name(p, row) for p in resolve_paths(path, "path") for row, _ in _read_rows(p)]


def describe(problems: List[GoldProblem], labels: Optional[List[str]] = None, limit: int = 0) -> List[str]:
    """One line per problem (the first `limit`, 0 = all): where, uid, gold, reason."""
    lines = []
    for p in problems[: limit or None]:
        where = labels[p.index] if labels and p.index < len(labels) else f"row index {p.index}"
        gold = p.gold if len(p.gold) <= 100 else p.gold[:97] + "..."
        lines.append(f"{where}: uid {p.uid!r}: gold {gold!r}: {p.reason}")
    return lines


def check_task_golds(task_cfg: Any, verifier_cfg: Any, train: List[Sample], test: List[Sample]) -> None:
    """The load-time check of the train path: log the rows whose gold is unverifiable (a warning naming
    them and their count), or raise ConfigError when `task.check_golds=error`; `off` skips it.

    Only the parse runs here (no self-check: `python -m rlloop.check_data` does both).
    """
    mode = str(getattr(task_cfg, "check_golds", "warn") or "warn")
    if mode not in MODES:
        raise ConfigError(f"config task.check_golds={mode!r}: must be one of {list(MODES)}")
    if mode == "off":
        return
    messages, total = [], 0
    for split, samples, path in (
        ("train", train, getattr(task_cfg, "train_path", None)),
        ("test", test, getattr(task_cfg, "test_path", None)),
    ):
        problems = check_golds(samples, verifier_cfg, self_check=False)
        if not problems:
            continue
        total += len(problems)
        labels = row_labels(path) if task_cfg.name == "file" and path else None
        messages.append(f"{len(problems)} of {len(samples)} {split} rows")
        messages.extend("  " + line for line in describe(problems, labels, limit=20))
        if len(problems) > 20:
            messages.append(f"  ... and {len(problems) - 20} more (python -m rlloop.check_data lists all)")
    if not total:
        return
    text = (
        f"{total} gold answer(s) are unverifiable: their samples will score 0 as unscored "
        "(verifier/unscored_frac), never against a fragment of the gold; fix or drop the rows, or set "
        "task.check_golds=off\n" + "\n".join(messages)
    )
    if mode == "error":
        raise ConfigError(text)
    logger.warning(text)
