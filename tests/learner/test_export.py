"""`rlloop export --dtype`: a learner checkpoint written as fp32 (the default) or bf16 HF weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rlloop import checkpoint, export
from rlloop.errors import RlloopError
from rlloop.models.tokenizer import build_tokenizer
from tests.learner.conftest import inprocess_learner, make_batch


def test_export_writes_fp32_or_bf16_weights_of_the_same_model(tiny_model_path, dist_port, tmp_path):
    learner = inprocess_learner(tiny_model_path, dist_port)
    learner.train_step(make_batch(num_rows=4, seed=7))
    ckpt = tmp_path / "step_000001"
    learner.save_checkpoint(str(ckpt / "learner"))
    shutil.copytree(tiny_model_path, ckpt / "hf")
    build_tokenizer(["1 + 2 = 3"], vocab_size=300).save_pretrained(ckpt / "hf")
    (ckpt / checkpoint.STATE_FILE).write_text("{}")

    fp32 = load_file(export.export(ckpt, tmp_path / "fp32") / "model.safetensors")
    out = export.export(ckpt, tmp_path / "bf16", dtype="bfloat16")
    bf16 = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert fp32.keys() == bf16.keys()
    for key, weights in fp32.items():
        assert weights.dtype == torch.float32 and bf16[key].dtype == torch.bfloat16, key
        assert torch.equal(bf16[key], weights.to(torch.bfloat16)), key  # rounded once, nothing else changed
    assert sum(t.numel() * t.element_size() for t in bf16.values()) * 2 == sum(
        t.numel() * t.element_size() for t in fp32.values()
    )
    with pytest.raises(RlloopError, match="--dtype float16: choose from float32, bfloat16"):
        export.export(ckpt, tmp_path / "fp16", dtype="float16")
