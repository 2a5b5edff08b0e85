"""A model given by hub name is fetched once into a local folder (rlloop.models.download_hub_model).

No hub is reachable from these machines: `huggingface_hub.snapshot_download`, the network boundary, is
replaced by a fake that lays out the hub cache the way the real one does (models--org--name/snapshots/
<commit>/) from a locally built tiny model. Everything on rlloop's side of it runs for real.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from rlloop import checkpoint, models
from rlloop.config import ModelConfig
from rlloop.models import HUB_FILES, ModelError, resolve_model

TINY = dict(name="tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake snapshot_download over one tiny model; its calls are recorded in `hub.calls`."""
    source = resolve_model(ModelConfig(**TINY, cache_dir=str(tmp_path / "built")))
    monkeypatch.setattr(models, "_hub_resolved", {})  # each test resolves afresh

    class Hub:
        calls: list[dict] = []
        bin_only = False
        fail: Exception | None = None

        @staticmethod
        def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
            Hub.calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
            if Hub.fail is not None:
                raise Hub.fail
            folder = tmp_path / "hf" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
            if not folder.exists():
                shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
            if Hub.bin_only and "*.bin" in allow_patterns:
                import torch
                from safetensors.torch import load_file

                torch.save(load_file(f"{source}/model.safetensors"), folder / "pytorch_model.bin")
            elif not Hub.bin_only:
                shutil.copy2(f"{source}/model.safetensors", folder)
            return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", Hub.snapshot_download)
    return Hub


def test_a_hub_name_becomes_its_local_snapshot_once(hub):
    cfg = ModelConfig(name="hf", path="org/tiny-model", revision="v1")
    folder = resolve_model(cfg)
    assert folder.endswith(f"models--org--tiny-model/snapshots/{COMMIT}")
    assert resolve_model(cfg) == folder  # the same folder (the same commit) for the rest of the run
    assert hub.calls == [{"repo_id": "org/tiny-model", "revision": "v1", "allow_patterns": list(HUB_FILES)}]
    # what a checkpoint records: the commit, and the weights it holds
    identity = checkpoint.model_identity(folder)
    assert identity["model_revision"] == COMMIT
    assert identity["model_weights"] == checkpoint.weights_digest(folder)


def test_bin_weights_are_fetched_only_when_there_are_no_safetensors(hub):
    hub.bin_only = True
    folder = resolve_model(ModelConfig(name="hf", path="org/old-model"))
    assert [c["allow_patterns"] for c in hub.calls] == [list(HUB_FILES), [*HUB_FILES, "*.bin"]]
    assert [c["revision"] for c in hub.calls] == [None, None]
    assert (Path(folder) / "pytorch_model.bin").is_file() and not list(Path(folder).glob("*.safetensors"))


def test_an_unreachable_hub_is_one_error_naming_the_model(hub):
    hub.fail = LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has been disabled.")
    with pytest.raises(ModelError) as err:
        resolve_model(ModelConfig(name="hf", path="org/tiny-model", revision="v2"))
    message = str(err.value)
    assert "model.path=org/tiny-model@v2 is not a local folder and the hub could not provide it" in message
    assert "LocalEntryNotFoundError: Cannot find the requested files" in message
    assert "huggingface-cli download org/tiny-model" in message


def test_a_revision_is_for_hub_names_only(tmp_path, hub):
    local = resolve_model(ModelConfig(**TINY, cache_dir=str(tmp_path / "built")))
    with pytest.raises(ModelError, match="model.revision=v1 is for hub names, but model.path=.* is a local folder"):
        resolve_model(ModelConfig(name="hf", path=local, revision="v1"))
    assert checkpoint.hub_revision(local) is None
    assert hub.calls == []
