"""`genpipe preset NAME`: a presets/NAME.yaml overlay merged into params.yaml, comments and every other
line kept, validated before it lands; `--sets` gives the same change as `dvc exp run -S` arguments.
(That every stage resolves on 32x32 RGB glyphs with the preset applied: test_sizes_follow_data.py.)"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import ParamsError, flatten, validate_all
from pipelines import preset

REPO = Path(__file__).resolve().parents[2]
GENPIPE = str(Path(sys.executable).parent / "genpipe")


@pytest.fixture
def params(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    return path


def test_rgb32_changes_only_its_keys_and_keeps_the_file(params):
    overlay = yaml.safe_load((REPO / "presets" / "rgb32.yaml").read_text())
    before_text = params.read_text()
    before = flatten(yaml.safe_load(before_text))
    lines = preset.main(params=params, name="rgb32")
    after = flatten(yaml.safe_load(params.read_text()))
    wanted = flatten(overlay)
    assert {k: after[k] for k in wanted} == wanted  # every preset value landed
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {k for k in wanted if before[k] != wanted[k]} and set(after) == set(before)
    assert lines[-1].startswith(f"preset rgb32: {len(changed)} value(s) changed in {params}")
    old, new = before_text.splitlines(), params.read_text().splitlines()
    assert len(old) == len(new)  # a line per value: the rest of the file is byte for byte the same
    differ = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert len(differ) == len(changed)
    assert "  channels: 3               # preset rgb32 (was 1)" in new  # the comment says where it came from
    validate_all(params)
    assert preset.main(params=params, name="rgb32") == [
        f"preset rgb32: {params} already has every value; nothing changed"
    ]


def test_a_bad_preset_leaves_the_params_alone(params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the workspace's presets/ come first
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "typo.yaml").write_text("train_zoo:\n  flow:\n    loop:\n      stepz: 3\n")
    (tmp_path / "presets" / "invalid.yaml").write_text("train_zoo:\n  flow:\n    loop:\n      steps: -3\n")
    text = params.read_text()
    with pytest.raises(
        ParamsError, match=r"^preset typo: train_zoo.flow.loop.stepz is not a key of params.yaml"
    ):
        preset.main(params=params, name="typo")
    with pytest.raises(ParamsError, match=r"train_zoo.*steps"):
        preset.main(params=params, name="invalid")
    with pytest.raises(ParamsError, match=r"^unknown preset 'nope'; available: .*rgb32"):
        preset.main(params=params, name="nope")
    assert params.read_text() == text and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sets_are_the_same_change_for_dvc_exp_run(params):
    sets = preset.main(params=params, name="rgb32", sets=True)
    values = {}
    for arg in sets:
        flag, value = shlex.split(arg)
        key, _, raw = value.partition("=")
        assert flag == "-S"
        values[key] = yaml.safe_load(raw)
    preset.main(params=params, name="rgb32")
    after = flatten(yaml.safe_load(params.read_text()))
    assert values == {k: after[k] for k in values}


def test_the_command_is_one_line_on_error(tmp_path):
    proc = subprocess.run(
        [GENPIPE, "preset", "nope", "--params", str(tmp_path / "params.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("genpipe: error: preset: unknown preset 'nope'; available: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_gpu_preset_goes_on_top_of_rgb32(params):
    """`genpipe preset rgb32 && genpipe preset rgb32-gpu`: both overlays land and the result validates."""
    preset.main(params=params, name="rgb32")
    preset.main(params=params, name="rgb32-gpu")
    after = flatten(yaml.safe_load(params.read_text()))
    rgb, gpu = (
        flatten(yaml.safe_load((REPO / "presets" / f"{n}.yaml").read_text())) for n in ("rgb32", "rgb32-gpu")
    )
    assert {k: after[k] for k in gpu} == gpu  # the GPU overlay wins where both set a key
    assert {k: after[k] for k in rgb if k not in gpu} == {k: v for k, v in rgb.items() if k not in gpu}
    assert after["train.use_gpu"] is True and after["evaluate.device"] == "cuda"
    validate_all(params)
