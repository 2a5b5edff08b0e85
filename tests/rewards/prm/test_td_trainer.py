"""TDPRMTrainer on a tiny random Llama backbone: it learns to separate correct from wrong trajectories."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlloop.rewards.prm.data import steps_to_example
from rlloop.rewards.prm.td_trainer import TDPRMTrainer

# Held-out AUROC of V_last that the TD(0)-PRM must beat in the slow arith-small test: a bound below the
# figure `python -m rlloop.experiments.prm_quality` reported at the reduced size of that test.
AUROC_BOUND = 0.58  # measured 0.614 (192 train / 64 held-out prompts x 4, gamma 1, arith-small 150 steps, 2026-12-02)


def tiny_llama_prm(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaModel

    from rlloop.rewards.prm.model import ValueHeadModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return ValueHeadModel(LlamaModel(config))


def toy_set(n: int, seed: int = 0) -> list[dict]:
    """Half correct (final answer 42), half wrong (final answer 24, or a wrong middle step)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = rng.randint(10, 40)
        steps = [f"First we add {a} and {42 - a}.", "Then we add 2."][: rng.randint(1, 2)]
        good = i % 2 == 0
        steps.append("The answer is 42." if good else "The answer is 24.")
        out.append(steps_to_example("Question: what is 12 + 30?\n\n", steps, float(good)))
    return out


def unpack(examples):
    return (
        [e["prompt_text"] for e in examples],
        [e["response_text"] for e in examples],
        [e["step_char_ends"] for e in examples],
        [e["outcome"] for e in examples],
    )


@pytest.mark.parametrize("td", ["td0", "td_lambda"])
def test_td_trainer_separates_correct_from_wrong(prm_tokenizer, td):
    torch.set_num_threads(1)
    trainer = TDPRMTrainer(
        tiny_llama_prm(prm_tokenizer), prm_tokenizer, lr=3e-3, td=td, gamma=0.8, micro_batch_size=8
    )
    data = unpack(toy_set(16))
    first = trainer.step(*data)
    losses = [first["prm/loss"]]
    for _ in range(24):
        losses.append(trainer.step(*data)["prm/loss"])
    final = trainer.evaluate(*data)
    assert trainer.version == 25
    assert losses[-1] < 0.8 * losses[0], losses
    assert final["prm/auroc"] > 0.8, final
    assert final["prm/v_last_acc"] > 0.7, final
    for key in ("prm/smoothness", "prm/bce", "prm/outcome_bce"):
        assert key in final
    for key in ("prm/loss", "prm/smoothness", "prm/v_last_acc", "prm/auroc", "prm/lr"):
        assert key in first


def test_encoding_matches_prm_scorer(prm_tokenizer, plain_lm_dir):
    """The trainer reads logits at the same tokens the PRMScorer scores (so training and inference agree)."""
    from rlloop.rewards.prm.service import PRMScorer

    scorer = PRMScorer(plain_lm_dir)
    trainer = TDPRMTrainer(scorer.model, scorer.tokenizer, lr=1e-3)
    for e in toy_set(6):
        ref = scorer.encode(e["prompt_text"], e["response_text"], e["step_char_ends"])
        got = trainer.encode(e["prompt_text"], e["response_text"], e["step_char_ends"])
        assert got.input_ids == ref.input_ids
        assert got.step_positions == ref.step_positions
        assert got.prompt_position == ref.prompt_position
    # and the values it computes equal the scorer's
    p, r, ends, _ = unpack(toy_set(4))
    with torch.no_grad():
        scorer.model.head.weight.normal_()
    ours = trainer.step_values(p, r, ends)
    theirs = [s["step_values"] for s in scorer.score(p, r, ends)]
    for a, b in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_one_pass_equals_per_prefix_passes(prm_tokenizer):
    """One forward over the trajectory gives each prefix's value, as k passes over the prefixes would."""
    model = tiny_llama_prm(prm_tokenizer, seed=3)
    with torch.no_grad():
        model.head.weight.normal_()
    trainer = TDPRMTrainer(model, prm_tokenizer, lr=1e-3)
    e = toy_set(1)[0]
    one_pass = trainer.step_values([e["prompt_text"]], [e["response_text"]], [e["step_char_ends"]])[0]
    for k, end in enumerate(e["step_char_ends"]):
        prefix = e["response_text"][:end]
        alone = trainer.step_values([e["prompt_text"]], [prefix], [[end]])[0]
        assert alone[-1] == pytest.approx(one_pass[k], abs=1e-5)


