"""Step-value aggregations and voting, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from rlloop.search.aggregate import (
    AGGREGATIONS,
    aggregate,
    argmax_first,
    majority_vote,
    normalize_answer,
    weighted_majority_vote,
)

VALUES = [0.9, 0.5, 0.8]


@pytest.mark.parametrize(
    "how, expected",
    [("last", 0.8), ("min", 0.5), ("mean", (0.9 + 0.5 + 0.8) / 3), ("prod", 0.9 * 0.5 * 0.8)],
)
def test_aggregations_by_hand(how, expected):
    assert aggregate(VALUES, how) == pytest.approx(expected)


def test_aggregations_order_solutions_differently():
    # a: steady then weak end; b: one weak step then strong end
    a, b = [0.7, 0.7, 0.6], [0.9, 0.3, 0.95]
    assert aggregate(b, "last") > aggregate(a, "last")
    assert aggregate(a, "min") > aggregate(b, "min")
    assert aggregate(a, "prod") > aggregate(b, "prod")  # 0.294 vs 0.2565


def test_no_steps_scores_minus_infinity_and_unknown_name_fails():
    for how in AGGREGATIONS:
        assert aggregate([], how) == -math.inf
    with pytest.raises(ValueError, match="median"):
        aggregate(VALUES, "median")


def test_argmax_first_breaks_ties_by_index():
    assert argmax_first([0.1, 0.7, 0.7, 0.2]) == 1
    assert argmax_first([-math.inf, -math.inf]) == 0
    with pytest.raises(ValueError):
        argmax_first([])


@pytest.mark.parametrize(
    "raw, norm",
    [
        (" 42 ", "42"),
        ("042", "42"),
        ("$7$", "7"),
        ("1,234", "1234"),
        ("3.50", "3.5"),
        ("2.0", "2"),
        ("x+1", "x+1"),
        (None, None),
        ("", None),
        ("7.", "7"),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_majority_vote_counts_and_ignores_missing_answers():
    assert majority_vote(["3", None, "5", "5", None, None]) == 2  # first "5"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_vote_tie_goes_to_first_seen_answer():
    assert majority_vote(["5", "3", "3", "5"]) == 0
    assert majority_vote(["3", "5", "5", "3"]) == 0
    assert majority_vote([None, "9", "4"]) == 1


def test_weighted_majority_vote_by_hand():
    answers = ["3", "5", "5", "3", "8"]
    # totals: "3": 0.9 + 0.2 = 1.1, "5": 0.4 + 0.5 = 0.9, "8": 1.0
    assert weighted_majority_vote(answers, [0.9, 0.4, 0.5, 0.2, 1.0]) == 0
    # raise "8" past "3": 1.2 > 1.1
    assert weighted_majority_vote(answers, [0.9, 0.4, 0.5, 0.2, 1.2]) == 4
    # weighting can overturn plain majority: "5" twice with tiny weights loses to one confident "3"
    assert majority_vote(["5", "5", "3"]) == 0
    assert weighted_majority_vote(["5", "5", "3"], [0.1, 0.1, 0.9]) == 2


def test_weighted_majority_vote_ties_and_bad_weights():
    assert weighted_majority_vote(["5", "3"], [0.5, 0.5]) == 0
    assert weighted_majority_vote(["5", "3", "3"], [0.5, 0.25, 0.25]) == 0  # exact tie: first seen
    # -inf (no steps) counts 0; None answers never win
    assert weighted_majority_vote(["5", "3", None], [-math.inf, 0.1, 9.0]) == 1
    with pytest.raises(ValueError, match="2 answers but 1 weights"):
        weighted_majority_vote(["5", "3"], [1.0])
