"""Imports run one way: cli/api -> runner -> stages -> shared pieces; no module-level cycle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("pipeline", "stages", "export")
# modules that sit above the stages: nothing in stages/ or export/ may import them
UPPER = {"pipeline.cli", "pipeline.api", "pipeline.runner", "pipeline.report", "pipeline.plan"}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (at any depth of the file, lazy imports included)."""
    files = {_module(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` depends on the submodule, not on the package's __init__
                subs = [f"{node.module}.{a.name}" for a in node.names]
                names = [n for n in subs if n in files] or [node.module]
                names += [node.module] if len(names) < len(subs) else []
            for n in names:
                while n and n not in files:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    deps.add(n)
        graph[mod] = deps
    return graph


def test_lower_layers_never_import_upper_ones():
    graph = import_graph()
    bad = {m: sorted(d & UPPER) for m, d in graph.items() if m.startswith(("stages", "export")) and d & UPPER}
    assert not bad, f"stages/export import modules above them: {bad}"
    shared = {"pipeline.context", "pipeline.config", "pipeline.errors", "pipeline.rundir", "pipeline.models",
              "pipeline.data", "pipeline.registry", "pipeline.metrics", "pipeline._progress", "pipeline.distributed"}
    for mod in shared & set(graph):
        assert not any(d.startswith("stages") for d in graph[mod]), f"{mod} imports a stage"


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [m, d] if d in stack else [m, d])
                return True
            if state.get(d, 0) == 0 and visit(d, stack + [m]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m, 0) == 0 and visit(m, []):
            break
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_a_stage_is_named_once_by_its_registration_and_ordered():
    """The registry name is the stage's only name (it is its module's name), and PIPELINE orders exactly the
    registered stages."""
    import stages  # noqa: F401 - registers every stage
    from pipeline.context import PIPELINE, STAGES

    assert sorted(STAGES) == sorted(PIPELINE)
    for name in PIPELINE:
        cls = STAGES.get(name)
        assert cls.__module__ == f"stages.{name}", (name, cls.__module__)
        assert "name" not in vars(cls), f"{cls.__name__} names itself again; the registry names it"
