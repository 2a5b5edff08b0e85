"""Built-in tasks (procedurally generated data sets with verifiable answers).

`BUILTIN` maps `task.name` to its module; each has `make_splits(task_cfg) -> (train, test)` Samples,
`knobs(task_cfg)` (what changes its problems) and `sft_corpus(task_cfg, exclude)` (worked solutions
for pretraining the task's built-in model).
"""

from rlloop.tasks import arith, chain
from rlloop.tasks.arith import ArithProblem, generate_problems, make_splits, solution_text

BUILTIN = {"arith": arith, "chain": chain}

__all__ = ["BUILTIN", "ArithProblem", "generate_problems", "make_splits", "solution_text"]
