import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlloop.config import ModelConfig
from rlloop.models import ModelError, cache_dir, resolve_model
from rlloop.models.tokenizer import build_tokenizer

TINY = dict(
    name="tiny",
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    vocab_size=300,
    max_position_embeddings=256,
)


def test_tokenizer_splits_digits_and_round_trips():
    tok = build_tokenizer(["12345 + 678 = 13023\n\nThe answer is \\boxed{13023}."] * 20, vocab_size=300)
    text = "Sam has 1234 marbles; 56 - 7 = 49 ünï \\boxed{49}"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in ids]
    # every digit is its own token, whatever merges the BPE learned
    for p in pieces:
        assert not (sum(c.isdigit() for c in p) > 1), pieces
    assert [p for p in pieces if p.strip().isdigit()][:4] == ["1", "2", "3", "4"]
    assert (
        tok.eos_token == "<|end|>" and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    )


def test_tokenizer_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["abc"], vocab_size=100)


def test_tiny_builds_caches_and_generates(tmp_path):
    cfg = ModelConfig(**TINY, cache_dir=str(tmp_path))
    path = resolve_model(cfg)
    assert path.startswith(str(tmp_path)) and resolve_model(cfg) == path  # cached
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    assert 0.05e6 < n < 0.5e6 and not model.config.tie_word_embeddings
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], add_generation_prompt=True, tokenize=False
    )
    enc = tok(ids, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc.input_ids.shape[1]
    # a changed architecture is a different cache entry
    other = resolve_model(ModelConfig(**{**TINY, "hidden_size": 32}, cache_dir=str(tmp_path)))
    assert other != path


def test_resolve_model_errors_name_the_path(tmp_path):
    with pytest.raises(ModelError, match="model.path=.*does-not-exist"):
        resolve_model(ModelConfig(name="hf", path=str(tmp_path / "does-not-exist")))
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(ModelConfig(name="hf", path=str(tmp_path)))
    with pytest.raises(ModelError, match="model.path"):
        resolve_model(ModelConfig(name="hf"))
    with pytest.raises(ModelError, match="model.name='gpt9'"):
        resolve_model(ModelConfig(name="gpt9", cache_dir=str(tmp_path)))
    # a hub name is fetched into a local folder: tests/models/test_hub.py


def test_resolve_model_accepts_existing_folder(tmp_path):
    tiny = resolve_model(ModelConfig(**TINY, cache_dir=str(tmp_path)))
    assert resolve_model(ModelConfig(name="hf", path=tiny)) == tiny


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("RLLOOP_CACHE", str(tmp_path / "env"))
    assert cache_dir(ModelConfig()) == tmp_path / "env"
    assert cache_dir(ModelConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"


@pytest.mark.slow
def test_smollm2_conversion_loads_without_quantization_config(tmp_path):
    pytest.importorskip("gguf")
    from rlloop.models import convert_smollm2

    torch.set_num_threads(1)
    out = convert_smollm2(tmp_path / "smollm2", dtype="bfloat16")
    cfg = json.loads((tmp_path / "smollm2" / "config.json").read_text())
    assert "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and len(tok) > 40000
    n = sum(p.numel() for p in model.parameters())
    assert 130e6 < n < 140e6
