"""Preference losses of online (iterative) DPO and TGDPO, and the pairs they train on. Pure torch.

`algo.policy_loss=dpo|tgdpo` (presets `algo=dpo`, `algo=tgdpo`) swaps the policy-gradient loss for a
Bradley-Terry loss over chosen/rejected pairs. Online, the pairs come from each prompt's verified group
(`preference_pairs`: a best-scored answer against a worst-scored one; correct vs incorrect for a 0/1
verifier); offline, from a pairs file. Both losses see each pair as two [T] rows aligned like
`rlloop.types.Batch` (entry t scores token t), their sequence log-ratios summed over the response mask.

Notation (DPO, arXiv 2305.18290; TGDPO, arXiv 2506.14574):
  l_t   = log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)      per-token log-ratio
  r^_t  = the token-level reward guidance (TGDPO's practical choice: the DPO-induced reward
          beta_g * (log pi^(y_t) - log pi_ref(y_t)), i.e. rlloop's implicit PRM; or Q-RM's token reward,
          or the TD-PRM's step reward spread over the step's tokens, `spread_step_rewards`)
  w, l  = the chosen ("winning") and rejected ("losing") response of a pair
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rlloop.registry import registrar

from .checks import check_finite, check_mask, check_tensor

# (logratio_w, logratio_l, mask_w, mask_l, guidance_w, guidance_l, *, beta, alpha) ->
# (loss per pair [P], h_w [P], h_l [P]); the loss is -log sigmoid(h_w - h_l)
PreferenceLossFn = Callable[..., tuple[Tensor, Tensor, Tensor]]
PREFERENCE_LOSSES: dict[str, PreferenceLossFn] = {}
register_preference_loss = registrar(PREFERENCE_LOSSES, "preference loss")

PAIR_RULES = ("random", "first", "all")  # algo.dpo.pair_rule
GUIDANCE_SOURCES = ("implicit_prm", "qrm", "prm")  # algo.dpo.guidance (tgdpo)


def is_preference_loss(name: str) -> bool:
    """Whether algo.policy_loss names a pairwise loss (DPO family) rather than a policy-gradient one."""
    return name in PREFERENCE_LOSSES


def guidance_source(algo: Any) -> str | None:
    """The token-reward source TGDPO reads (algo.dpo.guidance) when algo.policy_loss=tgdpo, else None."""
    return algo.dpo.guidance if algo.policy_loss == "tgdpo" else None


@register_preference_loss("dpo")
def dpo_loss(
    logratio_w: Tensor,
    logratio_l: Tensor,
    mask_w: Tensor,
    mask_l: Tensor,
    guidance_w: Tensor | None = None,
    guidance_l: Tensor | None = None,
    *,
    beta: float,
    alpha: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, Eq. 7): L = -log sigma(beta sum_t l^w_t - beta sum_t l^l_t).

    logratio_*: [P, T] per-token log pi_theta - log pi_ref; mask_*: [P, T] response tokens. The guidance
    arguments are accepted (same signature as tgdpo_loss) and ignored. Returns (loss [P], h_w, h_l) with
    h = beta * sum_t l_t, the implicit rewards of the two responses.
    """
    h_w = beta * (logratio_w * mask_w).sum(-1)
    h_l = beta * (logratio_l * mask_l).sum(-1)
    return -torch.nn.functional.logsigmoid(h_w - h_l), h_w, h_l


