"""One rank of the policy learner: a DeepSpeed ZeRO engine over an HF causal LM.

Plain class (no Ray): `rlloop.learner.group.LearnerGroup` runs one per rank inside a Ray actor, and
tests run it in-process with world size 1. Token layout follows `rlloop.types.Batch`: arrays are
[B, T], right padded, and logprob-like arrays are aligned with `input_ids` (entry t scores token t
given tokens < t; entry 0 is 0).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlloop.algos.logprobs import position_logprobs, sampled_logprobs, used_length
from rlloop.learner.lora import adapter_dropout, adapter_off
from rlloop.learner.optim import build_ds_config
from rlloop.learner.segments import Segments, use_segments

logger = logging.getLogger(__name__)


def first_logit_position(response_mask: np.ndarray) -> int:
    """The first position whose logits any row needs: one before the earliest response token (0 if none).

    Rows hold their prompt, then their response (right-padded), so prompt tokens before this column
    predict nothing that is trained on or compared: the LM head can skip them (logits_to_keep).
    """
    cols = np.flatnonzero(np.asarray(response_mask).any(axis=0))
    return max(int(cols[0]) - 1, 0) if len(cols) else 0


def micro_slices(num_rows: int, micro_batch_size: int) -> list[slice]:
    """Consecutive row slices of at most `micro_batch_size` rows covering range(num_rows)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [slice(s, min(s + micro_batch_size, num_rows)) for s in range(0, num_rows, micro_batch_size)]


# learner.batching: how a rank's rows become micro-batches (see `PolicyLearner._row_plan`)
BATCHING = ("padded", "sorted", "packed")


def row_lengths(attention_mask: np.ndarray) -> np.ndarray:
    """[B] tokens of each right-padded row: up to and including its last attended token (>= 1)."""
    att = np.asarray(attention_mask) > 0
    last = att.shape[1] - np.argmax(att[:, ::-1], axis=1)
    return np.where(att.any(axis=1), last, 1).astype(np.int64)


def token_budget_micro_batches(lengths: np.ndarray, budget: int, *, packed: bool) -> list[np.ndarray]:
    """verl's dynamic batch size: rows sorted longest first, cut greedily into micro-batches that cost at
    most `budget` tokens each — padded tokens (rows x the micro-batch's longest row) or, `packed`, the
    sum of the rows' lengths. A row longer than the budget is a micro-batch of its own. Returns row
    indices, ascending within each micro-batch; every row appears once."""
    if budget < 1:
        raise ValueError(f"learner.micro_batch_tokens must be >= 1, got {budget}")
    plan: list[np.ndarray] = []
    current: list[int] = []
    longest = total = 0
    for row in np.argsort(-np.asarray(lengths), kind="stable"):
        length = int(lengths[row])
        cost = total + length if packed else max(longest, length) * (len(current) + 1)
        if current and cost > budget:
            plan.append(np.sort(np.array(current)))
            current, longest, total = [], 0, 0
        current.append(int(row))
        longest, total = max(longest, length), total + length
    if current:
        plan.append(np.sort(np.array(current)))
    return plan


