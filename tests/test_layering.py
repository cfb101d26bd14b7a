"""Side effects at the edges: components/ never imports dvc, and imports mlflow and ray only where allowed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPONENT_FILES = sorted((REPO / "components").rglob("*.py"))
PACKAGE_FILES = COMPONENT_FILES + sorted((REPO / "pipelines").rglob("*.py"))
RAY_MODULES = ("components/training/ray_adapter.py", "components/training/ray_trims.py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", COMPONENT_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_component_imports(path: Path):
    rel = path.relative_to(REPO).as_posix()
    names = _imports(path)
    assert "dvc" not in names, f"{rel} imports dvc: only pipelines/ may"
    assert "pipelines" not in names, f"{rel} imports pipelines/: components must not depend on stages"
    if not rel.startswith("components/registry/"):
        assert "mlflow" not in names, f"{rel} imports mlflow: keep it in components/registry"
    if "ray" in names:
        assert rel.startswith("components/data/") or rel in RAY_MODULES, (
            f"{rel} imports ray: keep Ray in components/data and the one training adapter (+ its trims)"
        )


def test_no_params_yaml_in_components():
    for path in COMPONENT_FILES:
        assert "params.yaml" not in path.read_text() or path.name == "config.py", path


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, at any depth of its code (function-level imports count)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for node in ast.walk(block)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & modules
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= ({node.module} | {f"{node.module}.{a.name}" for a in node.names}) & modules
    return found


def test_no_import_cycles():
    """Neither package has an import cycle, counting imports inside functions (TYPE_CHECKING aside)."""
    modules = {_module(p): p for p in PACKAGE_FILES}
    graph = {name: _project_imports(path, set(modules)) - {name} for name, path in modules.items()}
    cycles, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_ray_internals_only_in_the_trims_module():
    """Ray's private API (`_internal`, `_private`) is used in one gated module (ray_trims) alone."""
    users = [
        p.relative_to(REPO).as_posix()
        for p in PACKAGE_FILES
        if re.search(r"\b_(internal|private)\b", p.read_text()) and p.name != "ray_trims.py"
    ]
    assert not users, f"Ray internals outside components/training/ray_trims.py: {users}"


def test_no_stage_module_imports_another():
    """A stage's code is its DVC deps: one stage module importing another would hide a dependency."""
    from components.catalog import STAGES

    stages = {spec.module for spec in STAGES}
    modules = {_module(p): p for p in PACKAGE_FILES}
    crossing = {name: sorted(_project_imports(modules[name], stages) - {name}) for name in sorted(stages)}
    assert not {k: v for k, v in crossing.items() if v}, crossing
