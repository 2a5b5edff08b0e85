"""Bad input, everywhere it enters: a table of cases run through the real entry code.

Every `python -m rlloop.train` case goes through `rlloop.train.main` (in-process: the same
compose + preflight the CLI runs before handing over to Hydra) and must exit with code 2, print one
`error:` line naming the culprit, start nothing, and leave an existing run folder (checkpoints,
metrics, saved config) byte-for-byte unchanged. A handful run as real subprocesses to prove the wiring;
PRM/Q-RM data enter through `rlloop.prm_train` / `rlloop.qrm_train`'s own entry.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

import rlloop.train as train_cli
from tests.conftest import TINY_RUN, run_cli

# Placeholders filled by the `inputs` fixture: {data} data files, {models} model folders, {prior} an
# earlier run's folder, {ckpt} a folder that is not a checkpoint.
CASES = [
    # ---- config: schema (Hydra) --------------------------------------------------------------
    ("unknown key", ["algo.bogus_key=1"], ["algo.bogus_key"]),
    ("appended unknown key", ["+reward.prm.typo=1"], ["reward.prm.typo"]),
    ("wrong type float", ["learner.lr=fast"], ["learner.lr", "fast"]),
    ("wrong type int", ["rollout.n=many"], ["rollout.n", "many"]),
    ("unknown preset", ["model=gpt9"], ["model/gpt9"]),
    ("api key as config", ["+wandb.api_key=secret-xyz"], ["wandb.api_key"]),
    # ---- config: impossible values -----------------------------------------------------------
    ("n=0", ["rollout.n=0"], ["rollout.n=0"]),
    ("n=1 with GRPO", ["rollout.n=1"], ["rollout.n=1", "grpo"]),
    ("negative lr", ["learner.lr=-1e-5"], ["learner.lr"]),
    ("w_prm above 1", ["reward.w_prm=1.5"], ["reward.w_prm=1.5"]),
    ("w_prm below 0", ["reward.w_prm=-0.1"], ["reward.w_prm=-0.1"]),
    ("unknown advantage", ["algo.advantage=nope"], ["algo.advantage", "nope"]),
    ("temperature 0", ["rollout.temperature=0"], ["rollout.temperature"]),
    ("top_p above 1", ["rollout.top_p=1.5"], ["rollout.top_p"]),
    ("zero stage 4", ["learner.zero_stage=4"], ["learner.zero_stage"]),
    ("unknown old_logprobs", ["algo.old_logprobs=cached"], ["algo.old_logprobs", "cached"]),
    ("gae with prime fusion", ["algo=ppo", "reward=prime"], ["reward.fusion", "prime", "gae"]),
    ("PRM critic without a PRM", ["algo=ppo", "algo.critic.init=prm"], ["algo.critic.init", "reward.prm.path"]),
    ("unknown critic output", ["algo=ppo", "algo.critic.output=tanh"], ["algo.critic.output", "tanh"]),
    ("unknown critic key", ["algo=ppo", "+algo.critic.warmup=3"], ["algo.critic.warmup"]),
    ("zero ppo_epochs", ["algo.ppo_epochs=0"], ["algo.ppo_epochs"]),
    ("unknown logger", ["logger=[console,neptune]"], ["logger", "neptune"]),
    ("negative max_restarts", ["trainer.max_restarts=-1"], ["trainer.max_restarts"]),
    ("negative eval_samples", ["trainer.eval_samples=-2"], ["trainer.eval_samples"]),
    ("no room for a prompt", ["rollout.max_new_tokens=300"], ["rollout.max_new_tokens=300", "256"]),
    # ---- data sets ---------------------------------------------------------------------------
    ("file task without path", ["task=file"], ["task.train_path"]),
    ("missing data file", ["task=file", "task.train_path={data}/nope.jsonl"], ["nope.jsonl"]),
    ("missing column", ["task=file", "task.train_path={data}/no_answer.jsonl"], ["line 2", "'answer'"]),
    ("empty prompt", ["task=file", "task.train_path={data}/empty_prompt.jsonl"], ["line 1", "'prompt'"]),
    ("prompt not text", ["task=file", "task.train_path={data}/number_prompt.jsonl"], ["line 1", "int"]),
    (
        "non-UTF-8 bytes",
        ["task=file", "task.train_path={data}/latin1.jsonl"],
        ["latin1.jsonl", "line 2", "UTF-8"],
    ),
    (  # the default, task.overlong_prompts=filter, drops it with a warning instead
        "huge row",
        ["task=file", "task.train_path={data}/huge.jsonl", "task.overlong_prompts=error"],
        ["'huge'", "tokens", "256"],
    ),
    (
        "no prompt fits",
        ["task=file", "task.train_path={data}/all_huge.jsonl"],
        ["every train prompt", "too long"],
    ),
    ("duplicated uids", ["task=file", "task.train_path={data}/dup.jsonl"], ["line 3", "'a'", "line 1"]),
    (
        "uid clash train/test",
        ["task=file", "task.train_path={data}/good.jsonl", "task.test_path={data}/clash.jsonl"],
        ["clash.jsonl", "'a'"],
    ),
    ("not JSON", ["task=file", "task.train_path={data}/not_json.jsonl"], ["line 2", "not valid JSON"]),
    ("empty data file", ["task=file", "task.train_path={data}/empty.jsonl"], ["empty.jsonl", "empty"]),
    ("unsupported format", ["task=file", "task.train_path={data}/train.csv"], ["train.csv", ".csv"]),
    # ---- model paths -------------------------------------------------------------------------
    ("missing model dir", ["model.path=/no/such/model"], ["model.path=/no/such/model"]),
    ("dir without config.json", ["model.path={models}/no_config"], ["no_config", "config.json"]),
    ("config.json not JSON", ["model.path={models}/bad_json"], ["bad_json", "not valid JSON"]),
    ("model without weights", ["model.path={models}/no_weights"], ["no_weights", "no weights"]),
    ("missing PRM dir", ["reward=tdrm", "reward.prm.path={models}/no_prm"], ["reward.prm.path", "no_prm"]),
    (
        "PRM without a tokenizer",
        ["reward=tdrm", "reward.prm.path={models}/no_tokenizer"],
        ["reward.prm.path", "no_tokenizer", "tokenizer"],
    ),
    # ---- reward-function paths ---------------------------------------------------------------
    (
        "custom fn module missing",
        ["reward.verifier.sources={arith:custom}", "reward.verifier.custom_fn=no_such_rewards:score"],
        ["custom_fn", "no_such_rewards"],
    ),
    (
        "custom fn missing",
        ["reward.verifier.sources={arith:custom}", "reward.verifier.custom_fn=bad_rewards:nope"],
        ["custom_fn", "'nope'"],
    ),
    (
        "custom fn not callable",
        ["reward.verifier.sources={arith:custom}", "reward.verifier.custom_fn=bad_rewards:SCORE"],
        ["custom_fn", "'SCORE'"],
    ),
    ("custom fn not dotted", ["reward.verifier.custom_fn=justaname"], ["custom_fn", "justaname"]),
    (
        "custom fn wrong signature",
        ["reward.verifier.sources={arith:custom}", "reward.verifier.custom_fn=bad_rewards:two_args"],
        ["custom_fn", "signature"],
    ),
    (
        "custom fn module raises",
        ["reward.verifier.sources={arith:custom}", "reward.verifier.custom_fn=broken_rewards:score"],
        ["broken_rewards", "boom"],
    ),
    ("unknown verifier", ["reward.verifier.sources={arith:alchemy}"], ["reward.verifier.sources", "alchemy"]),
    ("plugin import fails", ["reward.verifier.plugins=[no_such_plugin]"], ["plugins", "no_such_plugin"]),
    # ---- resume ------------------------------------------------------------------------------
    ("resume from a non-checkpoint", ["trainer.resume={ckpt}"], ["trainer.resume", "state.json"]),
    ("resume another model's checkpoint", ["trainer.resume=auto"], ["step_000001", "another model"]),
]

# A few cases through a real `python -m rlloop.train` subprocess (one per stage that can fail).
SUBPROCESS = [
    "unknown key",
    "w_prm above 1",
    "non-UTF-8 bytes",
    "dir without config.json",
    "custom fn not callable",
]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    data, models, prior, code = root / "data", root / "models", root / "prior", root / "code"
    for d in (data, models, prior, code):
        d.mkdir()
    good = [{"uid": "a", "prompt": "1+1?", "answer": "2"}, {"uid": "b", "prompt": "2+2?", "answer": "4"}]
    _jsonl(data / "good.jsonl", good)
    _jsonl(data / "no_answer.jsonl", [good[0], {"prompt": "2+2?"}])
    _jsonl(data / "empty_prompt.jsonl", [{"prompt": "  ", "answer": "1"}])
    _jsonl(data / "number_prompt.jsonl", [{"prompt": 42, "answer": "1"}])
    (data / "latin1.jsonl").write_bytes(
        b'{"prompt": "1+1?", "answer": "2"}\n{"prompt": "caf\xe9?", "answer": "1"}\n'
    )
    _jsonl(data / "huge.jsonl", [good[0], {"uid": "huge", "prompt": "1 + " * 3000 + "1?", "answer": "3001"}])
    _jsonl(data / "all_huge.jsonl", [{"uid": "huge", "prompt": "1 + " * 3000 + "1?", "answer": "3001"}])
    _jsonl(data / "dup.jsonl", [good[0], good[1], {"uid": "a", "prompt": "3+3?", "answer": "6"}])
    _jsonl(data / "clash.jsonl", [{"uid": "a", "prompt": "9+9?", "answer": "18"}])
    (data / "not_json.jsonl").write_text(json.dumps(good[0]) + "\n{prompt: 1+1}\n")
    (data / "empty.jsonl").write_text("")
    (data / "train.csv").write_text("prompt,answer\n1+1?,2\n")
    (models / "no_config").mkdir()
    (models / "no_config" / "model.safetensors").write_bytes(b"x")
    (models / "bad_json").mkdir()
    (models / "bad_json" / "config.json").write_text("{")
    (models / "no_tokenizer").mkdir()  # config and weights, but no tokenizer files
    (models / "no_tokenizer" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (models / "no_tokenizer" / "model.safetensors").write_bytes(b"x")
    (models / "no_weights").mkdir()
    (models / "no_weights" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (code / "bad_rewards.py").write_text("SCORE = 1.0\n\n\ndef two_args(text, answer):\n    return 1.0\n")
    (code / "broken_rewards.py").write_text("raise RuntimeError('boom')\n")
    # An earlier run's folder, with a checkpoint of another model (fingerprint 'abc').
    ckpt = prior / "checkpoints" / "step_000001"
    (ckpt / "learner").mkdir(parents=True)
    (ckpt / "learner" / "mp_rank_00_model_states.pt").write_bytes(b"\x00weights")
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "model_fingerprint": "abc"}))
    (prior / ".hydra").mkdir()
    (prior / ".hydra" / "config.yaml").write_text("trainer:\n  total_steps: 3\n")
    (prior / "config_resolved.yaml").write_text("trainer:\n  total_steps: 3\n")
    (prior / "metrics.jsonl").write_text('{"step": 1, "reward/total": 0.5}\n')
    (prior / "checkpoint").mkdir()
    (prior / "checkpoint" / "model.safetensors").write_bytes(b"\x01final")
    (root / "not_a_ckpt").mkdir()
    return {"data": data, "models": models, "prior": prior, "code": code, "ckpt": root / "not_a_ckpt"}


def _fill(overrides: list[str], inputs: dict[str, Path]) -> list[str]:
    out = []
    for o in overrides:
        for key, path in inputs.items():
            o = o.replace("{" + key + "}", str(path))
        out.append(o)
    return out


def _args(overrides: list[str], inputs: dict[str, Path]) -> list[str]:
    return [*TINY_RUN, *_fill(overrides, inputs), f"hydra.run.dir={inputs['prior']}"]


def test_the_table_is_big_enough():
    assert len(CASES) >= 25 and len({name for name, _, _ in CASES}) == len(CASES)
    assert set(SUBPROCESS) <= {name for name, _, _ in CASES}


@pytest.mark.parametrize("name, overrides, culprits", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_naming_the_culprit(name, overrides, culprits, inputs, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(inputs["code"]))
    before = _hashes(inputs["prior"])
    monkeypatch.setattr(sys, "argv", ["rlloop.train", *_args(overrides, inputs)])
    monkeypatch.setattr(train_cli, "_main", lambda: pytest.fail(f"{name}: bad input reached the run"))
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    assert "Traceback" not in err and "secret-xyz" not in err
    assert _hashes(inputs["prior"]) == before


def test_good_input_passes_preflight(inputs, monkeypatch):
    """The checks are not simply rejecting everything: the table's base run and a good file pass."""
    assert train_cli.input_error(_args([], inputs)) is None
    good = ["task=file", "task.train_path={data}/good.jsonl", "task.test_path={data}/good.jsonl"]
    assert train_cli.input_error(_args(good, inputs)) is None


