"""`prepare` on a user's own folder: refusals come before the MLflow run, the folder is a DVC
dependency through params.yaml alone, and a class left without val/test images is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipelines import prepare
from pipelines.lineage import ROOT_ENV
from tests.conftest import run


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        (root / "imgs" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (6, 6), (30 * i, 80, 9)).save(root / "imgs" / cls / f"{i}.png")
    return root / "imgs"


def _params(root: Path, **prepare_section) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"prepare": {"image_size": 4, "channels": 3, **prepare_section}}))
    return path


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_a_refusal_opens_no_mlflow_run(workspace):
    _folder(workspace, {"a": 5, "b": 2})
    params = _params(workspace, source="imagefolder:imgs", dvc_dep="imgs", min_per_class=3)
    with pytest.raises(ValueError, match=r"class 'b' has 2 images, fewer than prepare.min_per_class=3"):
        prepare.main(params=params)
    assert not (workspace / "mlflow.db").exists() and not (workspace / "data").exists()


def test_a_path_source_must_be_the_dvc_dependency(workspace):
    _folder(workspace, {"a": 5, "b": 5})
    with pytest.raises(ValueError) as info:
        prepare.main(params=_params(workspace, source="imagefolder:imgs"), dry_run=True)
    message = str(info.value)
    assert message.startswith("prepare.dvc_dep='components/data' but prepare.source='imagefolder:imgs'")
    assert "set prepare.dvc_dep: imgs" in message and "\n" not in message
    prepare.main(params=_params(workspace, source="imagefolder:imgs", dvc_dep="imgs"), dry_run=True)
    absolute = str(workspace / "imgs")  # the same folder, written another way
    prepare.main(params=_params(workspace, source="imagefolder:imgs", dvc_dep=absolute), dry_run=True)
    assert not (workspace / "mlflow.db").exists()


def test_a_home_relative_source_asks_for_the_absolute_path(workspace, monkeypatch):
    monkeypatch.setenv("HOME", str(workspace))
    _folder(workspace, {"a": 5, "b": 5})
    with pytest.raises(ValueError, match=f"set prepare.dvc_dep: {workspace / 'imgs'} "):
        prepare.main(params=_params(workspace, source="imagefolder:~/imgs", dvc_dep="~/imgs"), dry_run=True)
    prepare.main(
        params=_params(workspace, source="imagefolder:~/imgs", dvc_dep=str(workspace / "imgs")), dry_run=True
    )


def test_a_class_without_test_images_is_named(workspace, capsys):
    _folder(workspace, {"a": 10, "b": 1, "c": 2})
    params = _params(workspace, source="imagefolder:imgs", dvc_dep="imgs", min_per_class=1)
    prepare.main(params=params, dry_run=True)
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "warning" in x]
    assert line.startswith("prepare: warning: 2 class(es) without val or test images (train/val/test): ")
    assert "'b' 1/0/0, 'c' 2/0/0" in line and "prepare.min_per_class (now 1)" in line
    assert "'a'" not in line  # 10 images: 7/1/2


def test_changing_the_folder_reruns_prepare(repo_copy: Path):
    """Real DVC on a clone: params.yaml alone makes the folder a dependency of `prepare`."""
    _folder(repo_copy, {"a": 5, "b": 5})
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["prepare"].update(source="imagefolder:imgs", dvc_dep="imgs", image_size=4, channels=3)
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "prepare"], repo_copy, GENPIPE_STAGE_SERVER="off")  # prepare starts no Ray
    status = json.loads(run(["dvc", "status", "prepare", "--json"], repo_copy).stdout)
    assert status == {}
    Image.new("RGB", (6, 6), (1, 2, 3)).save(repo_copy / "imgs" / "b" / "new.png")
    status = json.loads(run(["dvc", "status", "prepare", "--json"], repo_copy).stdout)
    assert status["prepare"][0]["changed deps"] == {"imgs": "modified"}
