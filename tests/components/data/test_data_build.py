"""build_dataset: stratified split, shards + meta.json, bad inputs, skip mode, atomic replacement."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.build import build_dataset, stratified_split
from components.data.config import PrepareConfig
from components.data.images import BadImageError, DataError
from components.data.readers import ShardDataset
from components.data.shards import SPLITS, content_hash, read_split

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The default build (builtin:digits), once per module, with its log lines."""
    out = tmp_path_factory.mktemp("digits") / "processed"
    lines: list[str] = []
    report = build_dataset(PrepareConfig(), out, log=lines.append)
    return out, report, lines


def test_digits_report_and_meta(digits):
    out, report, lines = digits
    meta = report["meta"]
    assert {k: report[k] for k in ("num_train", "num_val", "num_test", "num_classes", "num_skipped")} == {
        "num_train": 1259.0,
        "num_val": 179.0,
        "num_test": 359.0,
        "num_classes": 10.0,
        "num_skipped": 0.0,
    }
    assert all(isinstance(report[k], float) for k in ("num_train", "num_classes"))
    assert meta["schema_version"] == 1 and meta["image_size"] == 16 and meta["channels"] == 1
    assert meta["class_names"] == [str(d) for d in range(10)] and meta["num_classes"] == 10
    assert sum(meta["counts"].values()) == 1797 and meta["skipped"] == []
    for split in SPLITS:
        labels = read_split(out, split).column("label").to_pylist()
        assert meta["counts"][split] == len(labels)
        assert meta["class_counts"][split] == {str(k): n for k, n in sorted(Counter(labels).items())}
        assert set(labels) == set(range(10))  # stratified: every class in every split
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "test-00000.parquet",
        "train-00000.parquet",
        "val-00000.parquet",
    ]
    assert any("images (" in line and "/s, ETA " in line for line in lines)  # progress: rate and ETA


