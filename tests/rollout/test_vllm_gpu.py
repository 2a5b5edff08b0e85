"""GPU tier for the vLLM engine: official vLLM (the `gpu` extra) on CUDA. Skipped without CUDA or without
the official build. Run on a GPU machine: `pip install -e '.[gpu,test]' && pytest -m gpu tests/rollout`.

Not yet run on a GPU (written on a CPU-only machine, 2026-12-01): the bounds below are guesses to be
measured there (float32 on GPU may use TF32 matmuls: hence the looser ATOL than the CPU tier's 1e-4).
"""

from __future__ import annotations

import pytest
import torch

from rlloop.rollout.vllm_engine import VLLM_PIN, installed_vllm

from .test_vllm_engine import PROMPTS, TINY_VLLM, max_logprob_diff

ATOL = 2e-3
_WHY = (
    "no CUDA device"
    if not torch.cuda.is_available()
    else None
    if installed_vllm().get("vllm", "").split("+")[0] == VLLM_PIN
    else f"official vllm=={VLLM_PIN} is not installed (pip install -e '.[gpu]')"
)
pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlloop.models.builders import build_tiny

    return build_tiny(TINY_VLLM, tmp_path_factory.mktemp("tiny_vllm_gpu"))


@pytest.fixture(scope="module")
def engine(model_dir):
    from rlloop.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, max_model_len=256, gpu_memory_utilization=0.3, enable_sleep_mode=True)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def test_generate_logprobs_match_hf(engine, hf_model, prompt_ids):
    assert not engine.on_cpu
    out = engine.generate(prompt_ids, n=4, max_new_tokens=16, temperature=0.7, seed=0)
    assert all(len(s) == 4 for s in out)
    assert max_logprob_diff(engine, hf_model, prompt_ids, out, 0.7) < ATOL
    again = engine.generate(prompt_ids, n=4, max_new_tokens=16, temperature=0.7, seed=0)
    assert [[o.response_ids for o in s] for s in out] == [[o.response_ids for o in s] for s in again]


def test_sleep_frees_gpu_memory_and_wake_restores(engine, prompt_ids):
    free_awake = torch.cuda.mem_get_info()[0]
    before = engine.generate(prompt_ids, n=1, max_new_tokens=8, temperature=0.0)
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_awake  # the KV cache (and weights) left the GPU
    engine.wake()
    after = engine.generate(prompt_ids, n=1, max_new_tokens=8, temperature=0.0)
    assert [s[0].response_ids for s in after] == [s[0].response_ids for s in before]


def test_update_weights_matches_hf(engine, hf_model, model_dir, prompt_ids):
    import numpy as np
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    new = {
        k: (v.numpy() + rng.normal(0, 0.3, v.shape)).astype(np.float32)
        for k, v in hf_model.state_dict().items()
    }
    engine.update_weights(new, 1)
    new_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    new_model.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()})
    out = engine.generate(prompt_ids, n=2, max_new_tokens=12, temperature=1.0, seed=1)
    assert max_logprob_diff(engine, new_model, prompt_ids, out, 1.0) < ATOL


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism needs 2 GPUs")
def test_tensor_parallel_2_matches_hf(model_dir, hf_model, prompt_ids):
    from rlloop.rollout.vllm_engine import VLLMEngine

    tp = VLLMEngine(model_dir, max_model_len=256, tensor_parallel_size=2, gpu_memory_utilization=0.3)
    out = tp.generate(prompt_ids, n=2, max_new_tokens=12, temperature=1.0, seed=1)
    assert max_logprob_diff(tp, hf_model, prompt_ids, out, 1.0) < ATOL


def test_grpo_steps_with_vllm_rollout(tmp_path):
    from tests.conftest import LENGTH_REWARD, TINY_RUN, run_cli

    result = run_cli(
        [
            *TINY_RUN,
            *LENGTH_REWARD,
            "model.num_heads=2",
            "rollout=vllm",
            "rollout.prompts_per_step=4",
            "rollout.n=4",
            "rollout.max_new_tokens=24",
            "cluster=gpu_separate",
            "learner.world_size=1",
            "cluster.prm.num_gpus=0",
            "trainer.total_steps=3",
            f"out_dir={tmp_path}",
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VLLMEngine" in result.stderr + result.stdout
