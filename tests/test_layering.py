"""Imports run one way, between packages and between modules, lazy imports included.

The packages are layers: core (what every stage builds on: errors, config sections, context, run directory,
data, models) <- export (converters and runtimes) <- stages <- pipeline (the composed schema, runner, CLI, API,
report). A package imports only itself and the layers below it, at module level or inside a function; the only
exception is a type named under `if TYPE_CHECKING:` (never executed), and the only such type is the composed
config. Module-level cycles are checked with every import counted, lazy ones and the implicit import of a
module's parent packages included, so no import inside a function can exist to dodge a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

LAYERS = ("core", "export", "stages", "pipeline")  # each may import only itself and those before it
TYPE_ONLY = {"pipeline.config"}  # what a lower layer may name under TYPE_CHECKING: the composed schema's type


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, Path]:
    return {_module(p): p for pkg in LAYERS for p in (REPO / pkg).rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for b in node.body for n in ast.walk(b) if isinstance(n, ast.Import | ast.ImportFrom)}
    return out


def imports(with_type_only: bool = False) -> dict[str, dict[str, str]]:
    """module -> {project module it imports: "top" (module level), "function" or "type" (under TYPE_CHECKING)}."""
    files = _files()
    out: dict[str, dict[str, str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        typed = _type_checking_nodes(tree)
        top = {id(n) for n in tree.body}
        deps: dict[str, str] = {}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` depends on the submodule, not on the package's __init__
                subs = [f"{node.module}.{a.name}" for a in node.names]
                names = [n for n in subs if n in files] or [node.module]
                names += [node.module] if len(names) < len(subs) else []
            kind = "type" if id(node) in typed else "top" if id(node) in top else "function"
            if kind == "type" and not with_type_only:
                continue
            for n in names:
                while n and n not in files:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    deps.setdefault(n, kind)
        out[mod] = deps
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports when it runs (lazy imports included), with the parent packages an
    import initialises first (`import core.errors` runs core/__init__.py), except the module's own parents."""
    files = _files()
    graph: dict[str, set[str]] = {}
    for mod, deps in imports().items():
        edges = set(deps)
        for d in deps:
            parts = d.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in files}
        own = {".".join(mod.split(".")[:i]) for i in range(1, len(mod.split(".")) + 1)}
        graph[mod] = edges - own
    return graph


def test_packages_import_only_their_own_layer_and_those_below():
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    upward = []
    for mod, deps in imports(with_type_only=True).items():
        for dep, kind in deps.items():
            if rank[dep.split(".")[0]] > rank[mod.split(".")[0]] and not (kind == "type" and dep in TYPE_ONLY):
                upward.append(f"{mod} -> {dep} ({kind})")
    assert not upward, "imports against the layers (core <- export <- stages <- pipeline):\n" + "\n".join(upward)


def test_the_layering_check_sees_lazy_and_type_only_imports(tmp_path: Path):
    """The checker itself: a function-level import and a TYPE_CHECKING one are both found and told apart."""
    src = ("from typing import TYPE_CHECKING\nimport core.errors\nif TYPE_CHECKING:\n    from pipeline.config "
           "import Config\ndef f():\n    from stages import PIPELINE\n")
    tree = ast.parse(src)
    typed = _type_checking_nodes(tree)
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom | ast.Import)][1:]  # not typing's
    kinds = sorted("type" if id(n) in typed else "top" if n in tree.body else "function" for n in found)
    assert kinds == ["function", "top", "type"]


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
    from core.context import STAGES
    from core.registry import PIPELINE

    assert sorted(STAGES) == sorted(PIPELINE)
    for name in PIPELINE:
        cls = STAGES.get(name)
        assert cls.__module__ == f"stages.{name}", (name, cls.__module__)
        assert "name" not in vars(cls), f"{cls.__name__} names itself again; the registry names it"


def test_each_stage_section_is_defined_beside_its_stage_and_composed_into_the_schema():
    """The schema composes the sections; a stage's own lives in its module (export's beside the converters that
    read it, below the stages), so adding a stage touches its module and the composition, nothing else."""
    from core.registry import PIPELINE
    from pipeline.config import Config

    homes = {}
    for name in PIPELINE:
        field = Config.model_fields.get("validate_" if name == "validate" else name)
        if field is not None:
            homes[name] = field.annotation.__module__
    assert homes == {n: "export.config" if n == "export" else f"stages.{n}" for n in PIPELINE if n != "load"}, homes


def test_each_stage_writes_its_own_report_section_from_its_records(tmp_path: Path):
    """The report reads no stage's private state: stages with state of their own say it themselves."""
    import stages  # noqa: F401 - registers every stage
    from core.context import STAGES

    own = {name for name in STAGES if callable(getattr(STAGES.get(name), "report", None))}
    assert own == {"filter_prune", "layer_truncate", "validate"}
    report = (REPO / "pipeline" / "report.py").read_text()
    assert "rec.states" not in report and ".states.get(" not in report, "pipeline/report.py reads a stage's state"