@pytest.mark.parametrize("name", SUBPROCESS)
def test_cli_subprocess_exit_code_and_untouched_run(name, inputs):
    overrides, culprits = next((o, c) for n, o, c in CASES if n == name)
    before = _hashes(inputs["prior"])
    proc = run_cli(_args(overrides, inputs), timeout=180, env={"PYTHONPATH": str(inputs["code"])})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    for culprit in culprits:
        assert culprit in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    assert "started a local Ray cluster" not in out
    assert _hashes(inputs["prior"]) == before  # Hydra never got to write .hydra/ or the job log


# ---- PRM / Q-RM training data enter through their own entry points --------------------------------


def _entry_exit(module: str, config: str, overrides: list[str], out: Path, caplog) -> tuple[int, str]:
    """Run `<module>._main` (the function under its hydra.main) on a composed config."""
    import importlib

    from hydra import compose, initialize_config_dir

    mod = importlib.import_module(module)
    with initialize_config_dir(config_dir=train_cli.CONF_DIR, version_base=None):
        cfg = compose(config_name=config, overrides=[*overrides, f"out_dir={out}"])
    with pytest.raises(SystemExit) as exit_info:
        mod._main(cfg)
    return exit_info.value.code, caplog.text


@pytest.mark.parametrize(
    "module, config, overrides, culprits",
    [
        ("rlloop.prm_train", "prm_train", ["data.train_path={data}/traj_latin1.jsonl"], ["row 2", "UTF-8"]),
        (
            "rlloop.prm_train",
            "prm_train",
            ["data.train_path={data}/traj.jsonl", "model.path={models}/no_config"],
            ["no_config", "config.json"],
        ),
        ("rlloop.prm_train", "prm_train", ["data.train_path={data}/traj_no_steps.jsonl"], ["row 1", "steps"]),
        ("rlloop.qrm_train", "qrm_train", ["data.train_path={data}/pairs_latin1.jsonl"], ["row 1", "UTF-8"]),
        ("rlloop.qrm_train", "qrm_train", ["data.train_path={data}/traj.jsonl"], ["row 1", "chosen"]),
    ],
    ids=[
        "prm non-UTF-8",
        "prm model dir without config",
        "prm missing steps",
        "qrm non-UTF-8",
        "qrm wrong file",
    ],
)
def test_prm_and_qrm_training_data(module, config, overrides, culprits, inputs, tmp_path, caplog):
    data = inputs["data"]
    traj = {"question": "1+1?", "steps": ["1+1 = 2", "\\boxed{2}"], "correct": 1}
    _jsonl(data / "traj.jsonl", [traj])
    _jsonl(data / "traj_no_steps.jsonl", [{"question": "1+1?", "correct": 1}])
    (data / "traj_latin1.jsonl").write_bytes(json.dumps(traj).encode() + b'\n{"question": "\xff"}\n')
    (data / "pairs_latin1.jsonl").write_bytes(b'{"prompt": "\xe9", "chosen": "a", "rejected": "b"}\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "prm_metrics.json").write_text("{}")
    before = _hashes(out)
    code, text = _entry_exit(module, config, ["model=tiny", *_fill(overrides, inputs)], out, caplog)
    assert code == 2
    for culprit in culprits:
        assert culprit in text, text
    assert _hashes(out) == before
