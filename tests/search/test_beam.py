"""Step beam search with a scripted generator and a scripted PRM: which beams live, which leaves win."""

from __future__ import annotations

import pytest

from rlloop.search.beam import StepBeamSearch, StepOutput

# prefix text -> the next steps sampled for it, in order: (step text, finish reason)
TREE = {
    "": [("A\n\n", "step"), ("B\n\n", "step"), ("C\n\n", "step"), ("D \\boxed{1}", "stop")],
    "A\n\n": [("A1\n\n", "step"), ("A2 \\boxed{2}.\n\n", "step")],  # A2: finished by its answer
    "C\n\n": [("C1\n\n", "step"), ("C2", "stop")],
    "A\n\nA1\n\n": [("A1x\n\n", "step"), ("A1y", "length")],
    "C\n\nC1\n\n": [("C1x \\boxed{3}", "stop"), ("C1y\n\n", "step")],
}
# the PRM's value of a state, looked up by its last step
VALUE = {
    "A": 0.9, "B": 0.2, "C": 0.7, "D \\boxed{1}": 0.5,
    "A1": 0.3, "A2 \\boxed{2}.": 0.95, "C1": 0.8, "C2": 0.4,
    "A1x": 0.99, "A1y": 0.1, "C1x \\boxed{3}": 0.6, "C1y": 0.2,
}  # fmt: skip


class ScriptedSteps:
    """A step_fn that serves TREE in order (the root's copies share one list) and logs its calls."""

    def __init__(self, tree):
        self.tree = tree
        self.served: dict[str, int] = {}
        self.calls: list[list[str]] = []

    def __call__(self, requests, n):
        self.calls.append([r.response_text for r in requests])
        out = []
        for r in requests:
            options = self.tree[r.response_text]
            k = self.served.get(r.response_text, 0)
            self.served[r.response_text] = k + n
            outs = []
            for text, reason in options[k : k + n]:
                ids = list(r.response_ids) + [len(text)]  # any ids; one per step is enough here
                outs.append(StepOutput(text, ids, num_tokens=len(text), finish_reason=reason))
            out.append(outs)
        return out


def scripted_score(prompt_texts, response_texts, step_char_ends):
    out = []
    for text, ends in zip(response_texts, step_char_ends, strict=True):
        steps = [s.strip() for s in text.split("\n\n") if s.strip()]
        assert len(steps) == len(ends), (text, ends)
        out.append([VALUE[s] for s in steps])
    return out


def test_beam_keeps_top_k_by_last_value_and_returns_the_best_finished_leaf():
    steps = ScriptedSteps(TREE)
    search = StepBeamSearch(steps, scripted_score, top_k=2, num_branch=2, max_depth=3)
    (res,) = search.run([{"uid": "p", "prompt_text": "Q"}])
    # depth 1: the root counts as top_k = 2 beams; depth 2: A (0.9) and C (0.7) survive, B (0.2) is dropped
    # and D (answered) is a leaf; depth 3: A1 and C1 (the only unfinished ones) are expanded
    # (requests come best-first: C1 0.8 before A1 0.3)
    assert steps.calls == [["", ""], ["A\n\n", "C\n\n"], ["C\n\nC1\n\n", "A\n\nA1\n\n"]]
    # A1x has V 0.99 but never finished; among the leaves A2 (0.95) is best
    assert res.best.text == "A\n\nA2 \\boxed{2}.\n\n"
    assert res.value == pytest.approx(0.95)
    assert res.best.step_values == pytest.approx([0.9, 0.95])
    assert res.finished and res.depth == 3
    assert res.num_leaves == 5  # D, A2, C2, A1y, C1x
    assert res.num_tokens == sum(len(t) for opts in TREE.values() for t, _ in opts)


def test_top_k_one_is_greedy_step_search():
    steps = ScriptedSteps(TREE)
    search = StepBeamSearch(steps, scripted_score, top_k=1, num_branch=2, max_depth=3)
    (res,) = search.run([{"uid": "p", "prompt_text": "Q"}])
    # root -> A (0.9) beats B (0.2); A -> A1 (open) and A2 (answered leaf); A1 -> A1x (open), A1y (leaf)
    assert steps.calls == [[""], ["A\n\n"], ["A\n\nA1\n\n"]]
    assert res.best.text == "A\n\nA2 \\boxed{2}.\n\n" and res.num_leaves == 2


