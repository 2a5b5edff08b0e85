"""Dynamic sampling against a loop reference; the algos package imports no Ray, DeepSpeed or I/O."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlloop.algos
from rlloop.algos import filter_tied_groups, overlong_penalty, select_groups

from . import reference as ref

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 0.5, 1.0])), min_size=1, max_size=12),
    st.booleans(),
)
def test_filter_tied_groups_matches_reference(rows, keep_singletons):
    gids, rewards = [g for g, _ in rows], [r for _, r in rows]
    keep, frac = filter_tied_groups(
        torch.tensor(rewards), torch.tensor(gids), keep_singletons=keep_singletons
    )
    groups = ref.groups_of(gids)
    kept_groups = {
        g for g, m in groups.items() if len({rewards[i] for i in m}) > 1 or (keep_singletons and len(m) == 1)
    }
    assert keep.tolist() == [g in kept_groups for g in gids]
    assert frac == pytest.approx(1 - len(kept_groups) / len(groups))


def test_filter_tied_groups_hand_worked():
    keep, frac = filter_tied_groups(torch.tensor([1.0, 1, 0, 1, 0.5, 1]), torch.tensor([0, 0, 1, 1, 2, 3]))
    assert keep.tolist() == [False, False, True, True, True, True] and frac == 0.25
    keep, frac = filter_tied_groups(
        torch.tensor([1.0, 1, 0, 1, 0.5]), torch.tensor([0, 0, 1, 1, 2]), keep_singletons=False
    )
    assert keep.tolist() == [False, False, True, True, False] and frac == pytest.approx(2 / 3)
    keep, _ = filter_tied_groups(torch.tensor([1.0, 1.05]), torch.tensor([0, 0]), atol=0.1)
    assert not keep.any()


def test_select_groups_trims_a_refilled_batch():
    keep = torch.tensor([True, True, False, False, True, True, True, True])
    gids = torch.tensor([3, 3, 1, 1, 9, 9, 4, 4])
    assert select_groups(keep, gids, 2).tolist() == [0, 1, 4, 5]
    assert select_groups(keep, gids, 10).tolist() == [0, 1, 4, 5, 6, 7]
    assert select_groups(keep, gids, 0).tolist() == []


@SETTINGS
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(1, 10), st.floats(0, 2))
def test_overlong_penalty_matches_reference(lengths, buffer, penalty):
    max_len = 30
    out = overlong_penalty(torch.tensor(lengths), max_len, buffer, penalty)
    for n, got in zip(lengths, out.tolist(), strict=True):
        if n <= max_len - buffer:
            expected = 0.0
        elif n <= max_len:
            expected = (max_len - buffer - n) / buffer * penalty
        else:
            expected = -penalty
        assert got == pytest.approx(expected, abs=1e-6)


def test_overlong_penalty_hand_worked():
    out = overlong_penalty(torch.tensor([6, 8, 10, 12]), max_len=10, buffer=4, penalty=1.0)
    assert out.tolist() == [0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(torch.tensor([100]), 10, 0, 1.0).tolist() == [0.0]  # buffer 0: disabled


def test_sampling_bad_input_is_named():
    with pytest.raises(ValueError, match=r"rewards contains 1 non-finite value.*nan"):
        filter_tied_groups(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"group_ids has shape \(3,\), expected \(2,\)"):
        filter_tied_groups(torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"buffer must be in \[0, 10\], got 11"):
        overlong_penalty(torch.tensor([5]), 10, 11, 1.0)


# ------------------------------------------------------------ purity of the package
ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "functools",
    "inspect",
    "math",
    "numbers",
    "typing",
    "torch",
}
# rlloop.errors (the exception classes the CLI turns into one clear line) and rlloop.registry (the registries'
# `@register(name)` decorator) are the rlloop modules algos may import, only because they import nothing
# themselves (checked below)
ALLOWED_MODULES = {"rlloop.errors", "rlloop.registry"}
FORBIDDEN_CALLS = {"open", "print", "FileHandler", "save", "load", "exec", "eval", "__import__"}


def _modules():
    return sorted(pathlib.Path(rlloop.algos.__file__).parent.glob("*.py"))


def test_every_algos_module_imports_only_torch_and_the_standard_math():
    modules = _modules()
    assert len(modules) >= 7
    for path in modules:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:  # relative: another module of rlloop.algos
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root in ALLOWED or name in ALLOWED_MODULES, (
                    f"{path.name}:{node.lineno} imports {name!r} (algos must stay pure torch)"
                )


def test_the_allowed_rlloop_modules_import_nothing():
    for name in ALLOWED_MODULES:
        path = pathlib.Path(rlloop.__file__).parent / (name.split(".", 1)[1].replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not imports, f"{name} must import nothing to stay importable from algos/, has line {imports[0].lineno}"


def test_no_algos_module_does_io():
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                assert name not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {name}()"


def test_importing_algos_loads_no_ray_or_deepspeed():
    import subprocess
    import sys

    code = "import sys, rlloop.algos; bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; print(bad)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
