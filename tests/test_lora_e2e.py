"""End to end with learner.lora: every actor for real, the learner trains an adapter and syncs only it."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import TINY_RUN, run_cli
from tests.test_train_e2e import FIXTURES, LENGTH_REWARD


@pytest.mark.slow
def test_lora_run_trains_the_adapter_and_syncs_only_it(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        [*TINY_RUN, "trainer.total_steps=2", "learner.lora.rank=8", "learner.lr_scheduler=linear",
         "learner.lr_warmup_steps=1", *LENGTH_REWARD, f"hydra.run.dir={out}"],
        env={"PYTHONPATH": FIXTURES},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/lr" in r]
    assert [r["actor/lr"] for r in steps] == pytest.approx([0.0, 1e-3])  # warm-up, then linear from lr
    assert steps[-1]["actor/grad_norm"] > 0
    # the synced payload is the adapter: the float32 bytes of what the run saved as its adapter
    adapter = load_file(str(out / "checkpoint" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    adapter_mb = sum(4 * t.numel() for t in adapter.values()) / 2**20
    assert all(r["sync/mb"] == pytest.approx(adapter_mb) for r in steps)
    assert any(t.abs().max() > 0 for k, t in adapter.items() if ".lora_B." in k)  # B starts at 0


@pytest.mark.slow
def test_learner_memory_benchmark_smoke():
    import subprocess
    import sys

    from tests.conftest import ROOT

    cmd = [sys.executable, "benchmarks/learner_memory.py", "--model", "tiny", "--rows", "2", "--prompt-len", "6",
           "--response-len", "4", "--micro-batch", "2", "--steps", "1", "--arms", "full+zero0,lora+zero0"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| full+zero0 |" in out.stdout and "| lora+zero0 |" in out.stdout
    estimate = subprocess.run([sys.executable, "benchmarks/learner_memory.py", "--estimate"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert estimate.returncode == 0 and "| Qwen2.5-7B | 7.62 B | full FT, ZeRO-2 | 182.8 |" in estimate.stdout
