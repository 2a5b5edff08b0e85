"""rlloop's module import graph: no cycles, and `rewards/` never imports `learner/`.

The graph is read from the source, not by importing it: every module under rlloop/ is ast-parsed and
every `import rlloop...`, `from rlloop... import ...` and relative import counts, wherever it stands
(module top, inside a function, under `if TYPE_CHECKING`): a lazy import still ties two modules
together, it only hides the cycle until the day someone hoists it. `from pkg import name` is an edge to
the submodule `pkg.name` when that is a module, else to `pkg` (its __init__); a package's __init__ is a
node of its own, so `pkg/__init__.py` importing `pkg.sub` is no cycle unless `pkg.sub` imports `pkg`
back by name.

Rules:
- no cycle between modules (packages' __init__ included);
- `rlloop.rewards.*` never imports `rlloop.learner.*`. The learner sits above the reward side: the
  critic (`learner/critic.py`) may start from a PRM or Q-RM folder and so imports their model classes;
  what both sides need from a causal LM's logits (`token_logprobs`, `used_length`) lives below both, in
  `rlloop.algos.logprobs`.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "rlloop"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imported_names(node: ast.AST, package: str) -> list[str]:
    """Fully dotted names an import statement reaches for (`from a import b` gives `a.b`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: `from . import x` inside package p is `p.x`; each extra dot goes up one
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" for alias in node.names]


def build_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}, rlloop's own modules only."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # `rlloop.a.b.Name` -> the longest prefix that is a module
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _imported_names(node, package):
                if target.split(".")[0] != "rlloop":
                    continue
                found = resolve(target)
                if found and found != name:
                    graph[name].setdefault(found, node.lineno)
        graph.setdefault(name, {})
    return dict(graph)


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, {}))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return build_graph()


def _where(graph, a: str, b: str) -> str:
    path = _modules()[a][0].relative_to(PACKAGE_DIR.parent)
    return f"{a} -> {b} ({path}:{graph[a][b]})"


def test_the_graph_sees_relative_and_lazy_imports(graph):
    """Guards against a vacuous pass: imports of each kind the rules rely on are found."""
    assert "rlloop.algos.advantages" in graph["rlloop.algos"]  # `from .advantages import ...`
    assert "rlloop.rewards.prm.td_trainer" in graph["rlloop.prm_train"]  # inside train()
    assert "rlloop.rewards.verifiers.pool" in graph["rlloop.rewards.verifiers"]  # inside __getattr__
    assert "rlloop.algos.logprobs" in graph["rlloop.learner.policy"]


def test_no_import_cycles(graph):
    cycles = strongly_connected(graph)
    lines = []
    for component in cycles:
        members = set(component)
        lines += [f"cycle among {component}:"]
        lines += [f"  {_where(graph, a, b)}" for a in component for b in sorted(graph[a]) if b in members]
    assert not cycles, "\n".join(lines)


def test_cycle_finder_finds_a_cycle():
    toy = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert strongly_connected(toy) == [["a", "b", "c"]]


def test_rewards_never_import_the_learner(graph):
    upward = [
        _where(graph, a, b)
        for a in sorted(graph)
        if a.startswith("rlloop.rewards")
        for b in sorted(graph[a])
        if b.startswith("rlloop.learner")
    ]
    assert not upward, "rewards/ imports learner/ (move what both need below both):\n" + "\n".join(upward)
