"""The tracker's backends (rlloop/tracking.py): TensorBoard, MLflow and wandb, fresh and resumed.

wandb runs offline and MLflow on a file store inside the test's folder: nothing leaves the machine.
The MLflow tests need the optional mlflow package (pip install 'rlloop[mlflow]') and are skipped without
it; its absence is checked to be one clear error.
"""

from __future__ import annotations

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlloop.tracking import RUN_IDS_FILE, Tracker, flatten

CONFIG = {"wandb": {"project": "p", "api_key": "sk-secret-1"}, "learner": {"lr": 1e-4, "betas": [0.9, 0.99]}}


def _scalars(folder, key: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(key)]


def test_flatten_gives_dotted_scalars():
    assert flatten({"a": {"b": 1, "c": None}, "d": [1, 2], "e": "x"}) == {"a.b": 1, "a.c": "None", "d": "[1, 2]", "e": "x"}


def test_tensorboard_writes_scalars_and_a_redacted_config(tmp_path):
    tracker = Tracker(["tensorboard"], tmp_path, config=CONFIG)
    for step in (1, 2, 3):
        tracker.log({"reward/total": step / 10, "note": "text is not a scalar", "nan": float("nan")}, step=step)
    tracker.finish()
    scalars = _scalars(tmp_path / "tensorboard", "reward/total")
    assert [s for s, _ in scalars] == [1, 2, 3] and [v for _, v in scalars] == pytest.approx([0.1, 0.2, 0.3])
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (config,) = events.Tensors("config/text_summary")
    text = config.tensor_proto.string_val[0].decode()
    assert '"lr": 0.0001' in text and "sk-secret-1" not in text


def test_tensorboard_resumed_drops_what_came_after_the_checkpoint(tmp_path):
    first = Tracker(["tensorboard"], tmp_path)
    for step in (1, 2, 3):  # killed after step 3; its last checkpoint was step 2
        first.log({"reward/total": float(step)}, step=step)
    first.finish()
    resumed = Tracker(["tensorboard"], tmp_path, resume_step=2)
    resumed.log({"reward/total": 30.0}, step=3)
    resumed.log({"reward/total": 40.0}, step=4)
    resumed.finish()
    assert _scalars(tmp_path / "tensorboard", "reward/total") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_wandb_resumed_continues_the_same_run(tmp_path):
    wandb_cfg = {"mode": "offline", "project": "rlloop-test"}
    first = Tracker(["jsonl", "wandb"], tmp_path, config=CONFIG, wandb_cfg=wandb_cfg)
    run_id = first._wandb.id
    first.log({"reward/total": 0.5}, step=1)
    first.finish()
    assert json.loads((tmp_path / RUN_IDS_FILE).read_text()) == {"wandb": run_id}
    resumed = Tracker(["jsonl", "wandb"], tmp_path, config=CONFIG, wandb_cfg=wandb_cfg, resume_step=1)
    assert resumed._wandb.id == run_id
    resumed.log({"reward/total": 0.7}, step=2)
    resumed.finish()
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)  # `wandb sync` joins them
    records = (folders[0] / f"run-{run_id}.wandb").read_bytes()  # offline: the config is in the run's record
    assert b"0.0001" in records and b"sk-secret-1" not in records
    fresh = Tracker(["wandb"], tmp_path, wandb_cfg=wandb_cfg)  # not resuming: a new run, recorded instead
    fresh_id = fresh._wandb.id
    fresh.finish()
    assert fresh_id != run_id and json.loads((tmp_path / RUN_IDS_FILE).read_text()) == {"wandb": fresh_id}


def test_mlflow_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ModuleNotFoundError, match=r"logger=\[mlflow\] needs the mlflow package: pip install 'rlloop\[mlflow\]'"):
        Tracker(["mlflow"], tmp_path)


def test_mlflow_logs_params_and_metrics_and_resumes_its_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    first = Tracker(["mlflow"], tmp_path, config=CONFIG, mlflow_cfg={"experiment": "e", "run_name": "r"})
    run_id = first._mlflow.run_id
    first.log({"reward/total": 0.5, "eval/test/pass@4": 0.25}, step=1)
    first.finish()
    resumed = Tracker(["mlflow"], tmp_path, config=CONFIG, mlflow_cfg={"experiment": "e"}, resume_step=1)
    assert resumed._mlflow.run_id == run_id
    resumed.log({"reward/total": 0.7}, step=2)
    resumed.finish()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "r" and run.info.status == "FINISHED"
    assert run.data.params["learner.lr"] == "0.0001" and run.data.params["wandb.api_key"] == "***"
    history = client.get_metric_history(run_id, "reward/total")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.7)]
    assert run.data.metrics["eval/test/pass_4"] == 0.25
