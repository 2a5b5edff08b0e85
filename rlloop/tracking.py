"""One tracker for every metric: console, jsonl and wandb backends, chosen by `logger=[...]`."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BACKENDS = ("console", "jsonl", "wandb")
WANDB_MODES = ("offline", "online", "disabled")  # wandb.mode
# The console's short line: what a person watching a run acts on. Every metric still goes to metrics.jsonl
# and wandb; the full row is on the console at DEBUG level.
CONSOLE_KEYS = (
    "reward/total",
    "accuracy",
    "response_length/mean",
    "kl",
    "entropy",
    "time/step",
)
CONSOLE_EVERY = 10  # steps between short console lines (evaluation rows are always shown)
# Never let a secret reach a saved config or a metrics row.
_SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password")


def redact(obj: Any) -> Any:
    """A copy of a nested dict/list with values under secret-looking keys replaced by '***'."""
    if isinstance(obj, dict):
        return {
            k: ("***" if any(m in str(k).lower() for m in _SECRET_MARKERS) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def _clean(value: Any) -> Any:
    """JSON-safe scalar: numpy/torch scalars to float, NaN/inf to None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """Fan metrics out to the configured backends.

    `jsonl` writes one JSON object per `log` call to `<out_dir>/metrics.jsonl`, flushed at once so a
    crash loses nothing already logged.
    """

    def __init__(
        self,
        backends: list[str],
        out_dir: str | Path,
        *,
        config: dict | None = None,
        wandb_cfg: dict | None = None,
    ) -> None:
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"logger: unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
        self.backends = list(backends)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a") if "jsonl" in backends else None  # noqa: SIM115
        self._wandb = None
        if "wandb" in backends:
            self._wandb = self._init_wandb(wandb_cfg or {}, redact(config or {}))

    def _init_wandb(self, cfg: dict, config: dict):
        mode = cfg.get("mode") or "offline"
        if mode == "disabled":
            return None
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            logger.warning("wandb.mode=online but WANDB_API_KEY is not set; wandb may ask to log in")
        import wandb

        return wandb.init(
            project=cfg.get("project", "rlloop"),
            entity=cfg.get("entity"),
            name=cfg.get("name"),
            mode=mode,
            dir=str(self.out_dir),
            config=config,
            # no sync hints at the start and no run-history sparklines at the end of every run: the
            # run's folder (wandb/ inside it) is printed at the end, the metrics are in metrics.jsonl
            settings=wandb.Settings(silent=True),
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if "console" in self.backends:
            self._console(row, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)

    def _console(self, row: dict[str, Any], step: int) -> None:
        """Every CONSOLE_EVERY steps and on evaluation rows: one short INFO line (the progress bar shows
        the rest); the full row at DEBUG."""

        def fmt(items: Any) -> str:
            return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)

        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("step %d | %s", step, fmt((k, v) for k, v in row.items() if k != "step"))
        evals = [(k, v) for k, v in row.items() if k.startswith("eval/") and k != "eval/num_samples"]
        if evals:
            logger.info("step %d | held-out %s", step, fmt((k.removeprefix("eval/"), v) for k, v in evals))
        if step % CONSOLE_EVERY == 0 and any(k in row for k in CONSOLE_KEYS):
            logger.info("step %d | %s", step, fmt((k, row[k]) for k in CONSOLE_KEYS if row.get(k) is not None))

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Sample trajectories and the like: a wandb table, and a jsonl file beside metrics.jsonl."""
        with open(self.out_dir / f"{name}.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, r))}) + "\n")
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
