"""benchmarks/vs_trl.py names an rlloop run that generates with vLLM `...-vllm`, in its summary and its run
folder, so results of the two engines never mix (the smoke test of the whole script is slow-marked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def test_vllm_runs_are_named_for_their_engine():
    spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "benchmarks" / "vs_trl.py")
    vs_trl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs_trl)
    for overrides, want in (
        (["rollout=vllm", "rollout.num_workers=1"], "-vllm"),
        (["rollout.engine=vllm"], "-vllm"),
        (["rollout.num_workers=2"], ""),
        ([], ""),
    ):
        assert vs_trl._engine_suffix(SimpleNamespace(rlloop_override=overrides)) == want