def test_digits_hash_and_statistics_match_the_shards(digits):
    out, report, _ = digits
    meta = report["meta"]
    assert meta["content_hash"] == content_hash(out)
    x = (ShardDataset(out, "train").images.double() + 1) / 2  # back to [0, 1]
    np.testing.assert_allclose(meta["mean"], x.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    np.testing.assert_allclose(meta["std"], x.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-6)


def test_stratified_split_is_a_seeded_partition():
    labels = [0] * 50 + [1] * 30 + [2] * 3
    plan = stratified_split(labels, val=0.1, test=0.2, seed=0)
    allidx = np.concatenate([plan[s] for s in SPLITS])
    assert sorted(allidx.tolist()) == list(range(len(labels)))
    y = np.asarray(labels)
    assert Counter(y[plan["test"]].tolist()) == {0: 10, 1: 6, 2: 1}
    assert Counter(y[plan["val"]].tolist()) == {0: 5, 1: 3}
    again = stratified_split(labels, val=0.1, test=0.2, seed=0)
    assert all(np.array_equal(plan[s], again[s]) for s in SPLITS)
    other = stratified_split(labels, val=0.1, test=0.2, seed=1)
    assert not np.array_equal(plan["train"], other["train"])


def test_build_is_deterministic_and_seeded(tmp_path, tiny_shapes, helpers):
    a = build_dataset(tiny_shapes, tmp_path / "a", log=lambda _: None)["meta"]
    b = build_dataset(tiny_shapes, tmp_path / "b", log=lambda _: None)["meta"]
    assert a["content_hash"] == b["content_hash"]
    assert helpers.snapshot(tmp_path / "a") == helpers.snapshot(tmp_path / "b")
    c = build_dataset(tiny_shapes.model_copy(update={"seed": 3}), tmp_path / "c", log=lambda _: None)["meta"]
    assert c["content_hash"] != a["content_hash"]


def test_shard_rows_and_rebuild_replaces_everything(tmp_path, tiny_shapes, helpers):
    out = tmp_path / "out"
    meta = build_dataset(tiny_shapes.model_copy(update={"shard_rows": 5}), out, log=lambda _: None)["meta"]
    assert meta["counts"] == {"train": 28, "val": 4, "test": 8}
    assert meta["shards"]["train"] == [f"train-{i:05d}.parquet" for i in range(6)]
    assert read_split(out, "train").num_rows == 28
    build_dataset(tiny_shapes, out, log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "test-00000.parquet",
        "train-00000.parquet",
        "val-00000.parquet",
    ]
    assert helpers.leftovers(out) == []


def test_imagefolder_of_odd_files_builds(tmp_path, make_folder, helpers):
    odd = helpers.odd_images()
    names = list(odd)
    root = make_folder({"x": {n: odd[n][0] for n in names[:5]}, "y": {n: odd[n][0] for n in names[5:]}})
    cfg = PrepareConfig(
        source=f"imagefolder:{root}", channels=3, image_size=8, split={"val": 0.2, "test": 0.2}
    )
    report = build_dataset(cfg, tmp_path / "out", log=lambda _: None)
    assert (report["num_train"], report["num_val"], report["num_test"]) == (6.0, 2.0, 2.0)
    ds = ShardDataset(tmp_path / "out", "train")
    assert ds.images.shape == (6, 3, 8, 8)
    assert sorted(ds.ids) == sorted(i for i in ds.ids if i.split("/")[0] in ("x", "y"))


def _bad_cases(tmp_path: Path, make_folder, helpers) -> dict[str, tuple[PrepareConfig, str]]:
    """name -> (a config that must fail, the culprit its message must name)."""
    png = helpers.png_bytes(Image.new("L", (6, 6), 77))
    good = {f"{i}.png": png for i in range(5)}

    def folder(name: str, extra: dict[str, bytes], more: dict | None = None) -> PrepareConfig:
        root = make_folder({"a": {**good, **extra}, "b": good, **(more or {})}, name=name)
        return PrepareConfig(source=f"imagefolder:{root}", shard_rows=1)

    pq_dir = tmp_path / "pq"
    labelled = helpers.write_parquet(pq_dir / "l.parquet", images=[png] * 6, labels=[0, 1] * 3, struct=True)
    empty = helpers.write_parquet(pq_dir / "e.parquet", images=[], labels=[], struct=False)
    return {
        "corrupt": (folder("corrupt", {"zz.png": png[:30]}), "a/zz.png: corrupt"),
        "zero-byte": (folder("zero", {"zz.png": b""}), "a/zz.png: zero-byte"),
        "non-image": (folder("text", {"zz.txt": b"hi"}), "a/zz.txt: not an image file"),
        "empty class": (folder("emptycls", {}, {"c": {}}), "class folder"),
        "missing path": (
            PrepareConfig(source=f"imagefolder:{tmp_path / 'nowhere'}"),
            "nowhere does not exist",
        ),
        "path not a folder": (
            PrepareConfig(source=f"imagefolder:{labelled}"),
            "l.parquet is not a directory",
        ),
        "missing label column": (
            PrepareConfig(source=f"parquet:{labelled}", parquet={"label_column": "y"}),
            "column 'y' (prepare.parquet.label_column) not found",
        ),
        "empty dataset": (PrepareConfig(source=f"parquet:{empty}"), "yielded no images"),
        "empty split": (
            PrepareConfig(source="builtin:shapes", shapes={"count": 8}, min_per_class=1),
            "prepare.split.val=0.1 leaves the val split empty",
        ),
        "too few per class": (
            PrepareConfig(source=f"parquet:{labelled}", min_per_class=4),
            "class '0' has 3 images, fewer than prepare.min_per_class=4",
        ),
    }


CASES = [
    "corrupt",
    "zero-byte",
    "non-image",
    "empty class",
    "missing path",
    "path not a folder",
    "missing label column",
    "empty dataset",
    "empty split",
    "too few per class",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_names_culprit_and_keeps_previous_output(case, tmp_path, make_folder, helpers, tiny_shapes):
    out = tmp_path / "processed"
    build_dataset(tiny_shapes, out, log=lambda _: None)
    before = helpers.snapshot(out)
    cfg, needle = _bad_cases(tmp_path, make_folder, helpers)[case]
    with pytest.raises(DataError) as info:
        build_dataset(cfg, out, log=lambda _: None)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)
    assert helpers.snapshot(out) == before
    assert helpers.leftovers(out) == []


def test_bad_image_error_mode_is_a_bad_image_error(tmp_path, make_folder, helpers):
    png = helpers.png_bytes(Image.new("L", (6, 6), 77))
    good = {f"{i}.png": png for i in range(4)}
    root = make_folder({"a": {**good, "zz.png": b""}, "b": good})
    with pytest.raises(BadImageError) as info:
        build_dataset(PrepareConfig(source=f"imagefolder:{root}"), tmp_path / "out", log=lambda _: None)
    assert info.value.path == str(root / "a" / "zz.png")
    assert not (tmp_path / "out").exists() and helpers.leftovers(tmp_path / "out") == []


def test_skip_mode_counts_and_lists_skipped(tmp_path, make_folder, helpers):
    png = helpers.png_bytes(Image.new("L", (6, 6), 77))
    good = {f"{i}.png": png for i in range(5)}
    bad = {"zero.png": b"", "junk.jpg": b"text", "notes.txt": b"hi"}
    root = make_folder({"a": {**good, **bad}, "b": good})
    lines: list[str] = []
    cfg = PrepareConfig(source=f"imagefolder:{root}", on_bad_image="skip")
    report = build_dataset(cfg, tmp_path / "out", log=lines.append)
    assert report["num_skipped"] == 3.0
    assert report["num_train"] + report["num_val"] + report["num_test"] == 10.0
    assert sorted(report["meta"]["skipped"]) == sorted(str(root / "a" / f) for f in bad)
    skipped_lines = [line for line in lines if "skipped" in line]
    assert len(skipped_lines) == 3 and all(str(root / "a") in line for line in skipped_lines)


def test_skips_that_empty_a_class_fail(tmp_path, make_folder, helpers):
    png = helpers.png_bytes(Image.new("L", (6, 6), 77))
    root = make_folder({"a": {f"{i}.png": b"" for i in range(5)}, "b": {f"{i}.png": png for i in range(5)}})
    cfg = PrepareConfig(source=f"imagefolder:{root}", on_bad_image="skip")
    with pytest.raises(
        DataError,
        match=r"class 'a' has 0 images \(after skipping 5 bad\), fewer than prepare.min_per_class=3",
    ):
        build_dataset(cfg, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists() and helpers.leftovers(tmp_path / "out") == []


def test_unlabelled_parquet_builds(tmp_path, helpers):
    imgs = [helpers.png_bytes(Image.new("L", (4, 4), i * 9)) for i in range(20)]
    path = helpers.write_parquet(tmp_path / "u.parquet", images=imgs, labels=None, struct=True)
    cfg = PrepareConfig(source=f"parquet:{path}", parquet={"label_column": None}, image_size=4)
    report = build_dataset(cfg, tmp_path / "out", log=lambda _: None)
    assert report["num_classes"] == 0.0 and report["meta"]["class_names"] == []
    assert report["meta"]["counts"] == {"train": 14, "val": 2, "test": 4}
    assert set(read_split(tmp_path / "out", "train").column("label").to_pylist()) == {-1}


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from components.data.build import build_dataset
from components.data.config import PrepareConfig

def log(line):
    if "skipped" in line:  # mid-build: shards are being written into the temporary directory
        os.kill(os.getpid(), signal.SIGKILL)

build_dataset(PrepareConfig.model_validate_json(sys.argv[1]), Path(sys.argv[2]), log=log)
"""


def test_kill_mid_build_keeps_previous_output(tmp_path, make_folder, helpers, tiny_shapes):
    out = tmp_path / "processed"
    build_dataset(tiny_shapes, out, log=lambda _: None)
    before = helpers.snapshot(out)
    png = helpers.png_bytes(Image.new("L", (6, 6), 77))
    root = make_folder({c: {f"{i}.png": png for i in range(6)} | {"z.png": b""} for c in "ab"})
    cfg = PrepareConfig(source=f"imagefolder:{root}", on_bad_image="skip", shard_rows=1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, cfg.model_dump_json(), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert helpers.snapshot(out) == before
    assert len(helpers.leftovers(out)) == 1  # the killed build's temporary directory
    lines: list[str] = []
    build_dataset(cfg, out, log=lines.append)  # the next build cleans up and replaces
    assert helpers.leftovers(out) == []
    assert any("removing leftover" in line for line in lines)
    assert read_split(out, "train").column("id").to_pylist()[0].split("/")[0] in ("a", "b")


def test_recover_restores_a_moved_away_output(tmp_path, helpers, tiny_shapes):
    out = tmp_path / "processed"
    build_dataset(tiny_shapes, out, log=lambda _: None)
    before = helpers.snapshot(out)
    out.rename(tmp_path / ".processed.old-x1")  # as if killed between the two fallback renames
    with pytest.raises(DataError):
        build_dataset(PrepareConfig(source=f"imagefolder:{tmp_path / 'nowhere'}"), out, log=lambda _: None)
    assert helpers.snapshot(out) == before and helpers.leftovers(out) == []


def test_meta_records_the_data_settings_only():
    """dvc_dep is bookkeeping, and the glyph block shows only for builtin:glyphs: the default
    digits build's meta.json (hence its DVC md5) is what it was before either existed."""
    from components.data.build import recorded_settings

    digits = recorded_settings(PrepareConfig(dvc_dep="elsewhere"))
    assert "dvc_dep" not in digits and "glyphs" not in digits and digits["shapes"]["count"] == 2000
    glyphs = recorded_settings(PrepareConfig(source="builtin:glyphs", channels=3, glyphs={"count": 48}))
    assert glyphs["glyphs"]["count"] == 48 and "dvc_dep" not in glyphs