def prompt_groups(
    input_ids: np.ndarray, attention_mask: np.ndarray, response_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(group [B], prompt length [B]) of right-padded rows: a row's prompt is its tokens before its first
    response token (at least its first token; a row with nothing to train is all prompt), and rows
    whose prompts are the same tokens get the same group id (numbered by first appearance)."""
    lengths = row_lengths(attention_mask)
    resp = np.asarray(response_mask) > 0
    first = np.where(resp.any(axis=1), np.argmax(resp, axis=1), lengths)
    prompt_len = np.clip(first, 1, lengths).astype(np.int64)
    ids: dict[bytes, int] = {}
    group = np.array(
        [ids.setdefault(np.asarray(input_ids[r, :n]).tobytes(), len(ids)) for r, n in enumerate(prompt_len)],
        dtype=np.int64,
    )
    return group, prompt_len


def shared_prompt_micro_batches(
    lengths: np.ndarray, group: np.ndarray, prompt_len: np.ndarray, budget: int
) -> list[np.ndarray]:
    """learner.batching=packed with shared prompts (`PackedRows.build(share=True)`): whole prompt groups
    packed into micro-batches of at most `budget` tokens, a group's prompt counted once; a group that
    alone costs more is cut into runs of its rows (longest first), each paying the prompt again, and a
    single row longer than the budget is a run of its own. Runs are placed costliest first, greedily.
    Returns row indices, ascending within each micro-batch; every row appears once."""
    if budget < 1:
        raise ValueError(f"learner.micro_batch_tokens must be >= 1, got {budget}")
    lengths = np.asarray(lengths)
    runs: list[tuple[int, list[int]]] = []
    for g in dict.fromkeys(np.asarray(group).tolist()):
        rows = np.flatnonzero(group == g)
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        shared = int(prompt_len[rows[0]])
        current: list[int] = []
        cost = shared
        for row in rows:
            extra = int(lengths[row]) - shared
            if current and cost + extra > budget:
                runs.append((cost, current))
                current, cost = [], shared
            current.append(int(row))
            cost += extra
        runs.append((cost, current))
    plan: list[np.ndarray] = []
    batch: list[int] = []
    total = 0
    for cost, rows in sorted(runs, key=lambda run: -run[0]):
        if batch and total + cost > budget:
            plan.append(np.sort(np.array(batch)))
            batch, total = [], 0
        batch += rows
        total += cost
    if batch:
        plan.append(np.sort(np.array(batch)))
    return plan


def split_micro_batches(plan: list[np.ndarray], count: int, lengths: np.ndarray) -> list[np.ndarray]:
    """`plan` with its costliest micro-batches halved until there are `count` of them (every rank must run
    as many forwards and backwards: ZeRO-3 gathers and ZeRO-2 reduces per micro-batch). count must not
    exceed the number of rows."""
    plan = list(plan)
    if count > sum(len(rows) for rows in plan):
        raise ValueError(f"split_micro_batches: {count} micro-batches of {sum(len(r) for r in plan)} rows")
    while len(plan) < count:
        i = max(
            (i for i, rows in enumerate(plan) if len(rows) > 1),
            key=lambda i: len(plan[i]) * int(lengths[plan[i]].max()),
        )
        rows = plan.pop(i)
        by_length = rows[np.argsort(-lengths[rows], kind="stable")]
        half = len(rows) // 2
        plan[i:i] = [np.sort(by_length[:half]), np.sort(by_length[half:])]
    return plan


def micro_batch_weight(mask: torch.Tensor, rows: Any, num_cols: int, loss_agg: str) -> float:
    """Weight w such that sum_i w_i * agg(micro-batch i) == agg(whole batch).

    Every loss aggregation mode is linear in the loss matrix, with per-token coefficients that inside one
    micro-batch are proportional to the whole batch's (token-mean: 1/N, seq-mean-*: 1/B, ...). So w is
    the whole-batch coefficient mass of the micro-batch's rows, agg(1[rows], mask), over the micro-batch's
    own coefficient mass, agg(1, mask[rows, :num_cols]). Zero when the micro-batch has no trained token.
    mask: [B, T] response mask of the whole batch; rows: a slice or row indices.
    """
    from rlloop.algos.losses import aggregate_loss

    indicator = torch.zeros_like(mask)
    indicator[rows] = 1.0
    whole = float(aggregate_loss(indicator, mask, loss_agg))
    micro_mask = mask[rows, :num_cols]
    own = float(aggregate_loss(torch.ones_like(micro_mask), micro_mask, loss_agg))
    if own == 0.0 or not math.isfinite(own) or not math.isfinite(whole):
        return 0.0
    return whole / own


@dataclass
class PackedRows:
    """A micro-batch's rows concatenated into one row without padding (learner.batching=packed).

    ids, position_ids [1, S]: the packed tokens and their positions in their own rows; keep [K]: the
    packed positions whose logits predict a trained token, targets [K] those tokens, at (row, col) [K]
    of the micro-batch's padded [b, n] layout. Two layouts:
    - `share=True` (a model that runs `rlloop.learner.segments`): each distinct prompt once, followed by
      the rest of every row that continues it; `segments` says which tokens see which.
    - `share=False`: the rows back to back, positions restarting at 0 on each row, from which
      transformers builds a block-diagonal causal mask (a dense [S, S] one on CPU) when no attention
      mask is given; `segments` is None."""

    ids: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor
    targets: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    segments: Segments | None = None

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        att: np.ndarray,
        response_mask: np.ndarray,
        device: torch.device,
        *,
        share: bool = False,
    ) -> PackedRows:
        """From a micro-batch's right-padded ids, attention mask and response mask [b, n] (numpy)."""
        lengths = row_lengths(att)
        row, col = np.nonzero(np.asarray(response_mask)[:, 1:] > 0)  # column 0 has no logits to predict it
        col = col + 1
        if np.any(col >= lengths[row]):
            raise ValueError("PackedRows: a trained token lies in a row's padding (attention mask 0)")

        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        segments = None
        if not share:
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            packed = np.concatenate([ids[r, :length] for r, length in enumerate(lengths)])
            positions = np.concatenate([np.arange(length) for length in lengths])
            keep = offsets[row] + col - 1
        else:
            group, prompt_len = prompt_groups(ids, att, response_mask)
            parts, positions_parts = [], []
            prompt_pos: list[np.ndarray] = []
            seq_pos: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(lengths)
            offset = 0
            for g in range(int(group.max()) + 1):  # group ids number prompts by first appearance
                members = np.flatnonzero(group == g)
                shared = int(prompt_len[members[0]])
                parts.append(ids[members[0], :shared])
                positions_parts.append(np.arange(shared))
                prompt_pos.append(np.arange(offset, offset + shared))
                offset += shared
                for r in members:
                    rest = int(lengths[r]) - shared
                    parts.append(ids[r, shared : lengths[r]])
                    positions_parts.append(np.arange(shared, lengths[r]))
                    seq_pos[r] = np.arange(offset, offset + rest)
                    offset += rest
            packed, positions = np.concatenate(parts), np.concatenate(positions_parts)
            # the logits at column c - 1 of row r predict its token c: in its prompt, or after it
            before = col - 1
            in_prompt = before < prompt_len[row]
            prompt_start = np.array([p[0] for p in prompt_pos])
            seq_start = np.array([offset if len(p) == 0 else p[0] for p in seq_pos])
            keep = np.where(
                in_prompt, prompt_start[group[row]] + before, seq_start[row] + before - prompt_len[row]
            )
            segments = Segments.build(prompt_pos, seq_pos, group.tolist(), device)
        return cls(
            ids=tensor(packed)[None],
            position_ids=tensor(positions)[None],
            keep=tensor(keep),
            targets=tensor(ids[row, col]),
            row=tensor(row),
            col=tensor(col),
            segments=segments,
        )


def model_flops_per_token(model: torch.nn.Module) -> tuple[float, float]:
    """(6 x the non-embedding parameters, 6 x the LM head's): the forward + backward FLOPs a token costs in
    the body, and in the vocabulary projection for a token whose logits are computed (Kaplan et al.'s
    6N; attention's sequence-length term left out, small at these lengths)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(p) for m in (emb, head) if m is not None for p in m.parameters()}
    body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    head_n = head.weight.numel() if head is not None else 0
    return 6.0 * body, 6.0 * head_n


@dataclass
class MicroBatch:
    """One micro-batch of a train step: its rows (indices into the rank's batch), loss weight
    (`micro_batch_weight`), model inputs ids/att [b, n], response mask [b, n] on the learner's device,
    its share of the batch's response tokens, the first position whose logits it needs
    (`first_logit_position`) and, under learner.batching=packed, its rows packed into one."""

    rows: Any
    weight: float
    ids: torch.Tensor
    att: torch.Tensor
    n: int
    mask: torch.Tensor
    token_share: float
    start: int = 0
    packed: PackedRows | None = None


class PolicyLearner:
    """One DeepSpeed rank holding the policy (and, if `algo_cfg["use_ref"]`, a frozen reference copy; with
    `learner.lora` the policy is the frozen base plus an adapter, and the reference is that base with the
    adapter switched off, no copy).

    learner_cfg / algo_cfg are plain dicts of `rlloop.config.LearnerConfig` / `AlgoConfig`. Extra,
    optional learner_cfg keys: `zero3_param_persistence_threshold` (int).
    """

    # learner.batching=packed needs a forward that takes packed rows; a subclass without one (the
    # critic's value model) gets the sorted micro-batches instead
    PACKS = True

    def __init__(
        self,
        model_path: str,
        learner_cfg: dict,
        algo_cfg: dict,
        *,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        temperature: float = 1.0,
        train_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        from rlloop.config import AlgoConfig, LearnerConfig, with_defaults

        # keys the caller leaves out take the schema's defaults (rlloop.config), never a second set here
        self.learner_cfg = with_defaults(LearnerConfig, learner_cfg)
        self.algo_cfg = with_defaults(AlgoConfig, algo_cfg)
        self.temperature = float(temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for logprobs, got {temperature}")
        self.micro_batch_size = int(self.learner_cfg["micro_batch_size"])
        self.batching = str(self.learner_cfg["batching"])
        if self.batching not in BATCHING:
            raise ValueError(f"learner.batching must be one of {list(BATCHING)}, got {self.batching!r}")
        tokens = self.learner_cfg["micro_batch_tokens"]
        self.micro_batch_tokens = None if tokens is None else int(tokens)
        self.zero_stage = int(self.learner_cfg["zero_stage"])
        self._version = 0
        if world_size == 1 and self.zero_stage > 0:
            logger.warning(
                "learner.zero_stage=%d at learner.world_size=1 partitions nothing and costs memory (a flat "
                "fp32 copy of the weights, gradient buckets); learner.zero_stage=0 (preset learner=single) "
                "takes the same steps",
                self.zero_stage,
            )

        os.environ.update(
            MASTER_ADDR=str(master_addr),
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            # One rank per actor/process; on GPU, Ray's CUDA_VISIBLE_DEVICES makes device 0 the right one.
            LOCAL_RANK="0",
        )
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from rlloop.distributed.procmem import set_malloc_mmap_threshold

        threshold_mb = float(self.learner_cfg["malloc_mmap_threshold_mb"])
        if threshold_mb > 0 and not set_malloc_mmap_threshold(int(threshold_mb * 2**20)):
            logger.warning(
                "learner.malloc_mmap_threshold_mb=%g: not applied (no glibc, or glibc refused the value)", threshold_mb
            )
        num_threads = int(self.learner_cfg["num_threads"])
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
        torch.set_num_threads(num_threads)
        torch.manual_seed(seed)

        timings = {"start": time.perf_counter()}
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        accel = get_accelerator()
        timings["import"] = time.perf_counter()
        from rlloop.models.ds_engine import prepare_cpu_ops

        prepare_cpu_ops()  # DeepSpeed's CPU op built before the rendezvous, safe against stale build locks
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
        self.device = torch.device(accel.current_device_name())
        timings["init_distributed"] = time.perf_counter()

        model = self._load_model(model_path)
        timings["load model"] = time.perf_counter()
        # learner.batching=packed stores each distinct prompt of a micro-batch once and attends by
        # segments (rlloop.learner.segments), set before the reference copy so that it runs them too
        self.segment_model = self._packs() and use_segments(model)
        if self._packs() and not self.segment_model:
            logger.warning(
                "learner.batching=packed: %s does not run transformers' sdpa attention interface; its packed "
                "rows get a block-diagonal mask instead (dense [S, S] on CPU) and prompts are not shared",
                type(model).__name__,
            )
        gc_layers = 0
        if self.learner_cfg["gradient_checkpointing"]:
            gc_layers = enable_gradient_checkpointing(model)
        self.hf_config = model.config
        self.flops_per_token, self.head_flops_per_token = model_flops_per_token(model)
        self.ref_model: torch.nn.Module | None = None
        self.lora = self._lora_settings()
        if self.lora is not None:
            model = self._with_adapter(model)
        elif self.algo_cfg["use_ref"]:
            # Frozen copy of the initial weights, taken before ZeRO-3 partitions the parameters.
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False).to(self.device)

        per_rank = math.ceil(train_batch_size / world_size) if train_batch_size else self.micro_batch_size
        grad_accum = max(1, math.ceil(per_rank / self.micro_batch_size))
        ds_config = build_ds_config(
            zero_stage=self.zero_stage,
            micro_batch_size=self.micro_batch_size,
            grad_accum=grad_accum,
            grad_clip=float(self.learner_cfg["grad_clip"] or 0.0),
            bf16=bool(self.learner_cfg["bf16"]),
            zero3_param_persistence_threshold=self.learner_cfg.get("zero3_param_persistence_threshold"),
            offload_optimizer=bool(self.learner_cfg["offload_optimizer"]),
            offload_params=bool(self.learner_cfg["offload_params"]),
            overrides=self.learner_cfg["deepspeed_overrides"],
        )
        # only what trains has optimizer state (with LoRA: the adapter, and a critic's value head)
        trainable = [p for p in model.parameters() if p.requires_grad]
        num_trainable = sum(p.numel() for p in trainable)  # before ZeRO-3 empties the parameters
        adam = dict(
            lr=float(self.learner_cfg["lr"]),
            weight_decay=float(self.learner_cfg["weight_decay"]),
            betas=tuple(float(b) for b in self.learner_cfg["betas"]),
        )
        if self.learner_cfg["offload_optimizer"]:
            # ZeRO-Offload steps Adam on the CPU; DeepSpeed's vectorised CPU Adam (JIT-built once, ~40 s)
            # is the optimizer it is made for (it refuses a torch optimizer there by default)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(trainable, adamw_mode=True, **adam)
        else:
            optimizer = torch.optim.AdamW(trainable, **adam)
        from rlloop.learner.optim import build_scheduler

        decay_steps = self.learner_cfg["lr_decay_steps"]
        if decay_steps is None and self.learner_cfg["lr_scheduler"] != "constant":
            raise ValueError(
                f"learner.lr_scheduler={self.learner_cfg['lr_scheduler']!r} needs learner.lr_decay_steps "
                "(the controller sets it to trainer.total_steps x algo.ppo_epochs)"
            )
        decay_steps = int(decay_steps or 1)
        scheduler = build_scheduler(optimizer, self.learner_cfg, decay_steps)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        # Dropout off in every forward, so logprobs of the update match the old/ref logprobs at ratio 1.
        self.engine.eval()
        if gc_layers:
            checkpoint_in_eval_mode(model)
        timings["deepspeed.initialize"] = time.perf_counter()
        phases = list(timings)
        # seconds per init phase, for the group's start-up log
        self.init_timings = {
            b: round(timings[b] - timings[a], 2) for a, b in zip(phases, phases[1:], strict=False)
        }
        logger.info(
            "learner rank %d/%d ready: ZeRO-%d, micro batch %d, grad accum %d, bf16 %s, "
            "gradient checkpointing %s, offload %s, LoRA %s, LR %s over %d steps, phases %s",
            rank,
            world_size,
            self.zero_stage,
            self.micro_batch_size,
            grad_accum,
            ds_config["bf16"]["enabled"],
            f"{gc_layers} layers" if gc_layers else "off",
            sorted(k for k in ds_config["zero_optimization"] if k.startswith("offload")) or "off",
            f"rank {self.lora['rank']}, {num_trainable} trainable, weight sync {4 * num_trainable / 2**20:.2f} MB"
            if self.lora
            else "off",
            self.learner_cfg["lr_scheduler"],
            decay_steps,
            self.init_timings,
        )

    def _lora_settings(self) -> dict | None:
        """learner.lora when it asks for an adapter, else None."""
        from rlloop.learner.lora import lora_enabled

        return dict(self.learner_cfg["lora"]) if lora_enabled(self.learner_cfg["lora"]) else None

    def _with_adapter(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` with a fresh LoRA adapter (peft); the critic puts it on its backbone instead."""
        from rlloop.learner.lora import apply_lora

        return apply_lora(model, self.lora)

    def _empty_model(self) -> torch.nn.Module:
        """The trained module's architecture, built under the meta device by `lora_model`."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)

    def lora_model(self, state: dict[str, np.ndarray]) -> torch.nn.Module:
        """LoRA: a CPU copy of the model and adapter holding `state` (full_state_dict's names), for
        `save_adapter` and `merge_adapter` (which merges in place: the arrays of `state` change too)."""
        from rlloop.learner.lora import model_from_state

        return model_from_state(self._empty_model, self._with_adapter, state)

    def _load_model(self, model_path: str) -> torch.nn.Module:
        """The trained module, in float32 (CriticLearner loads a value model instead)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    # ------------------------------------------------------------------ forward passes

    @property
    def version(self) -> int:
        """Number of optimizer steps taken (the policy version rollouts are tagged with)."""
        return self._version

    def _model(self, which: str) -> torch.nn.Module:
        if which == "policy":
            return self.engine
        if which == "ref":
            if self.lora is not None:
                return self.engine  # compute_logprobs switches the adapter off (lora.adapter_off)
            if self.ref_model is None:
                raise ValueError("compute_logprobs(which='ref') needs algo_cfg['use_ref'] = True")
            return self.ref_model
        raise ValueError(f"compute_logprobs: which must be 'policy' or 'ref', got {which!r}")

    def _inputs(self, batch: Any, rows: slice) -> tuple[torch.Tensor, torch.Tensor, int]:
        num_cols = used_length(batch.attention_mask[rows])
        # torch.tensor copies: arrays from Ray's object store are read-only
        ids = torch.tensor(batch.input_ids[rows, :num_cols], dtype=torch.long, device=self.device)
        att = torch.tensor(batch.attention_mask[rows, :num_cols], dtype=torch.long, device=self.device)
        return ids, att, num_cols

    def _row_plan(self, batch: Any) -> list[np.ndarray]:
        """The rank's rows cut into micro-batches (row indices), by learner.batching: `padded`, consecutive
        rows, micro_batch_size at a time, each padded to its longest row; `sorted` / `packed`, rows sorted
        by length and cut by a token budget (learner.micro_batch_tokens; default micro_batch_size x the
        longest row: never more tokens than a padded micro-batch). Above world size 1 every rank ends up
        with as many micro-batches (the most any rank planned)."""
        if self.batching == "padded":
            return [np.arange(s.start, s.stop) for s in micro_slices(len(batch), self.micro_batch_size)]
        lengths = row_lengths(batch.attention_mask)
        budget = self.micro_batch_tokens or self.micro_batch_size * int(lengths.max())
        if self._shares():
            group, prompt_len = prompt_groups(batch.input_ids, batch.attention_mask, batch.response_mask)
            plan = shared_prompt_micro_batches(lengths, group, prompt_len, budget)
        else:
            plan = token_budget_micro_batches(lengths, budget, packed=self._packs())
        if self.world_size > 1:
            import torch.distributed as dist

            count = torch.tensor([len(plan)], dtype=torch.long)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            plan = split_micro_batches(plan, int(count), lengths)
        return plan

    def _packs(self) -> bool:
        return self.batching == "packed" and self.PACKS

    def _shares(self) -> bool:
        """Packed micro-batches store each distinct prompt once (the model runs segment attention)."""
        return self._packs() and self.segment_model

    def _micro_batch_plan(self, batch: Any, loss_agg: str) -> tuple[torch.Tensor, list[tuple[np.ndarray, float]]]:
        """The batch's response mask [B, T] (CPU) and its micro-batches as (rows, weight): weighted so that
        the micro-batch losses add up to the loss of the whole batch under `loss_agg`."""
        mask = torch.tensor(batch.response_mask, dtype=torch.float32)
        plan = self._row_plan(batch)
        lengths = [used_length(batch.attention_mask[rows]) for rows in plan]
        weights = [
            micro_batch_weight(mask, torch.as_tensor(rows), n, loss_agg) for rows, n in zip(plan, lengths, strict=True)
        ]
        return mask, list(zip(plan, weights, strict=True))

    def _micro_batch(self, batch: Any, rows: np.ndarray, mask: torch.Tensor, weight: float = 0.0) -> MicroBatch:
        """Micro-batch `rows` of `batch`, its inputs on the learner's device, ready for a forward."""
        ids, att, n = self._inputs(batch, rows)
        response = batch.response_mask[rows, :n]
        micro_mask = mask[torch.as_tensor(rows), :n].to(self.device)
        total_tokens = float(mask.sum())
        token_share = float(micro_mask.sum()) / total_tokens if total_tokens > 0 else 0.0
        packed = None
        if self._packs():
            packed = PackedRows.build(
                batch.input_ids[rows, :n], batch.attention_mask[rows, :n], response, self.device,
                share=self._shares(),
            )  # fmt: skip
        return MicroBatch(
            rows, weight, ids, att, n, micro_mask, token_share, first_logit_position(response), packed
        )

    def _micro_batches(
        self, batch: Any, mask: torch.Tensor, plan: list[tuple[np.ndarray, float]]
    ) -> Iterator[MicroBatch]:
        """One epoch over `plan` (`_micro_batch_plan`), each micro-batch's inputs ready for a forward."""
        for i, (rows, weight) in enumerate(plan):
            # One optimizer step per epoch whatever the number of micro-batches (the configured
            # gradient_accumulation_steps is only a hint): the boundary is the last micro-batch.
            self.engine.set_gradient_accumulation_boundary(i == len(plan) - 1)
            yield self._micro_batch(batch, rows, mask, weight)

    def _forward(
        self, model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, int]:
        """(logits of positions start..T-1, start). The LM head and the softmax over the vocabulary run
        only where a response token is predicted (HF `logits_to_keep`); a model without that argument
        gets logits everywhere and start 0."""
        if start > 0 and _keeps_logits(model):
            out = model(input_ids=ids, attention_mask=att, use_cache=False, logits_to_keep=ids.shape[1] - start)
            return out.logits, start
        return model(input_ids=ids, attention_mask=att, use_cache=False).logits, 0

    def _token_logprobs(
        self, model: torch.nn.Module, mb: MicroBatch, *, with_entropy: bool, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, entropy) [b, n] of micro-batch `mb` under `model`, aligned with mb.ids (column t:
        the distribution that predicts token t). Padded rows: every column from mb.start + 1 on;
        packed rows: the response columns only, 0 elsewhere. The entropy is a metric (0 unless
        `with_entropy`), or differentiable with `entropy_grad` (the entropy bonus)."""
        if mb.packed is None:
            logits, start = self._forward(model, mb.ids, mb.att, mb.start)
            logprobs, entropy = sampled_logprobs(
                logits, mb.ids, self.temperature, start, with_entropy=with_entropy and not entropy_grad
            )
            if entropy_grad:
                from rlloop.algos.losses import entropy_from_logits

                entropy = torch.nn.functional.pad(
                    entropy_from_logits(logits[:, :-1].float() / self.temperature), (start + 1, 0)
                )
            return logprobs, entropy
        p = mb.packed
        kwargs = {"input_ids": p.ids, "position_ids": p.position_ids, "use_cache": False}
        if p.segments is not None:
            # segment attention masks by itself: a 4D placeholder, which transformers passes through as
            # a ready mask, spares it building a dense [S, S] one from the position ids
            kwargs.update(rlloop_segments=p.segments, attention_mask=_NO_MASK)
        if _keeps_logits(model):  # no attention mask: HF masks each packed row off the others
            logits = model(**kwargs, logits_to_keep=p.keep).logits[0]
        else:
            logits = model(**kwargs).logits[0, p.keep]
        logprobs, entropy = position_logprobs(
            logits, p.targets, self.temperature, with_entropy=with_entropy and not entropy_grad
        )
        if entropy_grad:
            from rlloop.algos.losses import entropy_from_logits

            entropy = entropy_from_logits(logits[None].float() / self.temperature)[0]
        shape = (len(mb.rows), mb.n)
        return (
            logprobs.new_zeros(shape).index_put((p.row, p.col), logprobs),
            entropy.new_zeros(shape).index_put((p.row, p.col), entropy),
        )

    def compute_logprobs(self, batch: Any, which: str = "policy") -> np.ndarray:
        """Per-token logprobs of `batch.input_ids` under the policy or the reference model.

        Returns float32 [B, T], aligned with input_ids: the logprob of every response token
        (batch.response_mask), 0 on prompt and padding columns. The LM head runs only from the
        micro-batch's earliest response token on. Micro-batched, no grad. Under ZeRO-3 every rank must
        call this together with the same number of rows.
        """
        model = self._model(which)
        out = np.zeros(batch.input_ids.shape, dtype=np.float32)
        mask = torch.tensor(batch.response_mask, dtype=torch.float32)
        with torch.no_grad(), adapter_off(self.engine, self.lora, which == "ref"):
            for rows in self._row_plan(batch):
                mb = self._micro_batch(batch, rows, mask)
                logprobs, _ = self._token_logprobs(model, mb, with_entropy=False)
                out[rows, : mb.n] = logprobs.cpu().numpy() * batch.response_mask[rows, : mb.n]
        return out

    # ------------------------------------------------------------------ update

    def train_step(self, batch: Any, loss_scale: float = 1.0) -> dict[str, float]:
        """`algo_cfg["ppo_epochs"]` optimizer steps of the policy loss over this rank's batch.

        Needs batch.old_logprobs, advantages, response_mask (and ref_logprobs when the KL term is in the
        loss; rollout_logprobs when tis_cap is set). The micro-batch losses are weighted so they add up
        to the loss of the whole per-rank batch; `loss_scale` multiplies it (LearnerGroup uses it so that
        DeepSpeed's mean over ranks equals the loss of the whole global batch).
        Returns the metrics actor/pg_loss, pg_clipfrac, ppo_kl, entropy, kl_ref, grad_norm, lr (+ extras
        from the policy loss), averaged over epochs.
        """
        from rlloop.algos.kl import kl_penalty
        from rlloop.algos.losses import aggregate_loss, compute_policy_loss

        algo = self.algo_cfg
        ppo_epochs = int(algo["ppo_epochs"])
        # One epoch = one optimizer step after every micro-batch's forward: the update's own logprobs,
        # detached, ARE the old policy's (what a separate no-grad pass would recompute), so the ratio
        # starts at exactly 1 with one forward pass less per micro-batch.
        fused_old = batch.old_logprobs is None and ppo_epochs == 1
        if batch.old_logprobs is None and not fused_old:
            raise ValueError(
                f"train_step: batch.old_logprobs is None with ppo_epochs={ppo_epochs} "
                "(compute_logprobs(which='policy') first; only a one-epoch update takes them from its own forward)"
            )
        loss_agg = algo["loss_agg"]
        kl_coef = float(algo["kl_coef"])
        kl_in_loss = kl_coef > 0 and not algo["kl_in_reward"]
        if kl_in_loss and batch.ref_logprobs is None:
            raise ValueError("train_step: kl_coef > 0 with kl_in_reward = False needs batch.ref_logprobs")
        entropy_coef = float(algo["entropy_coef"])
        tis_cap = algo["tis_cap"]

        mask, plan = self._micro_batch_plan(batch, loss_agg)

        def arr(x: np.ndarray | None, rows: np.ndarray, n: int) -> torch.Tensor | None:
            return None if x is None else torch.tensor(x[rows, :n], dtype=torch.float32, device=self.device)

        sums: dict[str, float] = {}

        def add(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + value / ppo_epochs

        lr = float(self.engine.get_lr()[0])  # the rate this update's first optimizer step uses
        tokens = computed = needed = trained = 0.0
        for _ in range(ppo_epochs):
            for mb in self._micro_batches(batch, mask, plan):
                rows, weight, n = mb.rows, mb.weight, mb.n
                real = float(mb.att.sum())
                positions = float(mb.packed.ids.numel() if mb.packed is not None else mb.ids.numel())
                tokens += real
                computed += positions
                needed += min(real, positions)  # the real tokens, less prompts shared by several rows
                trained += float(mb.mask.sum())
                micro_mask, token_share = mb.mask, mb.token_share
                # Entropy of the sampling distribution at each position (column t predicts token t):
                # a metric from the chunked pass, or, for the entropy bonus, differentiable.
                with adapter_dropout(self.engine, self.lora):
                    logprobs, ent_mat = self._token_logprobs(
                        self.engine, mb, with_entropy=entropy_coef == 0.0, entropy_grad=entropy_coef != 0.0
                    )
                old = logprobs.detach() if fused_old else arr(batch.old_logprobs, rows, n)
                if batch.rollout_logprobs is not None:
                    # learner vs rollout engine on the sampled tokens (the controller's
                    # rollout/logprob_mismatch), before this update's optimizer step
                    diff = (old - arr(batch.rollout_logprobs, rows, n)).abs()
                    add("actor/rollout_logprob_mismatch", float(_masked_mean(diff, micro_mask)) * token_share)
                pg_loss, pg_metrics = compute_policy_loss(
                    algo["policy_loss"],
                    logprobs,
                    old,
                    arr(batch.advantages, rows, n),
                    micro_mask,
                    loss_agg=loss_agg,
                    clip_low=float(algo["clip_low"]),
                    clip_high=float(algo["clip_high"]),
                    clip_ratio_c=float(algo["clip_ratio_c"]),
                    rollout_logprobs=arr(batch.rollout_logprobs, rows, n) if tis_cap is not None else None,
                    tis_cap=tis_cap,
                )
                loss = pg_loss
                if entropy_coef != 0.0:
                    loss = loss - entropy_coef * aggregate_loss(ent_mat, micro_mask, loss_agg)
                if batch.ref_logprobs is not None:
                    with torch.set_grad_enabled(kl_in_loss):
                        kl_mat = kl_penalty(
                            algo["kl_estimator"], logprobs, arr(batch.ref_logprobs, rows, n)
                        )
                        kl_ref = aggregate_loss(kl_mat, micro_mask, loss_agg)
                    if kl_in_loss:
                        loss = loss + kl_coef * kl_ref
                    add("actor/kl_ref", float(_masked_mean(kl_mat.detach(), micro_mask)) * token_share)
                # DeepSpeed would divide by gradient_accumulation_steps; the weights already make the
                # micro-batch losses sum to the per-rank batch loss, so no further scaling.
                self.engine.backward(loss * (weight * loss_scale), scale_wrt_gas=False)

                add("actor/pg_loss", float(pg_loss.detach()) * weight)
                add("actor/entropy", float(_masked_mean(ent_mat.detach(), micro_mask)) * token_share)
                for key, value in pg_metrics.items():
                    name = key if key.startswith("actor/") else f"actor/{key}"
                    if name != "actor/pg_loss":
                        add(name, float(value) * token_share)
            grad_norm = optimizer_step(self.engine)
            self._version += 1
            add("actor/grad_norm", grad_norm)
        sums["actor/lr"] = lr
        # this rank's work (merge_rank_metrics sums perf/* over ranks): real tokens forwarded, positions
        # computed (padding included; shared prompts once), and model FLOPs, forward + backward: 6 x
        # non-embedding parameters per real token (a prompt shared by several rows of a packed micro-batch
        # counted once: the work there is to do) plus 6 x the LM head per trained token (the head runs
        # only where a response token is predicted). MFU = perf/model_flops / time / peak FLOP/s
        # (benchmarks/vs_trl.py).
        sums["perf/tokens"] = tokens
        sums["perf/computed_tokens"] = computed
        sums["perf/model_flops"] = self.flops_per_token * needed + self.head_flops_per_token * trained
        return sums

    # ------------------------------------------------------------------ weights out

    def full_state_dict(self) -> dict[str, np.ndarray] | None:
        """Full float32 weights keyed by HF `state_dict()` names, on rank 0; None on other ranks.

        Every rank must call it: under ZeRO-3 each parameter is all-gathered in turn (one at a time, so
        peak memory is one full parameter beyond the shard).
        """
        import deepspeed

        module = self.engine.module
        keys = list(module.state_dict().keys())
        out: dict[str, np.ndarray] = {}
        seen: dict[int, np.ndarray] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if id(param) in seen:  # tied weights: one gather, every name
                if self.rank == 0:
                    out[name] = seen[id(param)]
                continue
            if self.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    value = param.detach().float().cpu().numpy().copy() if self.rank == 0 else None
            else:
                value = param.detach().float().cpu().numpy().copy() if self.rank == 0 else None
            if self.rank == 0:
                seen[id(param)] = out[name] = value
        if self.rank != 0:
            return None
        state = module.state_dict()
        for key in keys:  # persistent buffers are never partitioned
            if key not in out:
                out[key] = state[key].detach().cpu().numpy().copy()
        return {key: out[key] for key in keys}

    def weight_bucket_plan(self, bucket_bytes: int) -> list[int]:
        """Cut the weights into sync buckets of about `bucket_bytes` float32 bytes; returns each bucket's
        bytes. Every rank computes the same plan (same model, same order); `gather_weight_bucket(i)`
        then gathers bucket i. Tied parameters are one tensor under all their names; persistent buffers
        (never partitioned) come last.
        """
        from rlloop.distributed.weight_sync import plan_buckets

        module = self.engine.module
        entries: list[dict[str, Any]] = []
        by_id: dict[int, dict[str, Any]] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if self.lora is not None and not param.requires_grad:
                continue  # LoRA: the workers hold the frozen base already; only the adapter moves
            if id(param) in by_id:
                by_id[id(param)]["names"].append(name)
                continue
            # ZeRO-3 leaves an empty shard in param.data; ds_numel is the full size
            numel = int(getattr(param, "ds_numel", param.numel()))
            by_id[id(param)] = {"names": [name], "param": param, "bytes": 4 * numel}
            entries.append(by_id[id(param)])
        named = {n for e in entries for n in e["names"]}
        for key, value in ({} if self.lora is not None else module.state_dict()).items():
            if key not in named:
                entries.append({"names": [key], "param": None, "bytes": value.element_size() * value.numel()})
        buckets = plan_buckets([e["bytes"] for e in entries], int(bucket_bytes))
        self._bucket_plan = [[entries[i] for i in bucket] for bucket in buckets]
        return [sum(e["bytes"] for e in bucket) for bucket in self._bucket_plan]

    def gather_weight_bucket(self, index: int) -> dict[str, np.ndarray] | None:
        """Full float32 weights of sync bucket `index` (HF `state_dict` names) on rank 0, None elsewhere.

        Every rank must call it with the same index (after `weight_bucket_plan`). Under ZeRO-3 the
        bucket's parameters are all-gathered together and released on leaving, so a rank holds at most one
        bucket of full parameters beyond its shard. Arrays are copies: later updates do not change them.
        """
        import contextlib

        import deepspeed

        plan = getattr(self, "_bucket_plan", None)
        if plan is None or not 0 <= index < len(plan):
            raise ValueError(
                f"gather_weight_bucket({index}): no such bucket; call weight_bucket_plan first "
                f"({0 if plan is None else len(plan)} buckets planned)"
            )
        bucket = plan[index]
        params = [e["param"] for e in bucket if e["param"] is not None]
        gather = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if self.zero_stage == 3 and params
            else contextlib.nullcontext()
        )
        out: dict[str, np.ndarray] = {}
        with torch.no_grad(), gather:
            if self.rank != 0:
                return None
            buffers = None
            for entry in bucket:
                if entry["param"] is not None:
                    value = entry["param"].detach().float().cpu().numpy().copy()
                else:  # a buffer keeps its dtype, as in full_state_dict
                    buffers = self.engine.module.state_dict() if buffers is None else buffers
                    value = buffers[entry["names"][0]].detach().cpu().numpy().copy()
                for name in entry["names"]:
                    out[name] = value
        return out

    def save_hf(self, path: str, tokenizer_path: str | None = None) -> None:
        """Write a folder `AutoModelForCausalLM.from_pretrained(path)` loads; every rank must call it.

        Rank 0 writes into `path.tmp-<pid>` and renames it into place, so a crash never leaves a half
        written model at `path`; an existing `path` is replaced.
        """
        import torch.distributed as dist

        state = self.full_state_dict()
        if self.rank == 0:
            assert state is not None
            adapter_tmp = None
            if self.lora is not None:  # the merged model, and the adapter beside it in <path>/adapter
                from rlloop.learner.lora import merge_adapter, save_adapter

                model = self.lora_model(state)
                adapter_tmp = f"{os.path.abspath(path)}.adapter-{os.getpid()}"
                save_adapter(model, adapter_tmp)
                state = {k: v.detach().numpy() for k, v in merge_adapter(model).state_dict().items()}
            _write_hf_folder(self.hf_config, state, path, tokenizer_path)
            if adapter_tmp is not None:
                os.rename(adapter_tmp, os.path.join(path, "adapter"))
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer and ZeRO partitions of every rank) into `path`;
        every rank calls it. The caller makes it atomic (write into a temp dir, rename when all ranks
        are done)."""
        self.engine.save_checkpoint(path, tag="state", client_state={"version": self._version})
        if self.lora is not None and self.rank == 0:  # `python -m rlloop.export` rebuilds the adapter from it
            from rlloop.learner.lora import save_adapter_config

            save_adapter_config(self.engine, path)

    def load_checkpoint(self, path: str) -> int:
        """Restore weights, optimizer and version from `save_checkpoint`'s folder; returns the version."""
        from rlloop.checkpoint import weights_only_torch_load

        with weights_only_torch_load():
            load_path, client = self.engine.load_checkpoint(
                path, tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if load_path is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (tag 'state') to resume from")
        self._version = int(client.get("version", 0))
        return self._version


def optimizer_step(engine: Any) -> float:
    """`engine.step()` at the accumulation boundary; returns the global gradient 2-norm before clipping
    (nan if DeepSpeed keeps none). Without ZeRO in fp32 (stage 0) DeepSpeed clips the gradients itself
    but keeps no norm: it is taken here first, over the (already all-reduced) gradients."""
    own = None
    if not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        own = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    engine.step()
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = own
    return float(norm) if norm is not None else float("nan")


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Turn on HF gradient checkpointing (non-reentrant) in `model` or the HF model inside it (a value
    model's backbone); returns the number of checkpointed layers. A model without support is an error."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    hf = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")), None)
    if hf is None or not getattr(hf, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"learner.gradient_checkpointing=true: {type(model).__name__} does not support gradient checkpointing"
        )
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(
            f"learner.gradient_checkpointing=true: {type(hf).__name__} has no checkpointable layers"
        )
    return len(layers)


def checkpoint_in_eval_mode(model: torch.nn.Module) -> None:
    """HF checkpoints a layer only in training mode; the learner runs in eval mode (no dropout, so the
    update's logprobs equal the old ones at ratio 1). Mark just the checkpointed layers as training: their
    children (attention, MLP, any dropout) stay in eval mode, so the recomputation is exact."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.training = True


_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the (DeepSpeed-wrapped) HF model's forward takes `logits_to_keep`."""
    import inspect

    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # peft passes the keyword through to the HF model
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _write_hf_folder(
    hf_config: Any, state: dict[str, np.ndarray], path: str, tokenizer_path: str | None
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("meta"):  # no random init: every weight comes from `state`
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False, assign=True
    )
    if unexpected or [k for k in missing if not _is_tied(model, k)]:
        raise RuntimeError(
            f"save_hf({path}): state dict mismatch, missing {missing}, unexpected {unexpected}"
        )
    model.save_pretrained(tmp)
    if tokenizer_path is not None:
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(tmp)
    replace_dir(tmp, path)
    logger.info("saved policy to %s", path)


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished folder `tmp` to `path`, replacing an existing `path` only once `tmp` is whole."""
    old = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")
