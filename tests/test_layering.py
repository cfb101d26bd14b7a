"""Side effects at the edges: components/ never imports dvc, and imports mlflow and ray only where allowed."""

from __future__ import annotations

import ast
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

