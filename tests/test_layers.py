"""The package layout holds: no import circles among onecard's modules, and the pure layers stand only on data.

Imports are read with ast from every file under src/onecard, at module level and inside functions alike (a lazy
import is still a dependency), so a circle or a layer breach fails here before anyone runs into it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PURE = ("plan", "lint")                                  # pure Python: no torch, answers in < 1 s
NOT_UNDER_PURE = ("train", "patch", "bench", "kernels")  # what plan/ and lint/ may never import


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the onecard modules it imports (``from onecard.x import y`` counts onecard.x.y when that is a
    module, else onecard.x)."""
    files = {_module_name(p): p for p in (SRC / "onecard").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("onecard")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("onecard"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in files else node.module)
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against this package
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    deps.add(sub if sub in files else mod)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("layer", PURE)
def test_pure_layers_import_nothing_from_the_torch_layers(layer):
    bad = {m: sorted(d for d in deps if d.split(".")[1] in NOT_UNDER_PURE)
           for m, deps in import_graph().items() if m.split(".")[1:2] == [layer]}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_checks_see_a_circle_and_a_breach():
    """The two checks above on a graph that has both, so they cannot pass by reading nothing."""
    graph = import_graph()
    assert graph["onecard.plan.memory"] and "onecard.plan.inputs" in graph["onecard.plan.memory"]
    looped = {**graph, "onecard.plan.inputs": graph["onecard.plan.inputs"] | {"onecard.plan.memory"}}
    assert any({"onecard.plan.inputs", "onecard.plan.memory"} <= set(c) for c in cycles(looped))
    assert cycles(graph) == []


def test_planner_answers_without_torch_in_under_a_second():
    import subprocess
    import sys

    code = ("import sys, time; t = time.perf_counter(); from onecard.recipe import load_recipe; "
            "from onecard.commands.plan import build_report; "
            "build_report(load_recipe(sys.argv[1])); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(time.perf_counter() - t)")
    recipe = SRC.parent / "examples" / "llama3-70b-qlora.yaml"
    best = min(float(subprocess.run([sys.executable, "-c", code, str(recipe)], check=True, capture_output=True,
                                    text=True).stdout) for _ in range(3))
    assert best < 1.0, f"planning took {best:.2f} s"