def test_stops_when_every_extension_finished():
    tree = {"": [("x \\boxed{1}", "stop"), ("y \\boxed{2}", "stop")]}
    value = {"x \\boxed{1}": 0.2, "y \\boxed{2}": 0.7}
    steps = ScriptedSteps(tree)

    def score(p, texts, ends):
        return [[value[t]] for t in texts]

    (res,) = StepBeamSearch(steps, score, top_k=1, num_branch=2, max_depth=5).run([{"uid": "p"}])
    assert len(steps.calls) == 1
    assert res.best.text == "y \\boxed{2}" and res.depth == 1 and res.finished


def test_max_depth_without_a_finished_leaf_returns_the_best_open_beam():
    tree = {"": [("a\n\n", "step"), ("b\n\n", "step")], "b\n\n": [("c\n\n", "step"), ("d\n\n", "step")]}
    value = {"a": 0.1, "b": 0.6, "c": 0.3, "d": 0.4}

    def score(p, texts, ends):
        return [[value[s.strip()] for s in t.split("\n\n") if s.strip()] for t in texts]

    steps = ScriptedSteps(tree)
    (res,) = StepBeamSearch(steps, score, top_k=1, num_branch=2, max_depth=2).run([{"uid": "p"}])
    assert len(steps.calls) == 2
    assert res.best.text == "b\n\nd\n\n" and not res.finished and res.best.finish_reason == "length"


def test_token_budget_finishes_a_beam():
    tree = {"": [("aaaa\n\n", "step")], "aaaa\n\n": [("bbbb\n\n", "step")]}

    def steps(requests, n):
        return [
            [
                StepOutput(t, list(r.response_ids) + [1] * len(t), len(t), reason)
                for t, reason in tree[r.response_text]
            ]
            for r in requests
        ]

    def score(p, texts, ends):
        return [[0.5] * len(e) for e in ends]

    (res,) = StepBeamSearch(steps, score, top_k=1, num_branch=1, max_depth=5, max_new_tokens=10).run(
        [{"uid": "p"}]
    )
    # 6 tokens after depth 1, 12 >= 10 after depth 2: finished by length, not expanded again
    assert res.depth == 2 and res.finished and res.best.finish_reason == "length"


def test_problems_are_searched_together_one_call_per_depth():
    tree2 = {
        "": [("P\n\n", "step"), ("Q \\boxed{5}", "stop"), ("R\n\n", "step"), ("S\n\n", "step")],
        "P\n\n": [("P1 \\boxed{6}", "stop"), ("P2\n\n", "step")],
        "S\n\n": [("S1 \\boxed{7}", "stop"), ("S2 \\boxed{8}", "stop")],
        "P\n\nP2\n\n": [("z", "stop"), ("w", "stop")],
        "S\n\nS1": [],
    }
    value2 = {"P": 0.8, "Q \\boxed{5}": 0.1, "R": 0.2, "S": 0.75, "P1 \\boxed{6}": 0.3, "P2": 0.4}
    value2 |= {"S1 \\boxed{7}": 0.85, "S2 \\boxed{8}": 0.2, "z": 0.1, "w": 0.1}

    class TwoTrees(ScriptedSteps):
        def __call__(self, requests, n):
            self.calls.append([(r.prompt["uid"], r.response_text) for r in requests])
            out = []
            for r in requests:
                tree = TREE if r.prompt["uid"] == "p1" else tree2
                key = (r.prompt["uid"], r.response_text)
                k = self.served.get(key, 0)
                self.served[key] = k + n
                out.append(
                    [StepOutput(t, [0], len(t), reason) for t, reason in tree[r.response_text][k : k + n]]
                )
            return out

    def score(prompt_texts, texts, ends):
        out = []
        for p, t in zip(prompt_texts, texts, strict=True):
            table = VALUE if p == "Q1" else value2
            out.append([table[s.strip()] for s in t.split("\n\n") if s.strip()])
        return out

    steps = TwoTrees({})
    res = StepBeamSearch(steps, score, top_k=2, num_branch=2, max_depth=3).run(
        [{"uid": "p1", "prompt_text": "Q1"}, {"uid": "p2", "prompt_text": "Q2"}]
    )
    assert len(steps.calls) == 3
    assert res[0].best.text == "A\n\nA2 \\boxed{2}.\n\n"
    assert res[1].best.text == "S\n\nS1 \\boxed{7}"
    assert res[1].depth == 3  # P2 is still open after depth 2


def test_bad_arguments_and_wrong_shapes_fail():
    with pytest.raises(ValueError, match="top_k"):
        StepBeamSearch(lambda r, n: [], scripted_score, top_k=0, num_branch=2, max_depth=2)
    search = StepBeamSearch(lambda r, n: [[]], scripted_score, top_k=1, num_branch=2, max_depth=2)
    with pytest.raises(RuntimeError, match="step_fn returned"):
        search.run([{"uid": "p"}])
