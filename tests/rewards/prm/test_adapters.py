"""Published-PRM adapters (rlloop.rewards.prm.adapters) on tiny random models with the real conventions.

Each test builds the PRM's input by hand, the way the published usage code does (Qwen2.5-Math-PRM's
`<extra_0>` after each step, Math-Shepherd's `ки` tag read with the `+`/`-` logits, TRL PRMTrainer's
per-step tokenisation), runs the model's own forward pass, and checks that `PRMScorer` with the adapter
turns rlloop's steps of the same trajectory into the same step values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlloop.rewards.prm.adapters import detect_adapter, step_texts
from rlloop.rewards.prm.service import PRMScorer
from rlloop.rollout.steps import split_steps

from .conftest import build_tokenizer

PROMPTS = ["Question: what is 12 + 30?\n\n", "Question: what is 7 - 5?\n\n", "Q: 2+2?"]
RESPONSES = [
    "First we add 10 and 30.\n\nThen we add 2.\n\nThe answer is 42.",
    "We take 5 from 7.\n\n\n\nThe answer is \\boxed{2}",
    "no delimiter at all",
]
STEPS = [["First we add 10 and 30.", "Then we add 2.", "The answer is 42."],
         ["We take 5 from 7.", "The answer is \\boxed{2}"],
         ["no delimiter at all"]]  # fmt: skip


def tiny_qwen2_config(tokenizer, **kwargs):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs,
    )  # fmt: skip


def save(tmp_path_factory, name, model, tokenizer):
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def two_class_folder(tmp_path_factory, name, extra_tokens=()):
    """A tiny Qwen2ForTokenClassification with two labels and a random, large head."""
    from transformers import Qwen2ForTokenClassification

    tok = build_tokenizer(300, use_regex=True, bos=False, trim_offsets=True)
    if extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    torch.manual_seed(0)
    model = Qwen2ForTokenClassification(tiny_qwen2_config(tok, num_labels=2)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.1)
    return save(tmp_path_factory, name, model, tok)


@pytest.fixture(scope="module")
def qwen_prm_dir(tmp_path_factory):
    return two_class_folder(tmp_path_factory, "qwen_prm", ["<extra_0>"])


@pytest.fixture(scope="module")
def trl_prm_dir(tmp_path_factory):
    return two_class_folder(tmp_path_factory, "trl_prm")


@pytest.fixture(scope="module")
def shepherd_dir(tmp_path_factory):
    from transformers import AddedToken, Qwen2ForCausalLM

    tok = build_tokenizer(300, use_regex=True, bos=True, trim_offsets=True)
    tok.add_tokens([AddedToken("ки", normalized=False)])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(tok)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.1)
    return save(tmp_path_factory, "shepherd", model, tok)


def loaded(path):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    arch = json.load(open(f"{path}/config.json"))["architectures"][0]
    cls = AutoModelForTokenClassification if arch.endswith("ForTokenClassification") else AutoModelForCausalLM
    return cls.from_pretrained(path).eval(), tok


def softmax_at(logits: torch.Tensor, positions: list[int], cols: list[int], pick: int) -> list[float]:
    """softmax over `cols` of logits `[T, C]` at `positions`, the `pick`-th share."""
    probs = torch.softmax(logits[positions][:, cols].double(), dim=-1)
    return probs[:, pick].tolist()


def score_all(path, adapter, **kwargs):
    torch.set_num_threads(1)
    scorer = PRMScorer(path, adapter=adapter, batch_size=2, **kwargs)  # 3 rows: padded batches
    ends = [[e for _, e in split_steps(r)] for r in RESPONSES]
    return scorer, scorer.score(PROMPTS, RESPONSES, ends)


def check(results, expected):
    for res, exp in zip(results, expected, strict=True):
        assert res["step_values"] == pytest.approx(exp, abs=1e-5)
        assert res["prompt_value"] == 0.5
    # the head is random: the comparison is not between constants
    assert np.std([v for e in expected for v in e]) > 0.01


def test_rlloop_steps_become_the_published_step_texts():
    for r, steps in zip(RESPONSES, STEPS, strict=True):
        assert step_texts(r, [e for _, e in split_steps(r)]) == steps


def test_qwen_prm_reads_p_positive_at_each_extra_0(qwen_prm_dir):
    model, tok = loaded(qwen_prm_dir)
    sep = tok.convert_tokens_to_ids("<extra_0>")
    expected = []
    for p, steps in zip(PROMPTS, STEPS, strict=True):
        # Qwen's usage code: "<extra_0>".join(steps) + "<extra_0>" after the prompt, tokenised whole
        ids = tok(p + "<extra_0>".join(steps) + "<extra_0>", return_tensors="pt")["input_ids"]
        positions = (ids[0] == sep).nonzero().flatten().tolist()
        assert len(positions) == len(steps)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        expected.append(softmax_at(logits, positions, [0, 1], 1))
    scorer, results = score_all(qwen_prm_dir, "qwen_prm")
    check(results, expected)


def test_math_shepherd_reads_plus_share_at_each_tag(shepherd_dir):
    model, tok = loaded(shepherd_dir)
    tag = tok.encode("ки", add_special_tokens=False)[-1]
    plus, minus = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
    expected = []
    for p, steps in zip(PROMPTS, STEPS, strict=True):
        # Math-Shepherd's usage code: f"{question} {output}", output = "step ки\nstep ки"
        text = p.rstrip() + " " + "\n".join(f"{s} ки" for s in steps)
        ids = tok(text, return_tensors="pt")["input_ids"]
        positions = (ids[0] == tag).nonzero().flatten().tolist()
        assert len(positions) == len(steps)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]  # the full LM head, not the adapter's two rows
        expected.append(softmax_at(logits, positions, [plus, minus], 0))
    scorer, results = score_all(shepherd_dir, "math_shepherd")
    check(results, expected)
    # an LM that rescales its logits after the head is read through its full logits: the same values here
    scorer.model.model.config.final_logit_softcapping = 30.0  # (Qwen2 ignores it)
    ends = [[e for _, e in split_steps(r)] for r in RESPONSES]
    check(scorer.score(PROMPTS, RESPONSES, ends), expected)


def test_trl_token_classification_reads_the_last_token_of_each_step(trl_prm_dir):
    model, tok = loaded(trl_prm_dir)
    expected = []
    for p, steps in zip(PROMPTS, STEPS, strict=True):
        # TRL PRMTrainer.tokenize_row: [bos] + prompt, then each step + "\n" tokenised on its own
        assert tok.bos_token_id is not None
        ids = [tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]]
        positions = []
        for s in steps:
            ids += tok(s, add_special_tokens=False)["input_ids"] + tok.encode("\n", add_special_tokens=False)
            positions.append(len(ids) - 1)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        expected.append(softmax_at(logits, positions, [0, 1], 1))
    scorer, results = score_all(trl_prm_dir, "trl_token_cls")
    check(results, expected)


def test_detected_from_the_folder(tmp_path, qwen_prm_dir, trl_prm_dir, shepherd_dir, prm_dir, plain_lm_dir):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForProcessRewardModel"]}))
    assert detect_adapter(str(tmp_path)) == "qwen_prm"
    assert detect_adapter(trl_prm_dir) == "trl_token_cls"
    assert detect_adapter(prm_dir) == "rlloop"
    assert detect_adapter(plain_lm_dir) == "rlloop"  # a plain LM gets rlloop's fresh value head
    assert detect_adapter(shepherd_dir) == "rlloop"  # Math-Shepherd is a plain LM: it must be named
    scorer = PRMScorer(trl_prm_dir)  # adapter=auto
    assert scorer.adapter_name == "trl_token_cls"


def test_frozen_and_checked(trl_prm_dir):
    scorer = PRMScorer(trl_prm_dir, adapter="trl_token_cls")
    with pytest.raises(ValueError, match="online=true needs rlloop's value-head PRM"):
        scorer.enable_online(lr=1e-3)
    with pytest.raises(ValueError, match=r"\['tag'\] are not options of the trl_token_cls adapter"):
        PRMScorer(trl_prm_dir, adapter="trl_token_cls", adapter_options={"tag": "x"})
    with pytest.raises(ValueError, match="adapter='nope' is unknown"):
        PRMScorer(trl_prm_dir, adapter="nope")


def test_max_length_drops_prompt_tokens_from_the_left(qwen_prm_dir):
    full = PRMScorer(qwen_prm_dir, adapter="qwen_prm")
    enc = full.encode(PROMPTS[0], RESPONSES[0])
    short = PRMScorer(qwen_prm_dir, adapter="qwen_prm", max_length=len(enc.input_ids) - 3)
    cut = short.encode(PROMPTS[0], RESPONSES[0])
    assert cut.input_ids == enc.input_ids[3:]
    assert cut.step_positions == [p - 3 for p in enc.step_positions]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["reward.prm.adapter=nope"], "reward.prm.adapter='nope': unknown; choose auto, rlloop, qwen_prm"),
        (["reward.prm.adapter=qwen_prm", "+reward.prm.adapter_options.tag=x"],
         r"adapter_options=\['tag'\]: not options of the qwen_prm adapter \(it takes \['separator'\]\)"),
        (["reward=tdrm", "reward.prm.online=true", "reward.prm.adapter=math_shepherd"],
         "reward.prm.adapter='math_shepherd': is a published PRM, scored frozen"),
        (["reward.prm.dtype=fp8"], "reward.prm.dtype='fp8': unknown; choose float32, bfloat16 or float16"),
        (["reward=tdrm", "reward.prm.online=true", "reward.prm.dtype=bfloat16"],
         "reward.prm.dtype='bfloat16': must be float32 for reward.prm.online=true"),
    ],
)  # fmt: skip
def test_config_is_checked_before_any_actor(overrides, words):
    from rlloop.errors import ConfigError
    from rlloop.train import compose_config
    from rlloop.validate import validate_config

    with pytest.raises(ConfigError, match=words):
        validate_config(compose_config(overrides))
