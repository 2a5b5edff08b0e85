"""Built-in tasks (procedurally generated data sets with verifiable answers)."""

from rlloop.tasks.arith import ArithProblem, generate_problems, make_splits, solution_text

__all__ = ["ArithProblem", "generate_problems", "make_splits", "solution_text"]
