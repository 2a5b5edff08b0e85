"""One rank of the critic (the value model of `algo.advantage=gae`, i.e. PPO): a DeepSpeed ZeRO engine
over `rlloop.rewards.prm.model.ValueHeadModel`.

The critic reuses the policy learner's DeepSpeed plumbing (sharding, micro-batches, checkpoints) and
differs in the model and the loss. Its initialisation (`algo.critic.init`, resolved by
`resolve_critic_init`) is where rlloop's reward models enter PPO:

  policy  the policy's backbone with a zero head (V = 0 everywhere, linear output), as verl/OpenRLHF;
  prm     a TD-trained PRM folder (reward.prm.path): its value head read at every token, V = sigmoid,
          i.e. the PRM's estimate of the probability that the solution ends correct -- TDRM's critic;
  qrm     a Q-RM folder (reward.qrm.path): backbone + token head (its weights copied, bias 0), linear
          output -- Q-RM's "critic initialisation" for PPO;
  <path>  any of these folders or a plain causal LM.

Layout follows `rlloop.types.Batch`: values[:, t] is V of the state before token t (the head read at
position t - 1, which has seen tokens < t), the alignment `rlloop.algos.advantages.gae` expects; column 0
and padding are 0. The critic is then trained online toward the GAE returns (the lambda-returns: TD(lambda)
at token level) with PPO's clipped value loss.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlloop.learner.policy import (
    PolicyLearner,
    micro_slices,
    optimizer_step,
    replace_dir,
)
from rlloop.rewards.prm.model import META_FILE

logger = logging.getLogger(__name__)

OUTPUTS = ("linear", "sigmoid")


@dataclass(frozen=True)
class CriticInit:
    """Where the critic's weights come from: `kind` is prm | qrm | lm, `output` linear | sigmoid."""

    path: str
    kind: str
    output: str


def resolve_critic_init(
    init: str,
    output: str,
    *,
    policy_path: str,
    prm_path: str | None,
    qrm_path: str | None,
    policy_tokenizer: Any = None,
) -> CriticInit:
    """algo.critic.init / .output -> CriticInit; errors name the key and what is missing. With
    `policy_tokenizer`, a folder other than the policy must have the same tokenizer: the critic reads the
    policy's token ids."""
    from rlloop.rewards.prm.model import has_value_head
    from rlloop.rewards.qrm.model import has_qrm_head

    if init == "policy":
        path = policy_path
    elif init == "prm":
        if not prm_path:
            raise ValueError(
                "algo.critic.init=prm needs a trained PRM folder in reward.prm.path (it is unset)"
            )
        path = prm_path
    elif init == "qrm":
        if not qrm_path:
            raise ValueError(
                "algo.critic.init=qrm needs a trained Q-RM folder in reward.qrm.path (it is unset)"
            )
        path = qrm_path
    else:
        path = init
        if not os.path.isdir(path):
            raise ValueError(
                f"algo.critic.init={init!r}: not policy | prm | qrm, and no such folder (a PRM, Q-RM or causal-LM folder)"
            )
    kind = "prm" if has_value_head(path) else "qrm" if has_qrm_head(path) else "lm"
    if init in ("prm", "qrm") and kind != init:
        raise ValueError(f"algo.critic.init={init}: {path} is not a {init.upper()} folder (found: {kind})")
    if output == "auto":
        # a PRM's values are sigmoid(head); a critic saved by rlloop says which output it was trained with
        output = (_saved_critic_output(path) or "sigmoid") if kind == "prm" else "linear"
    if output not in OUTPUTS:
        raise ValueError(f"algo.critic.output={output!r}: choose auto, linear or sigmoid")
    if policy_tokenizer is not None and path != policy_path:
        from transformers import AutoTokenizer

        from rlloop.rewards.qrm.service import check_same_tokenizer

        check_same_tokenizer(
            AutoTokenizer.from_pretrained(path),
            policy_tokenizer,
            f"critic init {path} (algo.critic.init={init})",
            "the policy's",
            "the critic reads the policy's token ids, so it must start from a model with the policy's "
            "tokenizer (a PRM with another tokenizer can score steps, not serve as the critic)",
        )
    return CriticInit(path, kind, output)


def _saved_critic_output(path: str) -> str | None:
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f).get("critic_output")


def load_value_model(init: CriticInit) -> torch.nn.Module:
    """A float32 ValueHeadModel from `init` (a PRM folder as saved, a Q-RM's head as the value head, or a
    plain causal LM's backbone with a zero head)."""
    from rlloop.rewards.prm.model import ValueHeadModel

    if init.kind == "prm":
        return ValueHeadModel.from_pretrained(init.path, dtype="float32")
    if init.kind == "qrm":
        from rlloop.rewards.qrm.model import TokenQModel

        qrm = TokenQModel.from_pretrained(init.path, dtype="float32")
        head = torch.nn.Linear(qrm.head.in_features, 1)
        with torch.no_grad():
            head.weight.copy_(qrm.head.weight)
            head.bias.zero_()
        return ValueHeadModel(qrm.backbone, head)
    return ValueHeadModel.from_backbone(init.path, dtype="float32")


