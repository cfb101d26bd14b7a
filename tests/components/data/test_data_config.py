"""The prepare section: every shipped params file validates; each bad value fails naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import ParamsError, validate_section
from components.data.config import PrepareConfig

REPO = Path(__file__).resolve().parents[3]
SHIPPED = sorted(p for p in REPO.glob("**/params*.yaml") if ".venv" not in p.parts and ".git" not in p.parts)


def test_shipped_params_files_exist():
    assert REPO / "params.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_prepare_section_validates(path):
    raw = yaml.safe_load(path.read_text()) or {}
    if "prepare" not in raw:
        pytest.skip(f"{path.name} has no prepare section")
    cfg = validate_section("prepare", raw["prepare"])
    assert isinstance(cfg, PrepareConfig)


def test_default_params_match_code_defaults():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["prepare"]
    assert validate_section("prepare", raw) == PrepareConfig()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"source": "s3:bucket"}, "prepare.source='s3:bucket'"),
        ({"source": "imagefolder:"}, "prepare.source='imagefolder:'"),
        ({"image_size": 3}, "prepare.image_size=3"),
        ({"image_size": 2048}, "prepare.image_size=2048"),
        ({"channels": 4}, "prepare.channels=4"),
        ({"aspect": "fill"}, "prepare.aspect='fill'"),
        ({"background": [0, 0]}, "prepare.background"),
        ({"background": [0, -1, 0]}, "prepare.background=[0, -1, 0]"),
        ({"split": {"val": -0.1}}, "prepare.split.val=-0.1"),
        ({"split": {"test": 0}}, "prepare.split.test=0"),
        ({"split": {"val": 0.4, "test": 0.5}}, "prepare.split="),
        ({"seed": -1}, "prepare.seed=-1"),
        ({"shard_rows": 0}, "prepare.shard_rows=0"),
        ({"on_bad_image": "warn"}, "prepare.on_bad_image='warn'"),
        ({"min_per_class": 0}, "prepare.min_per_class=0"),
        ({"shapes": {"count": 0}}, "prepare.shapes.count=0"),
        ({"shapes": {"size": 4}}, "prepare.shapes.size=4"),
        ({"shapes": {"colors": "neon"}}, "prepare.shapes.colors='neon'"),
        ({"shapes": {"classes": ["circle"]}}, "prepare.shapes.classes"),
        ({"shapes": {"classes": ["circle", "circle"]}}, "prepare.shapes.classes"),
        ({"shapes": {"classes": ["circle", "star"]}}, "'star'"),
        ({"parquet": {"label_names": "abc"}}, "prepare.parquet.label_names"),
        ({"parquet": {"image_col": "img"}}, "prepare.parquet.image_col: unknown key"),
        ({"sourse": "builtin:digits"}, "prepare.sourse: unknown key"),
    ],
)
def test_bad_value_names_the_key(raw, needle):
    with pytest.raises(ParamsError) as info:
        validate_section("prepare", raw)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)
