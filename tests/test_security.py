"""Security defaults: no code execution or unpickling outside an allow-list, Ray on loopback, no leaked keys."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, TINY_RUN, run_cli

PACKAGE = ROOT / "rlloop"

# (file relative to the repo root, finding) -> why it is allowed. Anything else found fails the test.
ALLOWED = {
    ("rlloop/rewards/verifiers/sandbox.py", "import subprocess"): (
        "the code sandbox: runs model-generated programs in a separate, resource-limited process"
    ),
    ("rlloop/rewards/verifiers/sandbox_runner.py", "exec()"): (
        "runs inside the bubblewrap sandbox: executes the model's program under rlimits"
    ),
    ("rlloop/rewards/verifiers/sandbox_runner.py", "compile()"): (
        "runs inside the bubblewrap sandbox: compiles the program it then executes"
    ),
    ("rlloop/rewards/verifiers/code.py", "exec()"): (
        "the trusted judge: runs the dataset's assert tests and setup (never model output), the program's "
        "functions being proxies into the sandbox that return plain JSON data"
    ),
    ("rlloop/rewards/verifiers/code.py", "compile()"): (
        "the trusted judge: compiles the dataset's assert tests and setup (never model output)"
    ),
    ("rlloop/experiments/common.py", "import subprocess"): (
        "the experiment suite launches `python -m rlloop.train` runs: a fixed argv, no shell"
    ),
    ("rlloop/experiments/demo_seeds.py", "import subprocess"): (
        "runs the demo, `python -m rlloop.train` with seed overrides: a fixed argv, no shell"
    ),
    ("rlloop/models/__init__.py", "import subprocess"): (
        "pretrains the built-in models with `python -m rlloop.sft`: a fixed argv, no shell, no model output"
    ),
}

_CALLS = {"exec", "eval", "compile", "__import__"}
_MODULES = {"subprocess", "pickle", "cloudpickle", "dill", "marshal", "shelve", "pty"}
_OS_CALLS = ("system", "popen", "exec", "spawn", "posix_spawn", "fork")


def findings(source: str) -> list[str]:
    """Code-execution and unpickling sites in `source`: `exec()`, `import subprocess`, `os.system()`,
    `pickle.load()`, `torch.load() without weights_only=True`, ... (`model.eval()` is a method: fine)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in _MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _MODULES:
            found.append(f"import {node.module}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"os.{a.name}()" for a in node.names if a.name.startswith(_OS_CALLS)]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in _CALLS:
                found.append(f"{func.id}()")
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                owner, name = func.value.id, func.attr
                if owner in ("builtins", "__builtins__") and name in _CALLS:
                    found.append(f"{name}()")
                elif owner == "os" and name.startswith(_OS_CALLS):
                    found.append(f"os.{name}()")
                elif owner == "torch" and name == "load":
                    safe = any(
                        k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant)
                        and k.value.value is True
                        for k in node.keywords
                    )
                    if not safe:
                        found.append("torch.load() without weights_only=True")
    return found


def test_scanner_finds_every_pattern():
    """The scanner itself can fail: each dangerous form is reported, the harmless look-alikes are not."""
    bad = textwrap.dedent(
        """
        import subprocess, pickle
        from os import system
        import os, torch, builtins
        exec("1"); eval("1"); builtins.eval("1"); __import__("x")
        os.system("x"); os.popen("x"); os.execv("x", []); os.spawnl(0, "x")
        pickle.loads(b""); torch.load("f"); torch.load("f", weights_only=False)
        """
    )
    got = findings(bad)
    for expected in [
        "import subprocess",
        "import pickle",
        "os.system()",
        "exec()",
        "eval()",
        "__import__()",
        "os.popen()",
        "os.execv()",
        "os.spawnl()",
    ]:
        assert expected in got, (expected, got)
    assert got.count("torch.load() without weights_only=True") == 2
    harmless = 'model.eval()\ntorch.load("f", weights_only=True)\nimport os\nos.path.join("a")\n'
    assert findings(harmless) == []