def test_ema_target_and_labels_mode(prm_tokenizer):
    torch.set_num_threads(1)
    data = toy_set(8)
    p, r, ends, out = unpack(data)
    trainer = TDPRMTrainer(tiny_llama_prm(prm_tokenizer), prm_tokenizer, lr=1e-3, td="td0", ema=0.9)
    before = {k: v.clone() for k, v in trainer.target_model.state_dict().items()}
    trainer.step(p, r, ends, out)
    after = trainer.target_model.state_dict()
    online = trainer.model.state_dict()
    name = "head.weight"
    assert torch.allclose(after[name], 0.9 * before[name] + 0.1 * online[name], atol=1e-6)
    labels = [[o] * len(e) for o, e in zip(out, ends, strict=True)]
    scalar = TDPRMTrainer(tiny_llama_prm(prm_tokenizer), prm_tokenizer, lr=1e-3, td="labels")
    metrics = scalar.step(p, r, ends, out, step_labels=labels)
    assert metrics["prm/loss"] > 0
    with pytest.raises(ValueError, match="needs step_labels"):
        scalar.step(p, r, ends, out)
    with pytest.raises(ValueError, match="step_labels\\[0\\] has 1 entries"):
        scalar.step(p, r, ends, out, step_labels=[[1.0]] * len(p))


def test_reach_targets_come_from_labels_and_own_values(prm_tokenizer):
    """td="reach": the step's target is max(h_k, (1-λ)V_{k+1} + λG_{k+1}) from this batch's own detached
    values; a label of 1 forces 1, and the loss reported is BCE toward exactly those targets."""
    from rlloop.algos.td import prm_bce_loss, reach_targets

    torch.set_num_threads(1)
    p, r, ends, out = unpack(toy_set(4))
    labels = [[float(k % 2) for k in range(len(e))] for e in ends]
    trainer = TDPRMTrainer(
        tiny_llama_prm(prm_tokenizer, seed=5), prm_tokenizer, lr=0.0, td="reach", gamma=1.0, lam=0.5
    )
    values = trainer.step_values(p, r, ends)
    K = max(len(v) for v in values)
    vt, mt, ht = torch.zeros(4, K), torch.zeros(4, K), torch.zeros(4, K)
    for b, v in enumerate(values):
        vt[b, : len(v)], mt[b, : len(v)], ht[b, : len(v)] = torch.tensor(v), 1, torch.tensor(labels[b])
    want = reach_targets(vt, mt, torch.tensor(out), ht, gamma=1.0, lam=0.5)
    logits = torch.log(vt.clamp(1e-6, 1 - 1e-6)) - torch.log1p(-vt.clamp(1e-6, 1 - 1e-6))
    metrics = trainer.step(p, r, ends, out, step_labels=labels)
    assert metrics["prm/target_mean"] == pytest.approx(float((want * mt).sum() / mt.sum()), abs=1e-5)
    assert metrics["prm/loss"] == pytest.approx(prm_bce_loss(logits, want, mt).item(), abs=1e-4)
    assert trainer.evaluate(p, r, ends, out, step_labels=labels)["prm/bce"] == pytest.approx(metrics["prm/loss"], abs=1e-4)
    with pytest.raises(ValueError, match="td='reach' needs step_labels"):
        trainer.step(p, r, ends, out)


def test_zero_step_trajectory_is_named(prm_tokenizer):
    trainer = TDPRMTrainer(tiny_llama_prm(prm_tokenizer), prm_tokenizer, lr=1e-3)
    with pytest.raises(ValueError, match="trajectory 1: trajectory has zero steps"):
        trainer.step(["Q\n\n", "Q\n\n"], ["a.", ""], [[2], []], [1.0, 0.0])


