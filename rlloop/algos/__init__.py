"""rlloop's algorithm core: pure torch functions (tensors in, tensors out; no Ray, DeepSpeed or I/O).

Registries pick the method by config name: `ADVANTAGES` (algo.advantage), `POLICY_LOSSES`
(algo.policy_loss), `KL_ESTIMATORS` (algo.kl_estimator), `FUSIONS` (reward.fusion, in `fusion`);
dynamic sampling lives in `sampling`.
"""

from .advantages import ADVANTAGES, compute_advantages, register_advantage
from .checks import make_group_ids
from .fusion import (
    FUSIONS,
    first_error_fusion,
    fusion_stats,
    min_fusion,
    outcome_fusion,
    place_on_last_token,
    place_response_rewards,
    prime_advantages,
    register_fusion,
    step_fusion,
    token_fusion,
    value_before_answer_step,
)
from .kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_in_reward,
    kl_loss,
    kl_penalty,
    make_kl_controller,
    register_kl,
)
from .losses import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    aggregate_loss,
    compute_policy_loss,
    compute_value_loss,
    entropy_from_logits,
    logprobs_from_logits,
    register_policy_loss,
)
from .sampling import filter_tied_groups, overlong_penalty, select_groups

__all__ = [
    "ADVANTAGES",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "apply_kl_in_reward",
    "compute_advantages",
    "compute_policy_loss",
    "compute_value_loss",
    "entropy_from_logits",
    "filter_tied_groups",
    "FUSIONS",
    "first_error_fusion",
    "fusion_stats",
    "kl_loss",
    "kl_penalty",
    "logprobs_from_logits",
    "make_group_ids",
    "make_kl_controller",
    "outcome_fusion",
    "prime_advantages",
    "register_fusion",
    "overlong_penalty",
    "place_on_last_token",
    "place_response_rewards",
    "register_advantage",
    "register_kl",
    "register_policy_loss",
    "select_groups",
    "min_fusion",
    "step_fusion",
    "token_fusion",
    "value_before_answer_step",
]