class CriticLearner(PolicyLearner):
    """One DeepSpeed rank of the critic. learner_cfg: the policy learner's keys (zero_stage, lr, ...);
    algo_cfg: `rlloop.config.AlgoConfig` as a dict, whose `critic` entry holds `init_path`, `init_kind`,
    `output` (resolved by the controller) and `value_clip`."""

    PACKS = False  # the value model's forward takes padded rows: learner.batching=packed sorts them

    def _load_model(self, model_path: str) -> torch.nn.Module:
        critic = self.algo_cfg["critic"]
        self.output = critic["output"]
        if self.output not in OUTPUTS:
            raise ValueError(f"algo.critic.output={self.output!r}: choose linear or sigmoid")
        self.algo_cfg["use_ref"] = False  # no reference model for a critic
        init = CriticInit(critic.get("init_path") or model_path, critic.get("init_kind", "lm"), self.output)
        return load_value_model(init)

    def _with_adapter(self, model: torch.nn.Module) -> torch.nn.Module:
        """LoRA on the backbone only: the value head (new, or a PRM's) is trained whole."""
        from rlloop.learner.lora import apply_lora

        model.backbone = apply_lora(model.backbone, self.lora, causal_lm=False)
        return model

    def _empty_model(self) -> torch.nn.Module:
        from transformers import AutoModel

        from rlloop.rewards.prm.model import ValueHeadModel

        return ValueHeadModel(AutoModel.from_config(self.hf_config, dtype=torch.float32))

    def _values(self, model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """[B, T] values aligned with `ids` (entry t = V before token t; entry 0 = 0), float32."""
        out = model(input_ids=ids, attention_mask=att)
        if self.output == "sigmoid":
            out = torch.sigmoid(out)
        return torch.nn.functional.pad(out[:, :-1], (1, 0))

    def compute_values(self, batch: Any) -> np.ndarray:
        """float32 [B, T] values of `batch` (0 at column 0 and on padding); no grad, micro-batched."""
        out = np.zeros(batch.input_ids.shape, dtype=np.float32)
        with torch.no_grad():
            for rows in micro_slices(len(batch), self.micro_batch_size):
                ids, att, n = self._inputs(batch, rows)
                out[rows, :n] = (self._values(self.engine, ids, att) * att).cpu().numpy()
        return out

    def compute_logprobs(self, batch: Any, which: str = "policy") -> np.ndarray:  # noqa: ARG002
        raise TypeError("CriticLearner has no logprobs: call compute_values")

    def train_step(self, batch: Any, loss_scale: float = 1.0) -> dict[str, float]:
        """`algo_cfg["ppo_epochs"]` optimizer steps of the clipped value loss toward batch.returns, with
        batch.values (the critic's values when the rollouts were scored) as the clipping anchor.

        Micro-batch losses are weighted to add up to the per-rank batch loss (as the policy's), and
        `loss_scale` makes DeepSpeed's mean over ranks the global batch loss. Returns critic/vf_loss,
        vf_clipfrac, values, returns, explained_var, grad_norm, lr (averaged over epochs)."""
        from rlloop.algos.losses import compute_value_loss

        algo = self.algo_cfg
        if batch.values is None or batch.returns is None:
            raise ValueError("critic train_step needs batch.values (compute_values) and batch.returns (gae)")
        ppo_epochs = int(algo["ppo_epochs"])
        loss_agg = algo["loss_agg"]
        clip = float(algo["critic"]["value_clip"])
        mask, plan = self._micro_batch_plan(batch, loss_agg)
        sums: dict[str, float] = {}

        def add(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + value / ppo_epochs

        def arr(x: np.ndarray, rows: slice, n: int) -> torch.Tensor:
            return torch.tensor(x[rows, :n], dtype=torch.float32, device=self.device)

        for _ in range(ppo_epochs):
            for mb in self._micro_batches(batch, mask, plan):
                values = self._values(self.engine, mb.ids, mb.att)
                loss, m = compute_value_loss(
                    values,
                    arr(batch.values, mb.rows, mb.n),
                    arr(batch.returns, mb.rows, mb.n),
                    mb.mask,
                    clip=clip,
                    loss_agg=loss_agg,
                )
                self.engine.backward(loss * (mb.weight * loss_scale), scale_wrt_gas=False)
                add("critic/vf_loss", m["vf_loss"] * mb.weight)
                add("critic/vf_clipfrac", m["vf_clipfrac"] * mb.token_share)
            grad_norm = optimizer_step(self.engine)
            self._version += 1
            add("critic/grad_norm", grad_norm)
        sums["critic/lr"] = float(self.engine.get_lr()[0])
        return sums

    def save_pretrained(self, path: str) -> None:
        """The critic as a PRM folder (`ValueHeadModel.from_pretrained` loads it; with a sigmoid output it
        is a PRM again); every rank must call it. Rank 0 writes into a temp folder and renames it."""
        import torch.distributed as dist

        from rlloop.rewards.prm.model import ValueHeadModel

        state = self.full_state_dict()
        if self.rank == 0:
            assert state is not None
            if self.lora is not None:  # a PRM folder holds plain weights: the adapter merged in
                from rlloop.learner.lora import merge_adapter

                merged = merge_adapter(self.lora_model(state)).state_dict()
                state = {k: v.detach().numpy() for k, v in merged.items()}
            from transformers import AutoModel

            path = os.path.abspath(path)
            tmp = f"{path}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            with torch.device("meta"):
                model = ValueHeadModel(AutoModel.from_config(self.hf_config, dtype=torch.float32))
            model.load_state_dict(
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                strict=True,
                assign=True,
            )
            model.save_pretrained(tmp)
            meta_path = os.path.join(tmp, META_FILE)
            with open(meta_path) as f:
                meta = json.load(f)
            meta["critic_output"] = self.output  # algo.critic.output=auto reads it back on re-use
            if self.output == "linear":
                meta["value"] = "head(h) at every token, unbounded (a linear critic, not a probability)"
            with open(meta_path, "w") as f:
                json.dump(meta, f, indent=2)
            replace_dir(tmp, path)
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()
