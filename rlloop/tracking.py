"""One tracker for every metric: console, jsonl, wandb, TensorBoard and MLflow, chosen by `logger=[...]`.

TensorBoard (torch.utils.tensorboard) and MLflow (its client API) are written to directly, not through
accelerate's trackers: those log through accelerate's process state, which must be initialised first,
and initialising it in rlloop's driver reads LOCAL_RANK/WORLD_SIZE/PMI_SIZE, may start a process group
and writes WORLD_SIZE into the environment the Ray actors inherit.

A run that resumes from a checkpoint continues the same wandb and MLflow runs: their ids are kept in
`<out_dir>/tracker_runs.json`. What the killed attempt logged after that checkpoint is dropped from
metrics.jsonl (loop.truncate_metrics) and from TensorBoard (purge_step); wandb keeps its first values of
those steps and ignores the repeats (its steps only grow), and MLflow keeps both (a metric's history).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from rlloop.errors import RlloopError

logger = logging.getLogger(__name__)

BACKENDS = ("console", "jsonl", "wandb", "tensorboard", "mlflow")
WANDB_MODES = ("offline", "online", "disabled")  # wandb.mode
RUN_IDS_FILE = "tracker_runs.json"  # <out_dir>/: {"wandb": run id, "mlflow": run id}
# The console's short line: what a person watching a run acts on. Every metric still goes to metrics.jsonl
# and the other trackers; the full row is on the console at DEBUG level.
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


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}: the scalars TensorBoard's hparams and
    MLflow's params take (lists and None as text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


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
    crash loses nothing already logged. `tensorboard` writes event files to `<out_dir>/tensorboard/`.
    `resume_step`: the checkpoint's step when the run resumes (None for a fresh run); the wandb and MLflow
    runs recorded in `<out_dir>/tracker_runs.json` are then continued instead of new ones started.
    """

    def __init__(
        self,
        backends: list[str],
        out_dir: str | Path,
        *,
        config: dict | None = None,
        wandb_cfg: dict | None = None,
        mlflow_cfg: dict | None = None,
        resume_step: int | None = None,
    ) -> None:
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"logger: unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
        self.backends = list(backends)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        config = redact(config or {})
        runs = self._recorded_runs() if resume_step is not None else {}
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a") if "jsonl" in backends else None  # noqa: SIM115
        self._wandb = self._tensorboard = self._mlflow = None
        if "wandb" in backends:
            self._wandb = self._init_wandb(wandb_cfg or {}, config, runs.get("wandb"))
        if "tensorboard" in backends:
            self._tensorboard = self._init_tensorboard(config, resume_step)
        if "mlflow" in backends:
            self._mlflow = self._init_mlflow(mlflow_cfg or {}, config, runs.get("mlflow"))
        self._record_runs()

    def _recorded_runs(self) -> dict[str, str]:
        path = self.out_dir / RUN_IDS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _record_runs(self) -> None:
        runs = {}
        if self._wandb is not None:
            runs["wandb"] = self._wandb.id
        if self._mlflow is not None:
            runs["mlflow"] = self._mlflow.run_id
        if runs:
            tmp = self.out_dir / f".{RUN_IDS_FILE}.tmp"
            tmp.write_text(json.dumps(runs, indent=2))
            os.replace(tmp, self.out_dir / RUN_IDS_FILE)

    def _init_wandb(self, cfg: dict, config: dict, run_id: str | None):
        mode = cfg.get("mode") or "offline"
        if mode == "disabled":
            return None
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            logger.warning("wandb.mode=online but WANDB_API_KEY is not set; wandb may ask to log in")
        import wandb

        if run_id:
            logger.info("wandb: continuing run %s", run_id)
        return wandb.init(
            project=cfg.get("project", "rlloop"),
            entity=cfg.get("entity"),
            name=cfg.get("name"),
            mode=mode,
            dir=str(self.out_dir),
            config=config,
            # the same run after a restart (offline: another offline-run-*-<id> folder; `wandb sync` joins them)
            **({"id": run_id, "resume": "allow"} if run_id else {}),
            # no sync hints at the start and no run-history sparklines at the end of every run: the
            # run's folder (wandb/ inside it) is printed at the end, the metrics are in metrics.jsonl
            settings=wandb.Settings(silent=True),
        )

    def _init_tensorboard(self, config: dict, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "logger=[tensorboard] needs the tensorboard package: pip install tensorboard"
            ) from None
        # resumed: TensorBoard discards the killed attempt's events after the checkpoint's step
        writer = SummaryWriter(str(self.out_dir / "tensorboard"),
                               purge_step=None if resume_step is None else resume_step + 1)  # fmt: skip
        if resume_step is None:
            writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        return writer

    def _init_mlflow(self, cfg: dict, config: dict, run_id: str | None) -> _MLflowRun:
        try:
            import mlflow  # noqa: F401
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "logger=[mlflow] needs the mlflow package: pip install 'rlloop[mlflow]' (or mlflow)"
            ) from None
        # mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else MLflow's file store inside the run's folder:
        # no server and no database package (mlflow-skinny has none), but MLflow 3 keeps that store in
        # maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE opts in
        uri = cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (self.out_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return _MLflowRun(uri, cfg.get("experiment") or "rlloop", cfg.get("run_name"), config, run_id)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if "console" in self.backends:
            self._console(row, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()
        if self._mlflow is not None:
            self._mlflow.log(numbers, step)

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
            logger.info(
                "step %d | %s", step, fmt((k, row[k]) for k in CONSOLE_KEYS if row.get(k) is not None)
            )

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
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._mlflow is not None:
            self._mlflow.finish()
            self._mlflow = None


class _MLflowRun:
    """One MLflow run through the client API (no global active run): created with the run's config as
    params, or continued by id after a restart."""

    def __init__(
        self, uri: str, experiment: str, run_name: str | None, config: dict, run_id: str | None
    ) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            logger.info("mlflow: continuing run %s at %s", run_id, uri)
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(config).items()]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow's metric names take letters, digits and _ - . / and spaces (pass@k becomes pass_k)
        metrics = [Metric(re.sub(r"[^\w./\- ]", "_", k), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (blank lines skipped); a line that is not JSON is an RlloopError naming
    the file and line."""
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RlloopError(f"{path}:{line_no}: not JSON ({e})") from e
    return rows