@register_preference_loss("tgdpo")
def tgdpo_loss(
    logratio_w: Tensor,
    logratio_l: Tensor,
    mask_w: Tensor,
    mask_l: Tensor,
    guidance_w: Tensor | None = None,
    guidance_l: Tensor | None = None,
    *,
    beta: float,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """TGDPO (Zhu et al., ICML 2025, arXiv 2506.14574): DPO whose constant beta becomes, per token, beta
    times a function f of that token's reward guidance r^_t.

    Paper, section 4: sequence-level PPO is split into token-level PPO problems whose KL strength at
    token t is beta * f(r^_t); their closed-form optimal policy gives the token reward
    r_t = beta f(r^_t) log(pi*(y_t)/pi_ref(y_t)) (+ a partition term), and the Bradley-Terry model over
    sum_t r_t, with the partition terms eliminated (the paper's theorem), gives the loss
        L = -log sigma( sum_t beta f_w(r^w_t) l^w_t  -  sum_t beta f_l(r^l_t) l^l_t ).
    Practical guidance (paper section 4, "practical reward guidance"): r^ is the token reward induced
    by a DPO model, with f_w(r^) = 1 + alpha r^ on the chosen response and f_l(r^) = 1 - alpha r^ on
    the rejected one (alpha > 0; the release uses alpha = 0.5, beta = 0.1): a chosen token the guidance
    likes, or a rejected token it dislikes, may move further from the reference.
    Checked against the authors' release (dvlab-research/TGDPO, src/llamafactory/train/tgdpo/trainer.py,
    `loss_type == "sigmoid"`): -logsigmoid((beta (1 + alpha beta lr^w) l^w).sum(-1) - (beta (1 - alpha
    beta lr^l) l^l).sum(-1)), with lr^ the guidance model's log-ratio, i.e. r^ = beta * lr^ -- the
    same formula, with r^ passed in here already in reward units (the implicit PRM's
    reward.implicit_prm.beta * log-ratio).
    Differences from the release: the guidance may come from other token-reward sources (Q-RM, TD-PRM
    steps), whose scale alpha then has to suit; the release does not clip f at 0 and neither does this
    (a token with alpha r^ beyond +-1 gets a negative weight: `guidance_stats` reports how often); the
    guidance model's reference is the implicit PRM's own pi_ref, which is the policy's reference when
    reward.implicit_prm.path / ref_path are left empty (the release uses the policy's reference).
    Equation numbers are not cited: only the paper's abstract and secondary notes could be read here, so
    each line below names the part of the method it is, and the formula as a whole was checked against
    the release (tests/algos/test_dpo.py::test_tgdpo_matches_the_released_formula).
    With r^ = 0 (or alpha = 0) every f is exactly 1 and the loss is DPO's, bit for bit.

    guidance_*: [P, T] r^ on the response tokens (None = 0). Returns (loss [P], h_w, h_l), h the two
    guided sums inside the sigmoid.
    """
    # f_w = 1 + alpha r^w and f_l = 1 - alpha r^l: the practical guidance functions
    f_w = 1.0 if guidance_w is None else 1.0 + alpha * guidance_w
    f_l = 1.0 if guidance_l is None else 1.0 - alpha * guidance_l
    # h = sum_t beta f(r^_t) l_t over each response's tokens
    h_w = beta * (f_w * logratio_w * mask_w).sum(-1)
    h_l = beta * (f_l * logratio_l * mask_l).sum(-1)
    # the Bradley-Terry negative log-likelihood of "w preferred to l"
    return -torch.nn.functional.logsigmoid(h_w - h_l), h_w, h_l


def preference_loss(
    name: str,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    guidance: Tensor | None = None,
    *,
    beta: float,
    alpha: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss `name` of pairs laid out as rows (chosen_0, rejected_0, chosen_1, rejected_1, ...).

    logprobs / ref_logprobs / mask / guidance: [2P, T]. A pair whose chosen or rejected row has no
    response token (a padding pair) is left out. Returns (losses of the valid pairs [P'], per-pair values
    of those pairs: margin = h_w - h_l (the logit inside the sigmoid), chosen_reward / rejected_reward =
    beta * sum_t l_t (unguided, as TRL's rewards/chosen)).
    """
    if name not in PREFERENCE_LOSSES:
        raise ValueError(
            f"unknown preference loss algo.policy_loss={name!r}; known: {sorted(PREFERENCE_LOSSES)}"
        )
    logprobs = check_tensor("logprobs", logprobs, ndim=2, float_dtype=True)
    mask = check_mask("mask", mask, logprobs.shape, like="logprobs").to(logprobs.dtype)
    if logprobs.shape[0] % 2:
        raise ValueError(
            f"preference_loss: rows must come in (chosen, rejected) pairs, got {logprobs.shape[0]} rows"
        )
    check_finite("ref_logprobs", ref_logprobs)
    logratio = (logprobs - ref_logprobs.detach()) * mask
    if guidance is not None:
        check_finite("guidance", guidance)
        guidance = guidance.detach() * mask
    valid = (mask[0::2].sum(-1) > 0) & (mask[1::2].sum(-1) > 0)
    g_w, g_l = (None, None) if guidance is None else (guidance[0::2][valid], guidance[1::2][valid])
    lr_w, lr_l, m_w, m_l = logratio[0::2][valid], logratio[1::2][valid], mask[0::2][valid], mask[1::2][valid]
    losses, h_w, h_l = PREFERENCE_LOSSES[name](lr_w, lr_l, m_w, m_l, g_w, g_l, beta=beta, alpha=alpha)
    with torch.no_grad():
        values = {
            "margin": (h_w - h_l).detach(),
            "chosen_reward": beta * (lr_w * m_w).sum(-1).detach(),
            "rejected_reward": beta * (lr_l * m_l).sum(-1).detach(),
        }
    return losses, values


def guidance_stats(guidance: Tensor, mask: Tensor, alpha: float) -> dict[str, float]:
    """TGDPO's guidance over the pair rows (chosen even, rejected odd) [2P, T]: its mean on chosen and
    rejected tokens, and the share of tokens whose weight f (1 + alpha r^ / 1 - alpha r^) is <= 0."""
    m = mask.to(guidance.dtype)
    f = torch.ones_like(guidance)
    f[0::2] = 1.0 + alpha * guidance[0::2]
    f[1::2] = 1.0 - alpha * guidance[1::2]

    def mean(x: Tensor, w: Tensor) -> float:
        return float((x * w).sum() / w.sum()) if w.sum() > 0 else float("nan")

    return {
        "tgdpo/guidance_chosen": mean(guidance[0::2], m[0::2]),
        "tgdpo/guidance_rejected": mean(guidance[1::2], m[1::2]),
        "tgdpo/nonpositive_weight_frac": mean((f <= 0).to(m.dtype), m),
    }


def preference_pairs(
    scores: Tensor,
    group_ids: Tensor,
    *,
    rule: str = "random",
    max_pairs_per_group: int = 1,
    min_gap: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Chosen and rejected row indices [P] from each group's verified scores [B].

    In a group, the candidates for `chosen` are the rows with the group's highest score, for `rejected`
    the rows with its lowest; a group pairs only if highest - lowest > min_gap (with a 0/1 verifier:
    correct against incorrect; a group of all-right or all-wrong answers gives no pair and is skipped).
    When several qualify, `rule`:
      random  up to max_pairs_per_group pairs of distinct rows, each side drawn at random (`generator`)
      first   the same, taking the rows in batch order (deterministic)
      all     every (chosen, rejected) combination (max_pairs_per_group does not apply)
    Pairs come out group by group, in order of first appearance.
    """
    if rule not in PAIR_RULES:
        raise ValueError(f"algo.dpo.pair_rule={rule!r}: use one of {list(PAIR_RULES)}")
    if max_pairs_per_group < 1:
        raise ValueError(f"algo.dpo.max_pairs_per_group must be >= 1, got {max_pairs_per_group}")
    scores = check_tensor("scores", scores, ndim=1, float_dtype=True)
    check_finite("scores", scores)
    if group_ids.shape != scores.shape:
        raise ValueError(f"group_ids {tuple(group_ids.shape)} must match scores {tuple(scores.shape)}")
    chosen: list[int] = []
    rejected: list[int] = []
    for g in dict.fromkeys(group_ids.tolist()):
        rows = (group_ids == g).nonzero().flatten()
        s = scores[rows]
        hi, lo = s.max(), s.min()
        if not float(hi - lo) > min_gap:
            continue
        top, bottom = rows[s == hi], rows[s == lo]
        if rule == "all":
            for c in top.tolist():
                chosen += [c] * len(bottom)
                rejected += bottom.tolist()
            continue
        if rule == "random":
            top = top[torch.randperm(len(top), generator=generator)]
            bottom = bottom[torch.randperm(len(bottom), generator=generator)]
        k = min(len(top), len(bottom), max_pairs_per_group)
        chosen += top[:k].tolist()
        rejected += bottom[:k].tolist()
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def interleave_pairs(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Row order (chosen_0, rejected_0, chosen_1, rejected_1, ...) [2P] of the pair batch."""
    return torch.stack([chosen, rejected], dim=1).flatten()


def spread_step_rewards(
    step_values: Tensor,
    step_mask: Tensor,
    step_positions: Tensor,
    prompt_value: Tensor,
    response_mask: Tensor,
) -> Tensor:
    """The TD-PRM's step rewards as token guidance [B, T]: every token of step k gets
    r^_k = V_k - V_{k-1} (V_{-1} = the prompt's value), the step's change in the PRM's success
    probability (the potential-based shaping reward of reward.step_process=shaping at gamma = 1): a step
    that makes success likelier is a good step, one that makes it less likely a bad one, and each of its
    tokens carries that sign. Tokens after the last step end get 0.

    step_values / step_mask: [B, K]; step_positions: [B, K] the batch column of each step's last token
    (as FusionInputs.step_positions); prompt_value: [B]; response_mask: [B, T].
    """
    B, T = response_mask.shape
    prev = torch.cat([prompt_value[:, None], step_values[:, :-1]], dim=1)
    delta = (step_values - prev) * step_mask
    out = torch.zeros(B, T, dtype=step_values.dtype)
    first = response_mask.float().argmax(-1)  # first response column of each row
    for b in range(B):
        start = int(first[b])
        for k in range(int(step_mask[b].sum())):
            end = int(step_positions[b, k])
            out[b, start : end + 1] = delta[b, k]
            start = end + 1
    return out * response_mask.to(out.dtype)
