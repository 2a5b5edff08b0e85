"""The learner's update under a preference loss (algo.policy_loss=dpo|tgdpo, rlloop.algos.dpo).

A plain function over one `PolicyLearner` rank (`LearnerActor.train_pairs` runs it), so the DPO family
uses the policy learner's model, DeepSpeed engine, optimizer and version counter -- and therefore the
same checkpoints and weight sync -- without a loop of its own there. The rank's batch holds whole pairs,
rows (chosen_0, rejected_0, chosen_1, ...); `batch.ref_logprobs` are the frozen reference's, and for
tgdpo `batch.token_rewards` holds the guidance r^ on the response tokens. Micro-batches are cut at pair
boundaries, padded rows (response mask 0, `LearnerGroup` pads whole pairs) are no pair.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlloop.algos.dpo import guidance_stats, preference_loss
from rlloop.algos.logprobs import sampled_logprobs
from rlloop.learner.policy import first_logit_position, micro_slices, optimizer_step


def pair_counts(response_mask: np.ndarray, shards: list[slice]) -> list[int]:
    """Pairs with a response token on both sides in each shard of pair rows [B, T] (B even)."""
    has = np.asarray(response_mask).sum(-1) > 0
    return [int((has[s][0::2] & has[s][1::2]).sum()) for s in shards]


def preference_train_step(learner: Any, batch: Any, loss_scale: float = 1.0) -> dict[str, float]:
    """algo.ppo_epochs optimizer steps of the mean preference loss over this rank's pairs.

    `loss_scale` multiplies the rank's loss (LearnerGroup sets it to world_size x this rank's share of
    the pairs, so that DeepSpeed's mean over ranks is the mean over every pair of the step). Returns
    dpo/loss, dpo/margin (h_w - h_l, the logit inside the sigmoid), dpo/accuracy (margin > 0),
    dpo/chosen_reward and dpo/rejected_reward (beta x the summed log-ratio), each a mean over this
    rank's pairs and epochs, actor/grad_norm, actor/lr and, for tgdpo, `guidance_stats`.
    """
    algo = learner.algo_cfg
    name, d = algo["policy_loss"], algo["dpo"]
    beta, alpha = float(d["beta"]), float(d["alpha"])
    if batch.ref_logprobs is None:
        raise ValueError(
            f"algo.policy_loss={name}: the batch has no reference logprobs (compute_logprobs 'ref')"
        )
    if len(batch) % 2:
        raise ValueError(f"algo.policy_loss={name}: {len(batch)} rows are not whole (chosen, rejected) pairs")
    guided = name == "tgdpo" and batch.token_rewards is not None
    mask = torch.tensor(batch.response_mask, dtype=torch.float32)
    num_pairs = pair_counts(batch.response_mask, [slice(None)])[0]
    # whole pairs in every micro-batch: an even number of rows (>= 2)
    plan = micro_slices(len(batch), max(2, learner.micro_batch_size - learner.micro_batch_size % 2))
    epochs = int(algo["ppo_epochs"])
    engine = learner.engine

    def arr(x: np.ndarray, rows: slice, n: int) -> torch.Tensor:
        return torch.tensor(x[rows, :n], dtype=torch.float32, device=learner.device)

    sums: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value / epochs

    lr = float(engine.get_lr()[0])
    for _ in range(epochs):
        for i, rows in enumerate(plan):
            engine.set_gradient_accumulation_boundary(i == len(plan) - 1)
            ids, att, n = learner._inputs(batch, rows)
            start = first_logit_position(batch.response_mask[rows, :n])
            logits, start = learner._forward(engine, ids, att, start)
            logprobs, _ = sampled_logprobs(logits, ids, learner.temperature, start, with_entropy=False)
            losses, values = preference_loss(
                name, logprobs, arr(batch.ref_logprobs, rows, n), mask[rows, :n].to(learner.device),
                arr(batch.token_rewards, rows, n) if guided else None, beta=beta, alpha=alpha,
            )  # fmt: skip
            # the rank's loss is the mean over its pairs; `0 * logprobs` keeps a graph (and the same
            # backward on every ZeRO rank) in a micro-batch of padding pairs only
            loss = losses.sum() / max(num_pairs, 1) + 0.0 * logprobs.sum()
            engine.backward(loss * loss_scale, scale_wrt_gas=False)
            share = 1.0 / max(num_pairs, 1)
            add("dpo/loss", float(losses.detach().sum()) * share)
            add("dpo/margin", float(values["margin"].sum()) * share)
            add("dpo/accuracy", float((values["margin"] > 0).sum()) * share)
            add("dpo/chosen_reward", float(values["chosen_reward"].sum()) * share)
            add("dpo/rejected_reward", float(values["rejected_reward"].sum()) * share)
        add("actor/grad_norm", optimizer_step(engine))
        learner._version += 1
    sums["actor/lr"] = lr
    if guided:
        sums.update(guidance_stats(torch.as_tensor(np.array(batch.token_rewards, copy=True)), mask, alpha))
    return sums
