"""The critic of algo.advantage=gae (rlloop.learner.critic): value alignment against a plain per-row
reference, initialisation from a PRM / a Q-RM / a plain LM, the clipped value update, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .conftest import algo_cfg, learner_cfg, make_batch


def critic(model_path: str, port: int, *, kind: str, output: str, lr: float = 1e-2, bf16: bool = False, **algo):
    from rlloop.learner.critic import CriticLearner

    return CriticLearner(
        model_path,
        learner_cfg(lr=lr, bf16=bf16),
        algo_cfg(
            advantage="gae",
            critic={"init_path": model_path, "init_kind": kind, "output": output, "value_clip": 0.2},
            **algo,
        ),
        rank=0,
        world_size=1,
        master_addr="127.0.0.1",
        master_port=port,
        train_batch_size=5,
    )


@pytest.fixture(scope="module")
def prm_path(tiny_model_path, tmp_path_factory) -> str:
    """A PRM folder on the tiny backbone with a random (non-zero) head, so values differ per token."""
    from rlloop.rewards.prm.model import ValueHeadModel

    torch.manual_seed(1)
    model = ValueHeadModel.from_backbone(tiny_model_path)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.constant_(model.head.bias, 0.3)
    path = str(tmp_path_factory.mktemp("prm") / "prm")
    model.save_pretrained(path)
    return path


def reference_values(model, batch, sigmoid: bool) -> np.ndarray:
    """One unbatched forward per row; V before token t = head(h_{t-1}), a loop over positions."""
    out = np.zeros(batch.input_ids.shape, dtype=np.float32)
    with torch.no_grad():
        for b in range(len(batch)):
            length = int(batch.attention_mask[b].sum())
            logits = model(torch.as_tensor(batch.input_ids[b : b + 1, :length]))[0]
            for t in range(1, length):
                v = float(logits[t - 1])
                out[b, t] = 1 / (1 + np.exp(-v)) if sigmoid else v
    return out


def test_resolve_critic_init_names_what_is_missing(tiny_model_path, prm_path, tmp_path):
    from rlloop.learner.critic import resolve_critic_init

    kw = {"policy_path": tiny_model_path, "prm_path": prm_path, "qrm_path": None}
    assert resolve_critic_init("policy", "auto", **kw).kind == "lm"
    assert resolve_critic_init("policy", "auto", **kw).output == "linear"
    prm = resolve_critic_init("prm", "auto", **kw)
    assert (prm.kind, prm.output, prm.path) == ("prm", "sigmoid", prm_path)
    assert resolve_critic_init(prm_path, "linear", **kw).output == "linear"  # a folder, output overridden
    with pytest.raises(ValueError, match="reward.qrm.path"):
        resolve_critic_init("qrm", "auto", **kw)
    with pytest.raises(ValueError, match="not a PRM folder"):
        resolve_critic_init("prm", "auto", **{**kw, "prm_path": tiny_model_path})
    with pytest.raises(ValueError, match="no such folder"):
        resolve_critic_init(str(tmp_path / "nope"), "auto", **kw)
    with pytest.raises(ValueError, match="algo.critic.output"):
        resolve_critic_init("policy", "tanh", **kw)


def test_a_critic_init_with_another_tokenizer_is_refused(tiny_model_path, prm_path, tmp_path):
    """The critic reads the policy's token ids: a PRM folder with another tokenizer can score steps (text
    offsets) but cannot be the critic; the error names the key and the folder."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from rlloop.learner.critic import resolve_critic_init

    def tokenizer(words: list[str]):
        vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")

    tokenizer(["a", "b"]).save_pretrained(prm_path)
    kw = {"policy_path": tiny_model_path, "prm_path": prm_path, "qrm_path": None}
    assert resolve_critic_init("prm", "auto", **kw, policy_tokenizer=tokenizer(["a", "b"])).kind == "prm"
    with pytest.raises(ValueError, match=r"algo.critic.init=prm.*tokenizers differ.*critic reads the policy"):
        resolve_critic_init("prm", "auto", **kw, policy_tokenizer=tokenizer(["a", "c"]))


