"""Tiny PRM backbones and tokenizers, built locally (no hub).

The PRM deliberately uses a different architecture (Qwen2) and a different tokenizer (pre-tokenised
byte-level BPE with a BOS token and trimmed offsets) from the policy-side one, whose BPE merges across
"\\n\\n". Note: transformers 5's AutoTokenizer loads a qwen2 folder as `Qwen2Tokenizer`, which replaces
the saved pre-tokenizer with Qwen2's regex (digits split one by one); the PRM's tokenizer in these tests
is therefore `scorer.tokenizer`, not the fixture object.
"""

from __future__ import annotations

import pytest
import torch

CORPUS = [
    "Question: what is 12 + 30?\n\nFirst we add 10 and 30.\n\nThen we add 2.\n\nThe answer is 42.",
    "Question: what is 7 - 5?\n\nWe take 5 from 7.\n\nThe answer is \\boxed{2} ✓",
    "Step one.\n\nThe next step.\n\nThe final answer is 42.",
] * 20


def build_tokenizer(vocab_size: int, use_regex: bool, bos: bool, trim_offsets: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    byte_level = processors.ByteLevel(trim_offsets=trim_offsets)
    if bos:  # the PRM's tokenizer prepends <bos> to the prompt, like Llama-style tokenizers
        template = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>"
    )


def build_backbone_lm(tokenizer, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def prm_tokenizer():
    return build_tokenizer(300, use_regex=True, bos=True, trim_offsets=True)


@pytest.fixture(scope="session")
def policy_tokenizer():
    """Another tokenizer (merges across "\\n\\n", no BOS): stands in for the policy's."""
    return build_tokenizer(360, use_regex=False, bos=False, trim_offsets=False)


@pytest.fixture(scope="session")
def plain_lm_dir(tmp_path_factory, prm_tokenizer):
    """A plain causal LM folder (no value head), like the policy's init."""
    path = tmp_path_factory.mktemp("plain_lm")
    build_backbone_lm(prm_tokenizer).save_pretrained(path)
    prm_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def prm_dir(tmp_path_factory, plain_lm_dir, prm_tokenizer):
    """A saved PRM with a random (non-zero) value head, so values differ between positions."""
    from rlloop.rewards.prm.model import ValueHeadModel

    model = ValueHeadModel.from_backbone(plain_lm_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)
        model.head.bias.fill_(0.1)
    path = tmp_path_factory.mktemp("prm")
    model.save_pretrained(str(path))
    prm_tokenizer.save_pretrained(str(path))
    return str(path)


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
