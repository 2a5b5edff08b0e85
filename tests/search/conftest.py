"""Tiny local models for the search tests (no hub): a BPE that merges across "\\n\\n", a random tiny Llama,
a tiny Llama that has memorised one worked solution (so greedy step generation is predictable), and a
PRM folder with a random value head."""

from __future__ import annotations

import pytest
import torch


# "\n\n" inside lines, with no pre-tokenisation: the BPE learns merges that span a step boundary
# (".\n\nThe"), which the step cutter must undo.
def _corpus() -> list[str]:
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(200):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        lines.append(f"We add {a} and {b}.\n\nThe sum is {a + b}.\n\nThe answer is \\boxed{{{a + b}}}.")
    return lines + ["Q: what?\n"] * 5


STEPS = ["We add 3 and 4.\n\n", "The sum is 7.\n\n", "The answer is \\boxed{7}."]
SOLUTION = "".join(STEPS)
PROMPT = "Q: what?\n"


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def build_llama(tokenizer, seed: int = 0):
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
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def search_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def random_policy_dir(tmp_path_factory, search_tokenizer):
    path = tmp_path_factory.mktemp("random_policy")
    build_llama(search_tokenizer).eval().save_pretrained(path)
    search_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def memorised_policy_dir(tmp_path_factory, search_tokenizer):
    """A tiny Llama trained until greedy decoding of PROMPT gives SOLUTION then EOS.

    Besides SOLUTION's own tokens it learns the continuations of the step prefixes as the step cutter
    re-encodes them (a BPE token such as ".\\n\\nThe sum is " spans a step boundary and is cut), so that
    greedy step-by-step generation also reproduces SOLUTION.
    """
    torch.set_num_threads(1)
    tok = search_tokenizer
    model = build_llama(tok)
    enc = lambda text: tok(text)["input_ids"]  # noqa: E731
    prompt_ids = enc(PROMPT)
    s1, s2, s3 = STEPS
    targets = [enc(SOLUTION), enc(s1) + enc(s2 + s3), enc(s1) + enc(s2) + enc(s3)]
    rows = [prompt_ids + t + [tok.eos_token_id] for t in targets]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, len(prompt_ids) : len(r)] = torch.tensor(r[len(prompt_ids) :])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 2e-3:
            break
    model.eval()
    path = tmp_path_factory.mktemp("memorised_policy")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def prm_dir(tmp_path_factory, random_policy_dir, search_tokenizer):
    """A PRM folder: the random policy's backbone with a random (non-zero) value head."""
    from rlloop.rewards.prm.model import ValueHeadModel

    model = ValueHeadModel.from_backbone(random_policy_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("prm")
    model.save_pretrained(str(path))
    search_tokenizer.save_pretrained(str(path))
    return str(path)