def test_code_execution_only_in_allow_listed_files():
    seen = set()
    unexpected = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for finding in findings(path.read_text()):
            seen.add((rel, finding))
            if (rel, finding) not in ALLOWED:
                unexpected.append(f"{rel}: {finding}")
    assert not unexpected, "code execution / unpickling outside the allow-list: " + "; ".join(unexpected)
    stale = {entry for entry in set(ALLOWED) - seen if (ROOT / entry[0]).exists()}
    assert not stale, f"allow-list entries that no longer match anything (remove them): {stale}"


_RAY_PROBE = """
import json, psutil
import ray  # imported before rlloop sets its environment, as rlloop's own controller does
from rlloop.distributed.ray_setup import init_ray
init_ray(num_cpus=1)
me = psutil.Process()
listen = set()
for p in [me, *me.children(recursive=True)]:
    try:
        listen |= {(p.name(), c.laddr.ip) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print(json.dumps({"listen": sorted(listen), "nodes": [n["NodeManagerAddress"] for n in ray.nodes()]}))
ray.shutdown()
"""


def test_local_ray_binds_loopback_only():
    """A default local cluster (head, raylet, dashboard agent, workers) listens on 127.0.0.1 only."""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        [sys.executable, "-c", _RAY_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["nodes"] == ["127.0.0.1"]
    assert len(report["listen"]) >= 3  # GCS, raylet, agents: the probe saw Ray's processes
    exposed = [
        (name, ip) for name, ip in report["listen"] if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    ]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_redact_hides_secret_looking_keys():
    from rlloop.tracking import redact

    cfg = {"wandb": {"api_key": "k1", "project": "p"}, "hub": [{"HF_TOKEN": "k2"}], "db_password": "k3"}
    assert "k1" not in json.dumps(redact(cfg)) and "k2" not in json.dumps(redact(cfg))
    assert "k3" not in json.dumps(redact(cfg)) and redact(cfg)["wandb"]["project"] == "p"


SECRETS = {
    "WANDB_API_KEY": "secret-xyz-wandb-0123456789abcdef0123456789abcdef",
    "HF_TOKEN": "hf_secretxyzHubToken0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_secretxyzOldHubToken0123",
}


@pytest.mark.slow
def test_api_keys_never_reach_outputs(tmp_path):
    """A 1-step tiny run with wandb (offline) and hub keys in its environment: no output file and no log
    line holds a key (saved configs, metrics, samples, wandb's run files, checkpoints, console)."""
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "logger=[console,jsonl,wandb]",
            "wandb.mode=offline",
            "trainer.total_steps=1",
            "trainer.eval_before=false",
            "trainer.log_samples_every=1",
            "learner.world_size=1",
            "reward=rule",
            f"hydra.run.dir={out}",
        ],
        env={**SECRETS, "WANDB_MODE": "offline"},
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "metrics.jsonl", "samples.jsonl", "train.log"} <= names, names
    assert any(".wandb" in p.name or p.parent.name == "files" for p in files), names  # wandb wrote its run
    for key, secret in SECRETS.items():
        leaks = [str(p.relative_to(out)) for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, f"{key} written to {leaks}"
        assert secret not in proc.stdout + proc.stderr, f"{key} printed to the console"


class _Payload:
    """Unpickling this creates a file: the stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_code(tmp_path):
    """DeepSpeed's own checkpoint loader unpickles anything; under rlloop's resume guard a crafted file is
    refused before its payload runs, while DeepSpeed's real state classes still load."""
    import pickle

    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from rlloop.checkpoint import weights_only_torch_load

    engine = TorchCheckpointEngine()
    evil, marker = tmp_path / "optim_states.pt", tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, evil)
    with weights_only_torch_load(), pytest.raises(pickle.UnpicklingError):
        engine.load(str(evil), map_location="cpu")
    assert not marker.exists()
    engine.load(str(evil), map_location="cpu")  # what DeepSpeed does unguarded
    assert marker.exists(), "the payload should run without the guard (else this test proves nothing)"

    good = tmp_path / "good.pt"
    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.ones(2)}
    torch.save(state, good)
    with weights_only_torch_load():
        loaded = engine.load(str(good), map_location="cpu")
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and torch.equal(loaded["w"], torch.ones(2))
    assert torch.load is not None and "weights_only_torch_load" not in repr(torch.load)  # restored
