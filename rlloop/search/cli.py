"""`python -m rlloop.search [overrides]`: PRM-guided inference on a task's problems, against voting baselines.

Samples max(n) solutions per problem once (rollout workers), scores every step with the PRM (PRM service)
and reports, for each N in `n` (the first N solutions of each problem): Best-of-N with each step-value
aggregation, majority vote, PRM-weighted majority vote, the mean single-sample accuracy and pass@N; then
runs step beam search once per `beams` setting. Prints a table and writes `search_results.json`
(accuracy, generated tokens per problem and seconds per method) in the output folder.

    python -m rlloop.search prm.path=/tmp/prm/prm num_problems=100          # arith-small on arith
    python -m rlloop.search model=smollm2 prm.path=... num_problems=10 n=[1,4]
    python -m rlloop.search ray=false ...                                   # everything in this process

Schema: `SearchConfig` below; conf/search.yaml picks the task/model presets of conf/.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from rlloop.config import ClusterConfig, ModelConfig, TaskConfig
from rlloop.errors import ConfigError, exit_on_user_error

logger = logging.getLogger("rlloop.search")

SELECTION_METHODS = ("bon", "majority", "weighted_majority", "beam")


@dataclass
class BeamSpec:
    top_k: int = 1  # beams kept per depth
    num_branch: int = 4  # next steps sampled per beam


@dataclass
class SearchPRMConfig:
    path: Optional[str] = None  # PRM folder (python -m rlloop.prm_train writes <out_dir>/prm); None = V 0.5
    tokenizer_path: Optional[str] = None
    batch_size: int = 64
    max_length: Optional[int] = None
    dtype: str = "float32"
    num_threads: int = 1
    num_cpus: float = 0.1  # Ray CPU resource of the PRM actor (fractional: never starves the workers)
    # a published PRM (rlloop/rewards/prm/adapters.py): auto | rlloop | qwen_prm | math_shepherd | trl_token_cls
    adapter: str = "auto"
    adapter_options: Dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False


@dataclass
class SearchConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    prm: SearchPRMConfig = field(default_factory=SearchPRMConfig)
    split: str = "test"  # test | train (train: e.g. to sample PRM training data with dump_rollouts)
    num_problems: int = 50  # first problems of the split (0 = all)
    n: List[int] = field(default_factory=lambda: [1, 4, 16])  # Best-of-N / vote sizes
    methods: List[str] = field(default_factory=lambda: list(SELECTION_METHODS))
    aggregations: List[str] = field(default_factory=lambda: ["last", "min", "mean", "prod"])
    weight_aggregation: str = "last"  # PRM score that weights the weighted majority vote
    beams: List[BeamSpec] = field(default_factory=lambda: [BeamSpec(1, 4), BeamSpec(4, 4)])
    max_depth: int = 8  # beam search: most steps per solution
    max_new_tokens: int = 96  # per solution
    max_step_tokens: int = 48  # beam search: most tokens per step
    temperature: float = 1.0
    top_p: float = 1.0
    step_delimiter: str = "\n\n"
    step_regex: Optional[str] = None
    verifier: str = "math"  # registry name of the verifier that grades answers
    seed: int = 0
    ray: bool = True  # rollout workers and the PRM as Ray actors; false = all in this process
    num_workers: int = 1  # rollout workers (Ray)
    worker_num_cpus: float = 0.5  # Ray CPU resource per worker
    num_threads: int = 1  # torch threads per worker (and in-process)
    max_batch_size: int = 64  # sequences per generate call
    call_timeout_s: float = 3600.0
    dump_rollouts: Optional[str] = (
        None  # write the Best-of-N samples (+ correct) as rollouts jsonl for prm_train
    )
    output_dir: Optional[str] = None  # default: the Hydra run dir


def register_configs() -> None:
    ConfigStore.instance().store(name="rlloop_search_schema", node=SearchConfig)


register_configs()


def check_config(cfg: Any) -> None:
    """Raise ConfigError naming the first unknown key or impossible value."""
    from rlloop.search.aggregate import AGGREGATIONS
    from rlloop.validate import check_keys

    check_keys(cfg, SearchConfig)

    def require(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"config {key}={cfg[key]!r}: {why}")

    require(cfg.split in ("test", "train"), "split", "use test | train")
    require(cfg.num_problems >= 0, "num_problems", "must be >= 0 (0 = all)")
    require(len(cfg.n) > 0 and all(int(x) >= 1 for x in cfg.n), "n", "needs sizes >= 1")
    bad = [m for m in cfg.methods if m not in SELECTION_METHODS]
    require(not bad, "methods", f"unknown {bad}; choose from {list(SELECTION_METHODS)}")
    bad = [a for a in cfg.aggregations if a not in AGGREGATIONS]
    require(not bad, "aggregations", f"unknown {bad}; choose from {sorted(AGGREGATIONS)}")
    require(
        cfg.weight_aggregation in AGGREGATIONS, "weight_aggregation", f"choose from {sorted(AGGREGATIONS)}"
    )
    require(
        all(b.top_k >= 1 and b.num_branch >= 1 for b in cfg.beams),
        "beams",
        "top_k and num_branch must be >= 1",
    )
    require(cfg.max_depth >= 1, "max_depth", "must be >= 1")
    require(cfg.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    require(cfg.max_step_tokens >= 1, "max_step_tokens", "must be >= 1")
    require(cfg.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
    require(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    require(cfg.num_workers >= 1, "num_workers", "must be >= 1")
    from rlloop.rewards.verifiers import list_verifiers

    require(cfg.verifier in list_verifiers(), "verifier", f"choose from {list_verifiers()}")
    from rlloop.rewards.prm.adapters import ADAPTER_NAMES

    if cfg.prm.adapter not in ADAPTER_NAMES:
        raise ConfigError(f"config prm.adapter={cfg.prm.adapter!r}: choose from {list(ADAPTER_NAMES)}")
    if cfg.prm.path and not Path(cfg.prm.path).is_dir():  # fail before any model loads
        raise ConfigError(
            f"prm.path={cfg.prm.path}: no such folder (train one with python -m rlloop.prm_train)"
        )
    if cfg.prm.path and not cfg.prm.tokenizer_path:
        # the PRM tokenizes with its own tokenizer unless prm.tokenizer_path says otherwise
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(cfg.prm.path)
        except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
            raise ConfigError(
                f"prm.path={cfg.prm.path}: cannot load its tokenizer ({type(err).__name__}); a PRM folder from "
                "python -m rlloop.prm_train has one, or set prm.tokenizer_path"
            ) from None


# ----- backends: where generation and scoring run ------------------------------------------------


class _Backend:
    """`sample` and `steps` with the search config's sampling settings; a backend says where a worker
    method runs on a list of items (`_call`)."""

    cfg: Any

    def _call(self, method: str, items: list, *args, **kwargs) -> list:
        raise NotImplementedError

    def _sampling(self, seed: int) -> dict:
        return {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "seed": seed}

    def sample(self, prompts: list[dict], n: int, seed: int):
        return self._call(
            "sample", prompts, n, max_new_tokens=self.cfg.max_new_tokens, **self._sampling(seed)
        )

    def steps(self, requests: list, n: int, seed: int):
        return self._call(
            "generate_steps", requests, n, max_step_tokens=self.cfg.max_step_tokens, **self._sampling(seed)
        )


class LocalBackend(_Backend):
    """The search worker and the PRM scorer in this process."""

    def __init__(self, cfg: Any, model_path: str):
        from rlloop.rewards.prm.service import PRMScorer
        from rlloop.search.worker import SearchWorkerCore

        self.cfg = cfg
        self.worker = SearchWorkerCore(model_path, **_worker_kwargs(cfg))
        self._scorer = None
        self._make_scorer = lambda: PRMScorer(_prm_path(cfg, model_path), **_prm_kwargs(cfg))

    def _call(self, method: str, items: list, *args, **kwargs) -> list:
        return getattr(self.worker, method)(items, *args, **kwargs)

    def score(self, prompt_texts, response_texts, step_char_ends) -> list[list[float]]:
        if self._scorer is None:  # loaded on first use: sampling-only runs (dump_rollouts) need no PRM
            self._scorer = self._make_scorer()
        return [r["step_values"] for r in self._scorer.score(prompt_texts, response_texts, step_char_ends)]

    def close(self) -> None:
        return None


class RayBackend(_Backend):
    """`num_workers` search workers (rollout workers with step generation) and one PRM service, as Ray actors.

    Work is split into contiguous shards, one per worker; every call has a timeout naming the actor.
    """

    def __init__(self, cfg: Any, model_path: str):
        from rlloop.distributed.ray_setup import get, init_ray
        from rlloop.rewards.prm.service import PRMService
        from rlloop.search.worker import SearchWorker

        init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.host)
        self.cfg = cfg
        self._get = get
        self.workers = [
            SearchWorker.options(num_cpus=cfg.worker_num_cpus).remote(
                model_path, **_worker_kwargs(cfg, seed=i)
            )
            for i in range(cfg.num_workers)
        ]
        self.prm = PRMService.options(num_cpus=cfg.prm.num_cpus).remote(
            _prm_path(cfg, model_path), **_prm_kwargs(cfg)
        )
        get(
            [w.ping.remote() for w in self.workers], timeout=cfg.call_timeout_s, what="search workers (start)"
        )
        get(self.prm.ping.remote(), timeout=cfg.call_timeout_s, what="PRM service (start)")

    def _call(self, method: str, items: list, *args, **kwargs) -> list:
        """`method` on contiguous shards of `items`, one per worker, results in item order."""
        k = len(self.workers)
        size = math.ceil(len(items) / k) if items else 0
        shards = [items[i * size : (i + 1) * size] for i in range(k)]
        refs = [
            (i, getattr(w, method).remote(shard, *args, **kwargs))
            for i, (w, shard) in enumerate(zip(self.workers, shards, strict=True))
            if shard
        ]
        out = []
        for i, ref in refs:
            out.extend(self._get(ref, timeout=self.cfg.call_timeout_s, what=f"search worker {i}.{method}"))
        return out

    def score(self, prompt_texts, response_texts, step_char_ends) -> list[list[float]]:
        ref = self.prm.score.remote(
            list(prompt_texts), list(response_texts), [list(e) for e in step_char_ends]
        )
        results = self._get(ref, timeout=self.cfg.call_timeout_s, what="PRM service.score")
        return [r["step_values"] for r in results]

    def close(self) -> None:
        import ray

        for actor in [*self.workers, self.prm]:
            ray.kill(actor)


def _worker_kwargs(cfg: Any, seed: int = 0) -> dict:
    return {
        "engine": "hf",
        "dtype": cfg.model.dtype,
        "num_threads": cfg.num_threads,
        "seed": cfg.seed + seed,
        "step_delimiter": cfg.step_delimiter,
        "step_regex": cfg.step_regex,
        "max_batch_size": cfg.max_batch_size,
    }


def _prm_path(cfg: Any, model_path: str) -> str:
    if cfg.prm.path:
        if not Path(cfg.prm.path).is_dir():
            raise ConfigError(
                f"prm.path={cfg.prm.path}: no such folder (train one with python -m rlloop.prm_train)"
            )
        return str(cfg.prm.path)
    logger.warning("prm.path is not set: scoring with %s and an untrained value head (V = 0.5)", model_path)
    return model_path


def _prm_kwargs(cfg: Any) -> dict:
    return {
        "tokenizer_path": cfg.prm.tokenizer_path,
        "dtype": cfg.prm.dtype,
        "num_threads": cfg.prm.num_threads,
        "batch_size": cfg.prm.batch_size,
        "step_delimiter": cfg.step_delimiter,
        "step_regex": cfg.step_regex,
        "max_length": cfg.prm.max_length,
        "adapter": cfg.prm.adapter,
        "adapter_options": dict(cfg.prm.adapter_options),
        "trust_remote_code": cfg.prm.trust_remote_code,
    }


# ----- the run -------------------------------------------------------------------------------------


def build_prompts(cfg: Any, model_path: str) -> list[dict]:
    """Prompt dicts (uid, prompt_ids, prompt_text, data_source, ground_truth) of the chosen problems."""
    from transformers import AutoTokenizer

    from rlloop.data import build_datasets, render_prompt

    train, test = build_datasets(cfg.task)
    samples = test if cfg.split == "test" else train
    if cfg.num_problems:
        samples = samples[: cfg.num_problems]
    if not samples:
        raise ConfigError(f"split={cfg.split} of task {cfg.task.name} has no problems")
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = []
    for s in samples:
        ids = render_prompt(s, tok, cfg.task)
        prompts.append(
            {
                "uid": s.uid,
                "prompt_ids": ids,
                "prompt_text": tok.decode(ids, skip_special_tokens=False),
                "data_source": s.data_source,
                "ground_truth": s.ground_truth,
            }
        )
    return prompts


def make_correct_fn(name: str):
    """(text, ground_truth, data_source) -> 1.0 / 0.0 with the registered verifier `name`."""
    from rlloop.rewards.verifiers import VerifyRequest, get_verifier

    verify = get_verifier(name)

    def correct(text: str, ground_truth: str, data_source: str) -> float:
        result = verify(
            VerifyRequest(uid="search", data_source=data_source, solution_str=text, ground_truth=ground_truth)
        )
        return float(result.scores.get("correct", result.score))

    return correct


def run_search(cfg: Any, out_dir: str, backend: Any = None) -> dict:
    """Run every configured method; returns (and writes to out_dir/search_results.json) the results."""
    from rlloop.models import resolve_model
    from rlloop.search.beam import StepBeamSearch
    from rlloop.search.bon import evaluate_selection, grade_candidates, sample_and_score

    check_config(cfg)
    t_start = time.perf_counter()
    model_path = resolve_model(cfg.model, cfg.task)
    prompts = build_prompts(cfg, model_path)
    backend = backend or (RayBackend if cfg.ray else LocalBackend)(cfg, model_path)
    correct_fn = make_correct_fn(cfg.verifier)
    ns = sorted({int(x) for x in cfg.n})
    rows: list[dict] = []
    results: dict[str, Any] = {
        "model": cfg.model.name,
        "model_path": model_path,
        "prm_path": cfg.prm.path,
        "task": cfg.task.name,
        "split": cfg.split,
        "num_problems": len(prompts),
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "methods": rows,
    }
    try:
        voters = [m for m in cfg.methods if m != "beam"]
        if voters or cfg.dump_rollouts:
            uses_prm = "bon" in voters or "weighted_majority" in voters
            candidates, timing = sample_and_score(
                prompts,
                max(ns),
                lambda p, n: backend.sample(p, n, cfg.seed),
                backend.score if uses_prm else None,
                correct_fn,
            )
            results["best_of_n_timing"] = timing
            methods = ["sample", "oracle"]
            if "bon" in voters:
                methods += [f"bon_{a}" for a in cfg.aggregations]
            methods += [m for m in ("majority", "weighted_majority") if m in voters]
            table = evaluate_selection(candidates, ns, methods, cfg.weight_aggregation)
            max_tokens = table["sample"][max(ns)]["tokens_per_problem"] or 1.0
            for m in methods:
                paid = timing["generate_s"] + (
                    timing["score_s"] if m.startswith(("bon", "weighted")) else 0.0
                )
                for n in ns:
                    share = table[m][n]["tokens_per_problem"] / max_tokens
                    rows.append({"method": m, "N": n, **table[m][n], "seconds": paid * share})
            if cfg.dump_rollouts:
                _dump(cfg.dump_rollouts, prompts, candidates)
        if "beam" in cfg.methods:
            for spec in cfg.beams:
                seeds = itertools.count(cfg.seed + 7919)  # a fresh seed per depth: depths draw independently
                search = StepBeamSearch(
                    lambda reqs, n, seeds=seeds: backend.steps(reqs, n, next(seeds)),
                    backend.score,
                    top_k=spec.top_k,
                    num_branch=spec.num_branch,
                    max_depth=cfg.max_depth,
                    max_new_tokens=cfg.max_new_tokens,
                    step_delimiter=cfg.step_delimiter,
                    step_regex=cfg.step_regex,
                )
                t0 = time.perf_counter()
                found = search.run(prompts)
                seconds = time.perf_counter() - t0
                best = [[r.best] for r in found]
                grade_candidates(prompts, best, correct_fn)
                rows.append(
                    {
                        "method": f"beam_k{spec.top_k}_b{spec.num_branch}",
                        "N": spec.top_k * spec.num_branch,
                        "accuracy": sum(b[0].correct for b in best) / len(best),
                        "tokens_per_problem": sum(r.num_tokens for r in found) / len(found),
                        "seconds": seconds,
                        "finished": sum(r.finished for r in found) / len(found),
                        "mean_depth": sum(r.depth for r in found) / len(found),
                        **{k: v for k, v in search.timing.items()},
                    }
                )
    finally:
        backend.close()
    results["total_seconds"] = time.perf_counter() - t_start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_results.json").write_text(json.dumps(results, indent=2))
    return results


def _dump(path: str, prompts: list[dict], candidates) -> None:
    """Best-of-N samples as rlloop rollouts jsonl (what `prm_train data.format=rollouts` reads)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for prompt, cs in zip(prompts, candidates, strict=True):
            for i, c in enumerate(cs):
                if not c.step_char_ends:
                    continue  # an empty solution has no state to score
                row = {
                    "uid": f"{prompt['uid']}/{i}",
                    "group": prompt["uid"],
                    "prompt_text": prompt["prompt_text"],
                    "text": c.text,
                    "step_char_ends": c.step_char_ends,
                    "finish_reason": c.finish_reason,
                    "ground_truth": prompt["ground_truth"],
                    "data_source": prompt["data_source"],
                    "correct": c.correct,
                }
                f.write(json.dumps(row) + "\n")
    logger.info("wrote Best-of-N samples to %s", p)


def format_table(results: dict) -> str:
    """The results as a fixed-width text table."""
    lines = [
        f"{results['model']} on {results['task']} ({results['split']}, {results['num_problems']} problems)",
        f"{'method':22s} {'N':>4s} {'accuracy':>9s} {'tokens/problem':>15s} {'seconds':>9s}",
    ]
    for r in results["methods"]:
        lines.append(
            f"{r['method']:22s} {r['N']:>4d} {r['accuracy']:>9.3f} {r['tokens_per_problem']:>15.1f} {r['seconds']:>9.1f}"
        )
    return "\n".join(lines)


def _main(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    out_dir = cfg.output_dir or HydraConfig.get().runtime.output_dir
    with exit_on_user_error(logger):
        check_config(cfg)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, f"{out_dir}/config_resolved.yaml", resolve=True)
        results = run_search(cfg, out_dir)
    print(format_table(results))
    print(f"outputs: {out_dir}  (search_results.json)")


def main() -> None:
    import hydra

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from rlloop.confdir import conf_dir

    config_path = conf_dir()
    hydra.main(version_base=None, config_path=config_path, config_name="search")(_main)()