def test_critic_from_a_prm_reads_its_values_and_learns_toward_returns(prm_path, dist_port, tmp_path):
    """The TD-PRM as critic: its values are the PRM's sigmoid(head) at the previous token; a few clipped
    value steps move them toward the returns; the saved critic loads as a PRM folder with the same values."""
    from rlloop.rewards.prm.model import ValueHeadModel

    learner = critic(prm_path, dist_port, kind="prm", output="sigmoid")
    batch = make_batch(num_rows=5)
    values = learner.compute_values(batch)
    expected = reference_values(ValueHeadModel.from_pretrained(prm_path).eval(), batch, sigmoid=True)
    np.testing.assert_allclose(values, expected, atol=1e-5)
    assert np.all(values[:, 0] == 0) and np.all(values[batch.attention_mask == 0] == 0)
    assert values[batch.attention_mask[:, 1:].astype(bool).nonzero()[0], 1].min() > 0  # sigmoid, not 0

    mask = batch.response_mask.astype(bool)
    target = np.where(np.arange(len(batch))[:, None] % 2 == 0, 1.0, 0.0).astype(np.float32)
    batch.returns = (target * batch.response_mask).astype(np.float32)

    def mse(v: np.ndarray) -> float:
        return float(((v - batch.returns)[mask] ** 2).mean())

    before = mse(values)
    losses = []
    for _ in range(8):
        batch.values = learner.compute_values(batch)  # each step clips around the values it was scored with
        metrics = learner.train_step(batch)
        losses.append(metrics["critic/vf_loss"])
        assert set(metrics) >= {"critic/vf_loss", "critic/vf_clipfrac", "critic/grad_norm", "critic/lr"}
    after_values = learner.compute_values(batch)
    assert mse(after_values) < 0.5 * before, (before, mse(after_values), losses)
    assert learner.version == 8

    out = str(tmp_path / "critic")
    learner.save_pretrained(out)
    reloaded = ValueHeadModel.from_pretrained(out).eval()
    np.testing.assert_allclose(reference_values(reloaded, batch, sigmoid=True), after_values, atol=1e-5)


def test_value_clip_bounds_one_step(tiny_model_path, dist_port):
    """At the anchor (V = batch.values) both branches of the clipped loss agree: 1/2 mean (V - R)^2, worked
    by hand; a fresh critic's zero head still gets a gradient."""
    learner = critic(tiny_model_path, dist_port, kind="lm", output="linear", lr=1e-3)
    batch = make_batch(num_rows=4, seed=3)
    batch.values = learner.compute_values(batch)
    assert np.allclose(batch.values, 0)  # zero head: V = 0 everywhere before training (linear output)
    batch.returns = (3.0 * batch.response_mask).astype(np.float32)
    metrics = learner.train_step(batch)
    # at the anchor V = old = 0: both branches equal, loss = 1/2 * 3^2 on every response token
    assert metrics["critic/vf_loss"] == pytest.approx(4.5, rel=1e-5)
    assert metrics["critic/vf_clipfrac"] == 0.0
    moved = learner.compute_values(batch)[batch.response_mask.astype(bool)]
    assert np.abs(moved).max() > 0  # the zero head got a gradient


def test_qrm_head_initialises_the_critic(tiny_model_path, tmp_path):
    from rlloop.learner.critic import CriticInit, load_value_model
    from rlloop.rewards.qrm.model import TokenQModel

    torch.manual_seed(2)
    qrm = TokenQModel.from_backbone(tiny_model_path)
    qrm.save_pretrained(str(tmp_path / "qrm"))
    model = load_value_model(CriticInit(str(tmp_path / "qrm"), "qrm", "linear"))
    assert torch.equal(model.head.weight, qrm.head.weight.float()) and float(model.head.bias.detach()) == 0.0
    ids = torch.randint(1, 200, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), qrm(ids))  # V(h) = s(h): the Q-RM's token scores


def test_bf16_critic_step(prm_path, dist_port):
    """learner.bf16 casts the engine's parameters, the value head included: a step still runs and the
    values stay finite and in (0, 1) for a sigmoid critic."""
    learner = critic(prm_path, dist_port, kind="prm", output="sigmoid", bf16=True, lr=1e-4)
    batch = make_batch(num_rows=4, seed=5)
    batch.values = learner.compute_values(batch)
    batch.returns = batch.response_mask.copy()
    metrics = learner.train_step(batch)
    assert np.isfinite(metrics["critic/vf_loss"])
    v = learner.compute_values(batch)[batch.response_mask.astype(bool)]
    assert np.all((v > 0) & (v < 1))
