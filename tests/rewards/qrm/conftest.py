"""Tiny Q-RM backbones built locally (no hub): the built-in per-digit tokenizer + a small random Llama."""

from __future__ import annotations

import pytest
import torch


def build_tokenizer():
    from rlloop.models.builders import tiny_corpus
    from rlloop.models.tokenizer import build_tokenizer as build

    return build(tiny_corpus(), vocab_size=300)


def save_lm(path, tokenizer, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def qrm_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory, qrm_tokenizer):
    """A plain causal LM folder (no Q-RM head), like the policy's init."""
    return save_lm(tmp_path_factory.mktemp("qrm_lm"), qrm_tokenizer)
