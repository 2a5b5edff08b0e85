"""The model's identity in a checkpoint (rlloop.checkpoint.model_identity) and the resume check on it."""

from __future__ import annotations

import json
import shutil

import pytest

from rlloop import checkpoint
from rlloop.config import ModelConfig
from rlloop.errors import RlloopError
from rlloop.models import resolve_model
from rlloop.train import input_error

TINY = dict(name="tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)


@pytest.fixture
def model(tmp_path):
    """A private copy of a tiny model folder, free to be changed."""
    built = resolve_model(ModelConfig(**TINY, cache_dir=str(tmp_path / "cache")))
    return shutil.copytree(built, tmp_path / "model")


def _flip_a_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_weights_digest_sees_weights_and_tokenizer_not_metadata(model):
    before = checkpoint.weights_digest(model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}))
    (model / "README.md").write_text("a model card")
    assert checkpoint.weights_digest(model) == before
    assert checkpoint.model_identity(model)["model_fingerprint"] == checkpoint.model_fingerprint(model)
    weights = model / "model.safetensors"
    _flip_a_byte(weights, weights.stat().st_size - 1)  # the last parameter's last byte
    after_weights = checkpoint.weights_digest(model)
    assert after_weights != before
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = tokenizer.get("added_tokens", [])[:-1]
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert checkpoint.weights_digest(model) != after_weights


def test_large_weight_files_are_sampled(model, monkeypatch):
    monkeypatch.setattr(checkpoint, "_WHOLE_FILE_BYTES", 1024)
    monkeypatch.setattr(checkpoint, "_SAMPLE_BYTES", 256)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    before = checkpoint.weights_digest(model)
    _flip_a_byte(weights, size - 1)  # inside the last sample
    assert checkpoint.weights_digest(model) != before
    sampled = checkpoint.weights_digest(model)
    # between two samples: the price of reading 16 MiB of a 15 GB model, not all of it
    gap = (size - 256) // 15
    _flip_a_byte(weights, 256 + (gap - 256) // 2)
    assert checkpoint.weights_digest(model) == sampled


def _checkpoint(tmp_path, state: dict):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 1, **state}))
    return ckpt


def test_resume_refuses_a_changed_model(tmp_path, model):
    started = checkpoint.model_identity(model)
    ckpt = _checkpoint(tmp_path, {**started, "model_path": str(model), "model_revision": "a" * 40})
    assert checkpoint.load_state(ckpt, fingerprint={**started, "model_revision": "a" * 40}, total_steps=2)
    # another hub commit with the very same files is the same model
    assert checkpoint.load_state(ckpt, fingerprint={**started, "model_revision": "b" * 40}, total_steps=2)
    changed = {**started, "model_weights": "0" * 16, "model_revision": "b" * 40}
    with pytest.raises(RlloopError) as err:
        checkpoint.load_state(ckpt, fingerprint=changed, total_steps=2)
    message = str(err.value)
    assert f"the model changed since its run started from {model}" in message
    assert f"digest {started['model_weights']} then, {'0' * 16} now" in message
    assert f"hub revision {'a' * 40} then, {'b' * 40} now" in message
    assert f"model.revision={'a' * 40}" in message
    # a checkpoint written before weights were recorded is checked by architecture only
    old = _checkpoint(tmp_path / "old", {"model_fingerprint": started["model_fingerprint"]})
    assert checkpoint.load_state(old, fingerprint=changed, total_steps=2)["step"] == 1


def test_train_refuses_to_resume_onto_a_changed_model_folder(tmp_path, model):
    ckpt = _checkpoint(tmp_path, {**checkpoint.model_identity(model), "model_path": str(model)})
    args = ["task=arith", "task.num_train=20", "task.num_test=4", f"model.path={model}", "trainer.total_steps=2",
            f"trainer.resume={ckpt}"]  # fmt: skip
    assert input_error(args) is None
    _flip_a_byte(model / "model.safetensors", (model / "model.safetensors").stat().st_size - 1)
    error = input_error(args)
    assert error is not None and error.startswith(f"error: checkpoint {ckpt}: the model changed"), error
