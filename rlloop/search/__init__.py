"""PRM-guided inference: Best-of-N with step-value aggregation, step beam search, voting baselines.

`python -m rlloop.search` runs them on a task (see `rlloop.search.cli`); the pieces are plain functions
and classes that take generate/score functions, so they run without Ray or models.
"""

from rlloop.search.aggregate import (
    AGGREGATIONS,
    aggregate,
    majority_vote,
    normalize_answer,
    register_aggregation,
    weighted_majority_vote,
)
from rlloop.search.beam import BeamResult, StepBeamSearch, StepOutput, StepRequest
from rlloop.search.bon import Candidate, evaluate_selection, sample_and_score, select

__all__ = [
    "AGGREGATIONS",
    "BeamResult",
    "Candidate",
    "StepBeamSearch",
    "StepOutput",
    "StepRequest",
    "aggregate",
    "evaluate_selection",
    "majority_vote",
    "normalize_answer",
    "register_aggregation",
    "sample_and_score",
    "select",
    "weighted_majority_vote",
]
