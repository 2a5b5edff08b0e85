"""Tiny local models and tokenizers for the rollout tests (no hub, built in about a second)."""

from __future__ import annotations

import pytest

# Lines with "\n\n" inside sentences, so that a BPE without pre-tokenisation learns merges that cross
# step boundaries (".\n\nThe"), and with multi-byte characters that end up split over several tokens.
CORPUS = [
    "First we add 3 and 4.\n\nThe sum is 7.\n\nSo the answer is 7.",
    "Step one.\n\nThe next step.\n\nThe final answer is 42.",
    "Compute 12 + 30.\n\nThe result is 42.\n\nDone.",
    "We check it twice.\n\nThe answer is \\boxed{5}.",
    "Angles: π/2 and π/3 ✓\n\nThe sum is 5π/6 ✓",
] * 20


def build_bpe_tokenizer(vocab_size: int = 320, use_regex: bool = False):
    """A byte-level BPE (HF fast tokenizer) trained on CORPUS.

    use_regex=False turns off GPT-2's pre-tokenisation so merges may span "\\n\\n".
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def build_tiny_llama(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
    """A saved tiny untied Llama + its tokenizer: an HF folder like a real policy checkpoint."""
    path = tmp_path_factory.mktemp("tiny_policy")
    build_tiny_llama(bpe_tokenizer).save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def make_tiny_llama():
    """`build_tiny_llama(tokenizer, seed)` for tests that need a second, differently initialised model."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster for the session (loopback, no auth, no dashboard; ENVIRONMENT.md §4)."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from rlloop.distributed.ray_setup import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
