"""A non-editable `pip install .` in a fresh venv runs `rlloop train model=tiny trainer.total_steps=1`.

The wheel must carry the config tree (setup.py copies the top-level conf/ into it as rlloop/_conf), and
nothing may read the checkout: the install is built from a copy of the sources, and the run starts in
an empty folder.

No download: the fresh venv sees this test environment's site-packages through a .pth file (a path
line only, so the checkout's editable-install hook in there is not run), and pip installs with
--no-index. pip resolves every dependency rlloop declares against what is already installed and so
installs rlloop alone; a dependency missing from this environment would fail the install here instead
of fetching torch again. --no-build-isolation builds with this environment's setuptools (torch 2.13
requires setuptools>=77, which builds wheels by itself).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT

SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "rlloop", "conf")


def _run(cmd: list, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_a_wheel_install_in_a_fresh_venv_trains(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_conf"))
        else:
            shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / "rlloop_test_base_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "RLLOOP_CACHE": str(tmp_path / "cache")}

    install = _run([python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "."], src, env, 600)
    assert "Successfully installed rlloop-" in install.stdout
    installed = install.stdout.split("Successfully installed ")[-1].split()
    assert [p.rsplit("-", 1)[0] for p in installed] == ["rlloop"], installed  # nothing else, no torch

    work = tmp_path / "work"  # an empty folder: no conf/, no rlloop/ beside the run
    work.mkdir()
    where = _run([python, "-c", "import rlloop.confdir as c; print(c.__file__); print(c.conf_dir())"], work, env, 60)
    module_file, conf = where.stdout.split()
    assert module_file.startswith(str(site)) and conf == str(site / "rlloop" / "_conf"), where.stdout
    shipped = {p.relative_to(conf).as_posix() for p in Path(conf).rglob("*.yaml")}
    assert shipped == {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}

    run = _run([venv / "bin" / "rlloop", "train", "model=tiny", "trainer.total_steps=1"], work, env, 900)
    assert "outputs: " in run.stdout, run.stdout[-2000:]
    (metrics,) = work.glob("outputs/*/*/metrics.jsonl")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 1 in steps, steps
    assert (metrics.parent / "checkpoint" / "config.json").is_file()
