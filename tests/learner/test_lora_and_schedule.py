"""The learner at real model sizes, in process at world size 1: LR schedules across a resume, LoRA
(adapter-only training, reference = adapter off, adapter-only sync, merged export, resume), DeepSpeed
overrides and ZeRO-Offload, and the critic's LoRA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlloop.errors import ConfigError

from .conftest import algo_cfg, hf_logprobs, inprocess_learner, make_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LORA = {"rank": 4, "alpha": 8.0, "target_modules": "all-linear", "dropout": 0.0}
COSINE = {"lr_scheduler": "cosine", "lr_warmup_steps": 2, "lr_min_ratio": 0.1, "lr_decay_steps": 6}


def _steps(learner, batch, n: int) -> list[float]:
    return [learner.train_step(batch)["actor/lr"] for _ in range(n)]


def _cosine_reference(step: int, lr: float, warmup: int, total: int, floor: float) -> float:
    """Warm-up from 0, then half a cosine from lr down to floor * lr (the formula, step by step)."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / (total - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_lr_schedule_across_a_resume_equals_an_uninterrupted_run(tiny_model_path, dist_port, tmp_path):
    batch = make_batch(num_rows=4, seed=3)
    whole = _steps(inprocess_learner(tiny_model_path, dist_port, **COSINE), batch, 6)
    expected = [_cosine_reference(s, 1e-2, 2, 6, 0.1) for s in range(6)]
    np.testing.assert_allclose(whole, expected, rtol=1e-6, atol=1e-12)

    first = inprocess_learner(tiny_model_path, dist_port, **COSINE)
    head = _steps(first, batch, 3)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    second = inprocess_learner(tiny_model_path, dist_port, **COSINE)
    assert second.load_checkpoint(str(tmp_path / "ckpt")) == 3
    assert head + _steps(second, batch, 3) == whole


@pytest.mark.parametrize("name", ["constant", "linear"])
def test_constant_and_linear_schedules_with_warmup(name):
    from rlloop.learner.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, {"lr_scheduler": name, "lr_warmup_steps": 2, "lr_min_ratio": 0.0}, 6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [0.0, 0.5, 1.0, 1.0, 1.0, 1.0] if name == "constant" else [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    np.testing.assert_allclose(lrs, want)


def test_lora_trains_only_the_adapter_and_syncs_only_it(tiny_model_path, dist_port, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlloop.rollout.engine import HFEngine

    learner = inprocess_learner(tiny_model_path, dist_port, lora=LORA, lr=1e-2)
    assert learner.ref_model is None  # the reference is the base with the adapter off: no copy
    batch = make_batch(num_rows=5)
    base = hf_logprobs(tiny_model_path, batch, temperature=0.7)
    # a fresh adapter is B = 0: policy and reference are the base model
    np.testing.assert_allclose(learner.compute_logprobs(batch, "policy"), base, atol=1e-5)
    before = learner.full_state_dict()
    for _ in range(2):
        learner.train_step(batch)
    after = learner.full_state_dict()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    adapter = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert changed and changed <= adapter, sorted(changed - adapter)
    assert {k for k in adapter if ".lora_B." in k} <= changed
    policy = learner.compute_logprobs(batch, "policy")
    assert np.abs(policy - base).max() > 1e-3
    np.testing.assert_allclose(learner.compute_logprobs(batch, "ref"), base, atol=1e-5)

    # the synced payload is the adapter: its bytes, its names, nothing of the base
    trainable = sum(p.numel() for p in learner.engine.module.parameters() if p.requires_grad)
    plan = learner.weight_bucket_plan(1 << 20)
    assert sum(plan) == 4 * trainable
    arrays = {}
    for b in range(len(plan)):
        arrays.update(learner.gather_weight_bucket(b))
    assert set(arrays) == adapter
    full = sum(v.nbytes for k, v in after.items() if k not in adapter)
    assert sum(plan) < full / 5

    # an HF rollout engine with the same adapter config, given only those arrays, is the learner's policy
    engine = HFEngine(tiny_model_path, lora=LORA)
    engine.update_weights(arrays, version=2)
    rows = int(batch.attention_mask[0].sum())
    ids = torch.as_tensor(batch.input_ids[:1, :rows])
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(input_ids=ids).logits[0] / 0.7, dim=-1)
    engine_lp = np.array([float(logp[t - 1, ids[0, t]]) for t in range(1, rows)]) * batch.response_mask[0, 1:rows]
    np.testing.assert_allclose(engine_lp, policy[0, 1:rows], atol=1e-5)

    # save_hf: the merged model, and the adapter (peft format) beside it
    out = tmp_path / "saved"
    learner.save_hf(str(out))
    np.testing.assert_allclose(hf_logprobs(str(out), batch, temperature=0.7), policy, atol=1e-5)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(out / "adapter"))
    with torch.no_grad():
        logp = torch.log_softmax(peft_model(input_ids=ids).logits[0] / 0.7, dim=-1)
    peft_lp = np.array([float(logp[t - 1, ids[0, t]]) for t in range(1, rows)]) * batch.response_mask[0, 1:rows]
    np.testing.assert_allclose(peft_lp, policy[0, 1:rows], atol=1e-5)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_lora_resume_restores_adapter_optimizer_and_schedule(tiny_model_path, dist_port, tmp_path, zero_stage):
    """Two steps, a checkpoint, a fresh learner resumed from it, a third step: the same adapter as three
    uninterrupted steps (Adam's moments and the LR schedule came back too); ZeRO-3 partitions the frozen
    base and the adapter alike."""
    cfg = {"lora": LORA, "lr_scheduler": "linear", "lr_warmup_steps": 1, "lr_decay_steps": 4, "zero_stage": zero_stage}
    batch = make_batch(num_rows=4, seed=5)
    whole = inprocess_learner(tiny_model_path, dist_port, **cfg)
    lrs = _steps(whole, batch, 3)
    want = whole.full_state_dict()

    first = inprocess_learner(tiny_model_path, dist_port, **cfg)
    _steps(first, batch, 2)
    ckpt = tmp_path / "step_000002"
    first.save_checkpoint(str(ckpt / "learner"))
    resumed = inprocess_learner(tiny_model_path, dist_port, **cfg)
    resumed.load_checkpoint(str(ckpt / "learner"))
    assert _steps(resumed, batch, 1) == lrs[2:]
    got = resumed.full_state_dict()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-7, err_msg=key)


