"""TokenQModel save/load, QRMScorer's per-token alignment and errors, the critic initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlloop.rewards.qrm.model import HEAD_FILE, TokenQModel
from rlloop.rewards.qrm.service import QRMScorer


def test_head_has_no_bias_and_round_trips(lm_dir, tmp_path):
    model = TokenQModel.from_backbone(lm_dir)
    assert model.head.bias is None and tuple(model.head.weight.shape) == (1, model.config.hidden_size)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    att = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    s = model(ids, att)
    assert s.shape == (2, 4) and s.dtype == torch.float32
    model.save_pretrained(str(tmp_path / "qrm"))
    assert (tmp_path / "qrm" / HEAD_FILE).exists()
    loaded = TokenQModel.from_pretrained(str(tmp_path / "qrm"))
    torch.testing.assert_close(loaded(ids, att), s)
    with pytest.raises(ValueError, match="no bias"):
        TokenQModel(model.backbone, torch.nn.Linear(model.config.hidden_size, 1))


def test_from_pretrained_without_head_is_a_clear_error(lm_dir):
    with pytest.raises(FileNotFoundError, match="not a Q-RM folder.*from_backbone"):
        TokenQModel.from_pretrained(lm_dir)
    with pytest.raises(FileNotFoundError, match="not a Q-RM folder"):
        QRMScorer(lm_dir)


def test_scorer_reads_each_response_token_at_its_own_position(lm_dir, tmp_path, qrm_tokenizer):
    model = TokenQModel.from_backbone(lm_dir)
    path = str(tmp_path / "qrm")
    model.save_pretrained(path)
    qrm_tokenizer.save_pretrained(path)
    scorer = QRMScorer(path, batch_size=2, policy_tokenizer_path=lm_dir)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    responses = [[20, 21, 22], [23], []]
    out = scorer.token_rewards(prompts, responses)
    assert [len(r) for r in out] == [3, 1, 0]
    with torch.no_grad():  # unpadded single-sequence reference: s at positions len(prompt) .. end
        ref = model(torch.tensor([prompts[0] + responses[0]])).squeeze(0)
    np.testing.assert_allclose(out[0], ref[3:6].numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sample 1 has token id 9999 outside"):
        scorer.token_rewards([[1], [1]], [[5], [9999]])


def test_scorer_without_a_trained_qrm_starts_from_the_backbone_with_a_seeded_head(lm_dir):
    """reward.qrm.path unset: the policy's backbone + a fresh head drawn from the run's seed, so a
    restarted Q-RM service scores exactly as before (and another seed gives another head)."""
    a = QRMScorer(lm_dir, fresh_head_seed=3)
    b = QRMScorer(lm_dir, fresh_head_seed=3)
    c = QRMScorer(lm_dir, fresh_head_seed=4)
    prompts, responses = [[1, 5, 6]], [[20, 21, 22]]
    sa, sb, sc = (s.token_rewards(prompts, responses)[0] for s in (a, b, c))
    assert sa == sb and sa != sc
    assert float(a.model.head.weight.detach().abs().sum()) > 0  # not the zero-head saddle
    with torch.no_grad():  # the backbone is the LM's own (not re-initialised)
        lm = TokenQModel.from_backbone(lm_dir).backbone.state_dict()
    assert all(torch.equal(v, a.model.backbone.state_dict()[k]) for k, v in lm.items())


def test_scorer_refuses_another_tokenizer(lm_dir, tmp_path):
    from rlloop.models.tokenizer import build_tokenizer
    from tests.rewards.qrm.conftest import save_lm

    other = build_tokenizer(["completely different text 123"] * 10, vocab_size=270)
    other_dir = save_lm(tmp_path / "other", other)
    path = str(tmp_path / "qrm")
    TokenQModel.from_backbone(lm_dir).save_pretrained(path)
    with pytest.raises(ValueError, match="tokenizers differ"):
        QRMScorer(path, tokenizer_path=lm_dir, policy_tokenizer_path=other_dir)


def test_critic_initialisation_gives_the_same_scores(lm_dir):
    model = TokenQModel.from_backbone(lm_dir)
    critic = model.to_value_head_model()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(critic(ids), model(ids))
