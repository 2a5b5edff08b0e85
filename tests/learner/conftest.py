"""Fixtures for the learner tests: a tiny untied Llama saved to disk, batches in the Batch layout, Ray."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from rlloop.types import Batch

VOCAB = 256


def learner_cfg(**overrides) -> dict:
    """A plain-dict LearnerConfig for tests (lr large enough to see a step move logprobs)."""
    cfg = {
        "world_size": 1,
        "zero_stage": 2,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "betas": [0.9, 0.99],
        "micro_batch_size": 2,
        "grad_clip": 1.0,
        "bf16": False,
        "num_threads": 1,
        "master_port": 0,
        # make ZeRO-3 really partition every parameter of the tiny model
        "zero3_param_persistence_threshold": 0,
    }
    cfg.update(overrides)
    return cfg


def algo_cfg(**overrides) -> dict:
    cfg = {
        "advantage": "grpo",
        "adv_eps": 1e-6,
        "gamma": 1.0,
        "lam": 1.0,
        "policy_loss": "ppo",
        "clip_low": 0.2,
        "clip_high": 0.2,
        "clip_ratio_c": 3.0,
        "loss_agg": "token-mean",
        "kl_coef": 0.0,
        "kl_estimator": "k3",
        "kl_in_reward": False,
        "entropy_coef": 0.0,
        "use_ref": True,
        "tis_cap": None,
        "ppo_epochs": 1,
    }
    cfg.update(overrides)
    return cfg


def make_batch(num_rows: int = 5, max_len: int = 16, seed: int = 0) -> Batch:
    """Right-padded rows of varied prompt/response lengths; advantages +1 on row 0, -1 elsewhere."""
    rng = np.random.default_rng(seed)
    input_ids = np.zeros((num_rows, max_len), dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    response_mask = np.zeros((num_rows, max_len), dtype=np.float32)
    for b in range(num_rows):
        prompt_len = int(rng.integers(2, 6))
        length = int(rng.integers(prompt_len + 2, max_len + 1))
        input_ids[b, :length] = rng.integers(1, VOCAB, size=length)
        attention_mask[b, :length] = 1
        response_mask[b, prompt_len:length] = 1.0
    advantages = np.where(np.arange(num_rows)[:, None] == 0, 1.0, -1.0).astype(np.float32) * response_mask
    zeros = np.zeros((num_rows, max_len), dtype=np.float32)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=advantages,
        returns=advantages.copy(),
        rollout_logprobs=zeros.copy(),
    )


def hf_logprobs(model_path: str, batch: Batch, temperature: float = 1.0) -> np.ndarray:
    """Obviously-correct reference: one unbatched HF forward per row, a Python loop over the response
    positions (what compute_logprobs returns; 0 on prompt and padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = np.zeros(batch.input_ids.shape, dtype=np.float32)
    with torch.no_grad():
        for b in range(len(batch)):
            length = int(batch.attention_mask[b].sum())
            ids = torch.as_tensor(batch.input_ids[b : b + 1, :length])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double() / temperature, dim=-1)
            for t in range(1, length):
                if batch.response_mask[b, t] > 0:
                    out[b, t] = float(logp[t - 1, ids[0, t]])
    return out


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A random-init, untied Llama (~0.11 M params) saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("tiny_llama") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster for the whole session (loopback, no auth, no dashboard)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from rlloop.distributed.ray_setup import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")


@pytest.fixture(scope="package")
def dist_port():
    """A free port for in-process world-size-1 learners. DeepSpeed reuses one process group for every
    learner of this package (it caches groups, so a re-created one breaks it); destroyed when the package
    is done, and the RANK/MASTER_PORT variables PolicyLearner put into os.environ are removed again —
    left behind, every later subprocess (CLIs, TRL) would try to listen on this group's port."""
    import torch

    saved = {key: os.environ.get(key) for key in _DIST_ENV}
    torch.set_num_threads(1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    yield port
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def inprocess_learner(
    model_path: str, port: int, *, algo: dict | None = None, temperature: float = 0.7, **cfg
):
    """PolicyLearner at world size 1 in this process (ZeRO-2 unless cfg says otherwise)."""
    from rlloop.learner.policy import PolicyLearner

    return PolicyLearner(
        model_path,
        learner_cfg(**cfg),
        algo or algo_cfg(),
        rank=0,
        world_size=1,
        master_addr="127.0.0.1",
        master_port=port,
        temperature=temperature,
        train_batch_size=5,
    )