def test_lora_export_writes_the_adapter_and_on_request_the_merged_model(tiny_model_path, dist_port, tmp_path):
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlloop import checkpoint, export
    from rlloop.models.tokenizer import build_tokenizer

    batch = make_batch(num_rows=4, seed=6)
    learner = inprocess_learner(tiny_model_path, dist_port, lora=LORA)
    _steps(learner, batch, 2)
    policy = learner.compute_logprobs(batch, "policy")
    ckpt = tmp_path / "step_000002"
    learner.save_checkpoint(str(ckpt / "learner"))
    shutil.copytree(tiny_model_path, ckpt / "hf")
    build_tokenizer(["1 + 2 = 3"], vocab_size=300).save_pretrained(ckpt / "hf")
    (ckpt / checkpoint.STATE_FILE).write_text("{}")

    merged = export.export(ckpt, tmp_path / "merged", merged=True)
    np.testing.assert_allclose(hf_logprobs(str(merged), batch, temperature=0.7), policy, atol=1e-5)
    assert (merged / "adapter" / "adapter_config.json").is_file()
    adapter = export.export(ckpt, tmp_path / "adapter")
    assert not (adapter / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(adapter))
    rows = int(batch.attention_mask[0].sum())
    ids = torch.as_tensor(batch.input_ids[:1, :rows])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0] / 0.7, dim=-1)
    got = np.array([float(logp[t - 1, ids[0, t]]) for t in range(1, rows)]) * batch.response_mask[0, 1:rows]
    np.testing.assert_allclose(got, policy[0, 1:rows], atol=1e-5)


