"""Each source kind on real inputs: built-ins, an image folder of odd files, Parquet exports."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from components.data.config import PrepareConfig
from components.data.images import BadImageError, DataError, standardize
from components.data.sources import SOURCES, UNLABELLED, open_source


def test_registry_covers_every_kind():
    assert set(SOURCES) == {"builtin:digits", "builtin:shapes", "builtin:glyphs", "imagefolder", "parquet"}


def test_digits():
    src = open_source(PrepareConfig())
    assert src.class_names == tuple(str(d) for d in range(10))
    assert len(src.records) == 1797
    assert src.records[42].id == "digits-00042"
    img = src.records[0].open()
    assert img.mode == "L" and img.size == (8, 8)
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(np.asarray(img), np.rint(load_digits().images[0] * 255 / 16))  # 16 -> 255
    assert set(Counter(r.label for r in src.records)) == set(range(10))


def test_shapes_balanced_deterministic_and_seeded():
    cfg = PrepareConfig(
        source="builtin:shapes", shapes={"count": 30, "classes": ["ring", "cross", "diamond"]}
    )
    src = open_source(cfg)
    assert src.class_names == ("ring", "cross", "diamond")
    assert Counter(r.label for r in src.records) == {0: 10, 1: 10, 2: 10}
    a = np.asarray(src.records[4].open())
    assert a.shape == (32, 32, 4)
    assert (a[..., 3] > 0).any() and (a[..., 3] == 0).any()  # a shape on a transparent canvas
    np.testing.assert_array_equal(a, np.asarray(open_source(cfg).records[4].open()))
    other = open_source(cfg.model_copy(update={"seed": 1}))
    assert not np.array_equal(a, np.asarray(other.records[4].open()))


def test_shapes_fixed_colours_are_per_class():
    cfg = PrepareConfig(source="builtin:shapes", shapes={"count": 8, "colors": "fixed"})
    src = open_source(cfg)
    for r in src.records:
        a = np.asarray(r.open())
        opaque = a[a[..., 3] == 255][:, :3]
        assert len(np.unique(opaque, axis=0)) == 1
    colour = {
        r.label: tuple(np.asarray(r.open())[np.asarray(r.open())[..., 3] == 255][0, :3]) for r in src.records
    }
    assert len(set(colour.values())) == 4


def test_imagefolder_reads_every_odd_file(make_folder, helpers):
    odd = helpers.odd_images()
    names = list(odd)
    root = make_folder({"b": {n: odd[n][0] for n in names[:5]}, "a": {n: odd[n][0] for n in names[5:]}})
    (root / "a" / ".DS_Store").write_bytes(b"junk")  # hidden files are not data
    cfg = PrepareConfig(source=f"imagefolder:{root}", channels=3, image_size=6)
    src = open_source(cfg)
    assert src.class_names == ("a", "b")
    assert len(src.records) == len(odd)
    for r in src.records:
        assert r.id.split("/")[0] == src.class_names[r.label]
        out = standardize(r.open(), cfg=cfg)
        assert out.mode == "RGB" and out.size == (6, 6)


@pytest.mark.parametrize(
    ("fname", "data", "reason"),
    [
        ("broken.png", None, "corrupt"),
        ("empty.png", b"", "zero-byte"),
        ("notes.txt", b"hello", "not an image file"),
        ("fake.jpg", b"this is text", "not an image"),
    ],
)
def test_imagefolder_bad_file_names_it(make_folder, helpers, fname, data, reason):
    if data is None:
        good = helpers.png_bytes(Image.new("RGB", (40, 40), (5, 5, 5)))
        data = good[: len(good) // 2]
    root = make_folder({"a": {fname: data}})
    (rec,) = open_source(PrepareConfig(source=f"imagefolder:{root}")).records
    with pytest.raises(BadImageError, match=reason) as info:
        rec.open()
    assert str(root / "a" / fname) in str(info.value)


def test_imagefolder_layout_errors(make_folder, tmp_path, helpers):
    png = helpers.png_bytes(Image.new("L", (4, 4)))
    root = make_folder({"a": {"x.png": png}, "empty": {}})
    with pytest.raises(DataError, match=f"class folder {root / 'empty'} is empty"):
        open_source(PrepareConfig(source=f"imagefolder:{root}"))
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        open_source(PrepareConfig(source=f"imagefolder:{tmp_path / 'nope'}"))
    with pytest.raises(DataError, match="is not a directory"):
        open_source(PrepareConfig(source=f"imagefolder:{root / 'a' / 'x.png'}"))
    stray = make_folder({"a": {"x.png": png}}, name="stray")
    (stray / "loose.png").write_bytes(png)
    with pytest.raises(DataError, match="loose.png: files must sit in one subfolder per class"):
        open_source(PrepareConfig(source=f"imagefolder:{stray}"))
    with pytest.raises(DataError, match="no class subfolders"):
        open_source(PrepareConfig(source=f"imagefolder:{make_folder({}, name='bare')}"))


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_labels_and_names_from_hf_metadata(tmp_path, helpers, struct):
    imgs = [helpers.png_bytes(Image.new("RGB", (5, 7), (i * 40, 0, 0))) for i in range(6)]
    path = helpers.write_parquet(
        tmp_path / "train.parquet",
        images=imgs,
        labels=[0, 1, 2, 0, 1, 2],
        struct=struct,
        names=["x", "y", "z"],
    )
    src = open_source(PrepareConfig(source=f"parquet:{path}"))
    assert src.class_names == ("x", "y", "z")
    assert [r.label for r in src.records] == [0, 1, 2, 0, 1, 2]
    assert src.records[3].id == "train-000003"
    assert np.asarray(src.records[3].open())[0, 0, 0] == 120


def test_parquet_names_from_config_then_from_range(tmp_path, helpers):
    imgs = [helpers.png_bytes(Image.new("L", (4, 4), i)) for i in range(4)]
    helpers.write_parquet(tmp_path / "d" / "a.parquet", images=imgs[:2], labels=[0, 1], struct=False)
    helpers.write_parquet(tmp_path / "d" / "b.parquet", images=imgs[2:], labels=[2, 1], struct=True)
    src = open_source(PrepareConfig(source=f"parquet:{tmp_path / 'd'}"))
    assert src.class_names == ("0", "1", "2")
    assert [r.id for r in src.records] == ["a-000000", "a-000001", "b-000000", "b-000001"]
    named = open_source(
        PrepareConfig(source=f"parquet:{tmp_path / 'd'}", parquet={"label_names": ["p", "q", "r"]})
    )
    assert named.class_names == ("p", "q", "r")


def test_parquet_unlabelled(tmp_path, helpers):
    imgs = [helpers.png_bytes(Image.new("L", (4, 4), i)) for i in range(3)]
    path = helpers.write_parquet(tmp_path / "u.parquet", images=imgs, labels=None, struct=True)
    src = open_source(PrepareConfig(source=f"parquet:{path}", parquet={"label_column": None}))
    assert src.class_names == ()
    assert {r.label for r in src.records} == {UNLABELLED}


def test_parquet_errors_name_the_culprit(tmp_path, helpers):
    imgs = [helpers.png_bytes(Image.new("L", (4, 4)))] * 2
    path = helpers.write_parquet(
        tmp_path / "p.parquet", images=imgs, labels=[0, 5], struct=True, names=["a", "b"]
    )
    with pytest.raises(
        DataError,
        match=r"column 'target' \(prepare.parquet.label_column\) not found; "
        r"columns: \['image', 'label'\]",
    ):
        open_source(PrepareConfig(source=f"parquet:{path}", parquet={"label_column": "target"}))
    with pytest.raises(DataError, match=r"p.parquet#row=1: label 5 outside 0..1"):
        open_source(PrepareConfig(source=f"parquet:{path}"))
    with pytest.raises(DataError, match="no .parquet files under"):
        open_source(PrepareConfig(source=f"parquet:{(tmp_path / 'empty').mkdir() or tmp_path / 'empty'}"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
        open_source(PrepareConfig(source=f"parquet:{tmp_path / 'bad.parquet'}"))
    with pytest.raises(DataError, match="missing.parquet does not exist"):
        open_source(PrepareConfig(source=f"parquet:{tmp_path / 'missing.parquet'}"))


def test_parquet_bad_image_bytes_name_the_row(tmp_path, helpers):
    path = helpers.write_parquet(tmp_path / "p.parquet", images=[b"", b"junk"], labels=[0, 0], struct=False)
    recs = open_source(PrepareConfig(source=f"parquet:{path}")).records
    with pytest.raises(BadImageError, match=r"p.parquet#row=0: zero-byte"):
        recs[0].open()
    with pytest.raises(BadImageError, match=r"p.parquet#row=1: not an image"):
        recs[1].open()


def test_shapes_at_a_million_are_listed_lazily():
    import tracemalloc

    cfg = PrepareConfig(source="builtin:shapes", channels=3, shapes={"count": 1_000_000})
    tracemalloc.start()
    source = open_source(cfg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 1024**2  # the label array (8 MB), not a million records
    assert len(source.records) == 1_000_000 and source.label_array().shape == (1_000_000,)
    rec = source.records[999_999]
    assert (rec.id, rec.label) == ("shapes-999999", 999_999 % 4) == (rec.id, int(source.labels[-1]))
    pixels = np.asarray(rec.open())
    assert np.array_equal(pixels, np.asarray(open_source(cfg).records[999_999].open()))  # (seed, index) alone
    other = open_source(cfg.model_copy(update={"seed": 1})).records[999_999].open()
    assert not np.array_equal(pixels, np.asarray(other))
    with pytest.raises(IndexError):
        source.records[1_000_000]


def test_a_parquet_export_of_100k_rows_is_listed_without_a_record_per_row(tmp_path, helpers):
    import tracemalloc

    png = helpers.png_bytes(Image.new("L", (4, 4), 7))
    n = 100_000
    helpers.write_parquet(
        tmp_path / "big.parquet", images=[png] * n, labels=[i % 3 for i in range(n)], struct=True
    )
    tracemalloc.start()
    source = open_source(PrepareConfig(source=f"parquet:{tmp_path / 'big.parquet'}"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 * 1024**2  # labels as one array; the bytes stay in Arrow buffers
    assert len(source.records) == n and source.class_names == ("0", "1", "2")
    last = source.records[n - 1]
    assert (last.id, last.label, last.origin) == (
        "big-099999",
        (n - 1) % 3,
        f"{tmp_path / 'big.parquet'}#row=99999",
    )
    assert last.data == png and source.label_array()[-1] == last.label