def test_transition_step_learns_terminal_labels(prm_tokenizer):
    torch.set_num_threads(1)
    trainer = TDPRMTrainer(tiny_llama_prm(prm_tokenizer), prm_tokenizer, lr=3e-3, micro_batch_size=8)
    rows = []
    for good in (True, False) * 4:
        final = "The answer is 42." if good else "The answer is 24."
        rows.append(
            dict(
                question="what is 12 + 30?",
                state="First we add.",
                next_state="First we add.\n\n" + final,
                rewards=[0.0],
                label=float(good),
                done=False,
                next_mask=1.0,
                n=1,
            )
        )
        rows.append(
            dict(
                question="what is 12 + 30?",
                state="First we add.\n\n" + final,
                next_state=None,
                rewards=[0.0],
                label=float(good),
                done=True,
                next_mask=1.0,
                n=1,
            )
        )
    first = trainer.transition_step(rows)
    for _ in range(15):
        trainer.transition_step(rows)
    final = trainer.transition_evaluate(rows)
    assert final["prm/bce"] < first["prm/bce"]
    assert final["prm/auroc"] > 0.9


def test_online_updates_drive_the_scorer(plain_lm_dir):
    """Online mode: the trainer updates the PRMScorer's own model, so its next scores reflect the TD steps."""
    from rlloop.rewards.prm.service import PRMScorer
    from rlloop.types import Rollout

    torch.set_num_threads(1)
    scorer = PRMScorer(plain_lm_dir)
    trainer = TDPRMTrainer(scorer.model, scorer.tokenizer, lr=3e-3, td="td0", micro_batch_size=8)
    rollouts = []
    for i, e in enumerate(toy_set(16)):
        rollouts.append(
            Rollout(
                uid=f"p/{i}",
                group="p",
                prompt_ids=[],
                response_ids=[],
                rollout_logprobs=[],
                step_ends=[],
                step_char_ends=e["step_char_ends"],
                text=e["response_text"],
                prompt_text=e["prompt_text"],
                finish_reason="stop",
                policy_version=0,
                outcome={"math": e["outcome"]},
            )
        )
    rollouts.append(
        Rollout(
            uid="p/empty",
            group="p",
            prompt_ids=[],
            response_ids=[],
            rollout_logprobs=[],
            step_ends=[],
            step_char_ends=[],
            text="",
            prompt_text="Q",
            finish_reason="length",
            policy_version=0,
            outcome={"math": 0.0},
        )
    )
    before = scorer.score_rollouts(rollouts[:-1])
    for _ in range(20):
        m = trainer.step_rollouts(rollouts)
    assert m["prm/skipped"] == 1.0 and trainer.version == 20
    after = scorer.score_rollouts(rollouts[:-1])
    assert before[0]["step_values"] != after[0]["step_values"]
    from rlloop.algos.td import auroc

    last = torch.tensor([s["step_values"][-1] for s in after])
    labels = torch.tensor([r.outcome["math"] for r in rollouts[:-1]])
    assert auroc(last, labels) > 0.8