def test_deepspeed_overrides_merge_and_are_checked():
    from rlloop.learner.optim import build_ds_config, check_overrides

    base = build_ds_config(zero_stage=2, micro_batch_size=4, grad_accum=1, grad_clip=1.0, bf16=False)
    merged = build_ds_config(
        zero_stage=2, micro_batch_size=4, grad_accum=1, grad_clip=1.0, bf16=False,
        overrides={"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5},
    )  # fmt: skip
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert merged["gradient_clipping"] == 0.5 and base["gradient_clipping"] == 1.0
    check_overrides({"zero_optimization": {"reduce_bucket_size": 1000}}, base)
    with pytest.raises(ConfigError, match=r"learner.deepspeed_overrides.optimizer: set by rlloop; use learner.lr"):
        check_overrides({"optimizer": {"type": "Adam"}}, base)
    with pytest.raises(ConfigError, match=r"learner.deepspeed_overrides.train_micro_batch_size_per_gpu"):
        check_overrides({"train_micro_batch_size_per_gpu": 8}, base)
    with pytest.raises(ConfigError, match=r"learner.deepspeed_overrides.zero_optimisation: not a DeepSpeed"):
        check_overrides({"zero_optimisation": {"stage": 3}}, base)
    with pytest.raises(ConfigError, match=r"reduce_bucket_sise"):
        check_overrides({"zero_optimization": {"reduce_bucket_sise": 1}}, base)


def test_offload_needs_the_right_zero_stage():
    from rlloop.learner.optim import offload_section

    assert offload_section(True, False, 2) == {"offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert set(offload_section(True, True, 3)) == {"offload_optimizer", "offload_param"}
    with pytest.raises(ConfigError, match="learner.offload_params=true: needs learner.zero_stage=3"):
        offload_section(False, True, 2)
    with pytest.raises(ConfigError, match="learner.offload_optimizer=true: needs learner.zero_stage >= 1"):
        offload_section(True, False, 0)


def test_validate_names_the_bad_learner_key():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from rlloop.config import register_configs
    from rlloop.validate import validate_config

    register_configs()
    conf = str(Path(__file__).resolve().parents[2] / "conf")
    bad = {
        "learner.lr_scheduler=cosin": "learner.lr_scheduler='cosin'",
        "learner.lora.rank=-1": "learner.lora.rank=-1",
        "learner.lora.rank=8 learner.lora.dropout=1.5": "learner.lora.dropout=1.5",
        "learner.offload_params=true": "learner.offload_params=true",
        "+learner.deepspeed_overrides.zero_optimization.stage3_max_live_parameter=5 learner.zero_stage=3":
            "stage3_max_live_parameter",
    }  # fmt: skip
    with initialize_config_dir(config_dir=conf, version_base=None):
        validate_config(compose("config", overrides=["learner.lora.rank=8", "learner.lr_scheduler=cosine"]))
        for overrides, needle in bad.items():
            with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
                validate_config(compose("config", overrides=overrides.split()))


def test_offload_optimizer_trains_like_no_offload(tiny_model_path, dist_port):
    """ZeRO-2 with the optimizer offloaded (DeepSpeedCPUAdam) takes the same step as torch AdamW."""
    batch = make_batch(num_rows=4, seed=2)
    states = []
    for offload in (False, True):
        learner = inprocess_learner(tiny_model_path, dist_port, lora=LORA, offload_optimizer=offload)
        learner.train_step(batch)
        states.append(learner.full_state_dict())
    for key in states[0]:
        np.testing.assert_allclose(states[1][key], states[0][key], atol=1e-6, err_msg=key)


def test_critic_lora_trains_adapter_and_head_only(tiny_model_path, dist_port, tmp_path):
    from rlloop.learner.critic import CriticLearner
    from rlloop.rewards.prm.model import ValueHeadModel

    from .conftest import learner_cfg

    critic = CriticLearner(
        tiny_model_path,
        learner_cfg(lora=LORA),
        algo_cfg(
            advantage="gae",
            critic={"init_path": tiny_model_path, "init_kind": "lm", "output": "linear", "value_clip": 0.2},
        ),
        rank=0,
        world_size=1,
        master_addr="127.0.0.1",
        master_port=dist_port,
        train_batch_size=5,
    )
    batch = make_batch(num_rows=5)
    batch.values = critic.compute_values(batch)
    before = critic.full_state_dict()
    for _ in range(2):
        critic.train_step(batch)
    after = critic.full_state_dict()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert {"head.weight", "head.bias"} <= changed
    assert all(k.startswith("head.") or ".lora_" in k for k in changed), sorted(changed)
    values = critic.compute_values(batch)
    critic.save_pretrained(str(tmp_path / "critic"))
    saved = ValueHeadModel.from_pretrained(str(tmp_path / "critic"), dtype="float32")
    rows = int(batch.attention_mask[0].sum())
    with torch.no_grad():
        logits = saved(torch.as_tensor(batch.input_ids[:1, :rows]))[0]
    np.testing.assert_allclose(logits[: rows - 1].numpy(), values[0, 1:rows], atol=1e-5)