@pytest.mark.slow
def test_arith_small_td_prm_beats_chance(tmp_path):
    """rlloop.experiments.prm_quality at a reduced size: a TD(0)-PRM trained on arith-small's rollouts tells
    correct from wrong on held-out rollouts; the ScalarPRM baseline is trained on the same rollouts and
    both are saved as PRM folders the RL loop loads.

    Builds arith-small on first use (minutes). Measured TD(0) AUROC on the current arith-small (held-out
    set of 200, 2026-12-02, seed 0, deterministic on one machine), gamma 0.8: 0.599 with 128 train / 32
    held-out prompts (the size this test had; it failed CI against a bound of 0.6 measured on the model
    built before the held-out change), 0.606 with 128 / 64, 0.626 with 192 / 64 -- hence 192 / 64 here.
    256 held-out rollouts also make "beats chance" a statistical claim: the AUROC must clear 0.5 by two
    standard errors of its null distribution (Mann-Whitney, ~0.04 here), besides AUROC_BOUND.

    Smoothness (mean |V_k+1 - V_k|, TDRM: TD smoother than ScalarPRM) depends on gamma: at gamma 0.8 (the
    release's) the TD target gamma * V_k+1 itself slopes, and TD(0) was LESS smooth (0.046 vs 0.022); at
    gamma 1 (the paper's TD(lambda) evaluation) TD(0) was smoother with every seed measured: 0.0191 vs
    0.0222 (seed 0), 0.0139 vs 0.0383 (1), 0.0179 vs 0.0314 (2), AUROC 0.614 / 0.673 / 0.606 vs ScalarPRM
    0.628 / 0.673 / 0.590. Hence gamma 1 here, and the smoothness claim is asserted.
    """
    from rlloop.experiments import prm_quality
    from rlloop.rewards.prm.model import ValueHeadModel

    res = prm_quality.run(
        out=str(tmp_path),
        train_prompts=192,
        eval_prompts=64,
        n=4,
        max_new_tokens=96,
        temperature=1.0,
        epochs=3,
        lr=3e-4,
        batch_size=16,
        gamma=1.0,
        seed=0,
        eval_n=4,
        kinds=("td0", "mc"),
    )
    td0, mc = res["td0"]["heldout"], res["mc"]["heldout"]
    assert td0["prm/auroc"] > AUROC_BOUND, res
    n = res["rollouts"]["heldout"]
    pos = round(res["rollouts"]["heldout_accuracy"] * n)
    null_se = math.sqrt((n + 1) / (12 * pos * (n - pos)))  # sd of the AUROC of a random scorer
    assert td0["prm/auroc"] > 0.5 + 2 * null_se, (td0["prm/auroc"], null_se, res)
    assert 0 < td0["prm/smoothness"] < mc["prm/smoothness"], res  # TD smoother than the ScalarPRM
    bon = res["td0"]["best_of_n"]
    assert bon["pass@4"] >= bon["bon@4"] >= 0 and bon["pass@1"] == bon["bon@1"], bon
    ValueHeadModel.from_pretrained(res["td0"]["path"])  # the saved PRM loads
    assert "| TD(0) |" in (tmp_path / "prm_quality.md").read_text()


def test_train_prompt_trains_the_empty_prefix(prm_tokenizer):
    """train_prompt: the prompt's last token is step -1, trained toward the first label; with_prompt reads
    it first. The prompt is pushed to 1 while every step is pushed to 0, so only a trained prompt ends high."""
    torch.set_num_threads(1)
    data = toy_set(8)
    p, r, ends, out = unpack(data)
    labels = [[1.0] + [0.0] * len(e) for e in ends]
    trainer = TDPRMTrainer(tiny_llama_prm(prm_tokenizer), prm_tokenizer, lr=3e-3, td="labels", train_prompt=True)
    plain = TDPRMTrainer(tiny_llama_prm(prm_tokenizer), prm_tokenizer, lr=3e-3, td="labels")
    for _ in range(30):
        trainer.step(p, r, ends, out, step_labels=labels)
        plain.step(p, r, ends, out, step_labels=[x[1:] for x in labels])
    with_prompt = trainer.step_values(p, r, ends, with_prompt=True)
    steps_only = trainer.step_values(p, r, ends)
    for row, steps in zip(with_prompt, steps_only, strict=True):
        assert row[1:] == pytest.approx(steps, abs=1e-6)
        assert row[0] > 0.8 and max(steps) < 0.2
    assert max(v[0] for v in plain.step_values(p, r, ends, with_prompt=True)) < 0.5
    metrics = trainer.evaluate(p, r, ends, out, step_labels=labels)
    assert metrics["prm/bce"] < 0.3
    K = len(ends[0])
    with pytest.raises(ValueError, match=f"step_labels\\[0\\] has {K} entries for {K + 1} steps"):
        trainer.step(p[:1], r[:1], ends[:1], out[:1], step_labels=[[0.0] * K])
