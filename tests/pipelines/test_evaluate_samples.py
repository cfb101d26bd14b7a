"""`genpipe evaluate --samples`: a dump of the stage's own set re-scores to the stage's figures; bad sets fail in one line.

One tiny workspace (digits, an untrained tiny evaluator with its reference statistics, a tiny
untrained pixel diffusion model, registry off) serves every test: the stage, its dump and the
re-scoring run in this process through the stage module; the CLI's errors through `genpipe`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from components.data.build import build_dataset
from components.data.config import PrepareConfig
from components.data.readers import ShardDataset, epoch_batches
from components.diffusion.config import DiffusionConfig, SamplingConfig
from components.diffusion.generator import export
from components.diffusion.precond import build_denoiser
from components.evaluation.evaluator import Evaluator, EvaluatorConfig, EvaluatorTask, save_evaluator
from components.evaluation.reference import reference_from_data, save_reference
from components.training.config import LoopConfig
from components.training.loop import train
from pipelines import evaluate
from tests.conftest import project_env

MODEL = "diffusion_pixel"
N, BATCH = 23, 7  # batches of 7, 7, 7, 2: the last one short
FIGURES = ("fid", "fid_over_floor", "fid_floor", "precision", "recall", "cond_accuracy", "num_samples")
BACKBONE = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": []}


def _trained_evaluator(data: Path) -> Evaluator:
    """A tiny evaluator trained for a few dozen steps: features and a head worth scoring with."""
    torch.manual_seed(0)
    loop = LoopConfig(steps=60, batch_size=32, lr=0.006, warmup_steps=5, log_every=60)  # ~54% test accuracy
    task = EvaluatorTask(
        EvaluatorConfig(widths=(16, 32), feature_dim=32), loop, in_channels=1, num_classes=10
    )
    split = ShardDataset(data, "train")
    batches = epoch_batches({"image": split.images, "label": split.labels}, batch=32, seed=0)
    train(task, loop=loop, batches=batches, device=torch.device("cpu"), progress=False)
    return task.modules["evaluator"].eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate_samples")
    build_dataset(PrepareConfig(), root / "data/processed", log=lambda *_: None)
    evaluator = _trained_evaluator(root / "data/processed")
    save_evaluator(evaluator, root / "models/evaluator")
    save_reference(
        reference_from_data(evaluator, root / "data/processed", batch_size=100), root / "models/evaluator"
    )
    model = DiffusionConfig(objective="edm", backbone={**BACKBONE, "num_classes": 10, "in_channels": 1})
    export(
        root / "models" / MODEL,
        denoiser_state=build_denoiser(model).state_dict(),
        model=model,
        sampling=SamplingConfig(sampler="euler", steps=2),
        image_shape=(1, 16, 16),
        num_classes=10,
    )
    params = {
        "mlflow": {"register_models": False},
        "evaluate": {"num_samples": N, "batch_size": BATCH, "grid_columns": 3, "threads": 1, "pr_k": 3},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    old = os.environ.get("GENPIPE_ROOT")
    os.environ["GENPIPE_ROOT"] = str(root)
    yield root
    if old is None:
        os.environ.pop("GENPIPE_ROOT")
    else:
        os.environ["GENPIPE_ROOT"] = old


def _score(root: Path, samples: Path, capsys, **kw) -> dict:
    capsys.readouterr()
    evaluate.main(params=root / "params.yaml", samples=samples, **kw)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dump(workspace: Path) -> Path:
    """The stage's report, then a dump of the same set (which leaves the report alone)."""
    evaluate.main(params=workspace / "params.yaml", model=MODEL)
    report = workspace / f"reports/evaluate/{MODEL}.json"
    before = report.read_bytes()
    path = workspace / "dump/set.npz"
    evaluate.main(params=workspace / "params.yaml", model=MODEL, dump_samples=path)
    assert report.read_bytes() == before
    return path


def test_a_dump_of_the_stage_set_rescores_to_the_stage_figures(workspace, dump, capsys):
    stage = json.loads((workspace / f"reports/evaluate/{MODEL}.json").read_text())
    with np.load(dump) as z:
        assert sorted(z.files) == ["images", "labels"]
        assert z["images"].shape == (N, 1, 16, 16) and z["images"].dtype == np.float32
        assert z["labels"].tolist() == [i % 10 for i in range(N)]  # balanced: the labels asked for
    out = workspace / "result.json"
    result = _score(workspace, dump, capsys, model=MODEL, out=out)
    assert json.loads(out.read_text()) == result
    assert result["registered"] == "genpipe-diffusion" and result["stage"] == {
        k: stage[k] for k in result["metrics"]
    }
    for key in FIGURES:
        assert result["metrics"][key] == pytest.approx(stage[key], rel=1e-9, abs=1e-12), key
    # an untrained model: precision and recall may well be 0 (the real test split scores 1 below)
    assert (
        stage["fid"] > stage["fid_floor"] > 0 and 0 <= stage["precision"] <= 1 and 0 <= stage["recall"] <= 1
    )


def test_uint8_images_and_an_image_folder_score_alike(workspace, dump, capsys):
    with np.load(dump) as z:
        pixels = np.round((z["images"] + 1) * 127.5).clip(0, 255).astype(np.uint8)
        labels = z["labels"]
    np.savez(workspace / "u8.npz", images=pixels, labels=labels)
    np.save(workspace / "u8.npy", pixels)
    folder = workspace / "folder"
    for i, (x, c) in enumerate(zip(pixels, labels, strict=True)):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[0], mode="L").save(folder / str(c) / f"{i:03d}.png")
    from_npz = _score(workspace, workspace / "u8.npz", capsys)["metrics"]
    from_npy = _score(workspace, workspace / "u8.npy", capsys)["metrics"]
    from_folder = _score(workspace, folder, capsys)["metrics"]
    assert "cond_accuracy" not in from_npy  # no labels: nothing to be accurate to
    assert from_npy["fid"] == pytest.approx(from_npz["fid"], rel=1e-12)
    # the folder is in class order, not the dump's: the same set, so the same figures to rounding
    for key in ("fid", "precision", "recall", "cond_accuracy"):
        assert from_folder[key] == pytest.approx(from_npz[key], rel=1e-6, abs=1e-9), key


def test_the_real_test_split_as_a_sample_set_scores_as_the_real_test_split(workspace, capsys):
    """FD to its own statistics ~0, precision = recall = 1, accuracy = the evaluator's test accuracy."""
    from components.data.readers import ShardDataset
    from components.evaluation.evaluator import load_evaluator, predict

    test = ShardDataset(workspace / "data/processed", "test")
    folder = workspace / "real-test"
    names = test.class_names
    for i, (x, c) in enumerate(zip(test.images, test.labels.tolist(), strict=True)):
        (folder / names[c]).mkdir(parents=True, exist_ok=True)
        pixels = np.round((x[0].numpy() + 1) * 127.5).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / names[c] / f"{i:04d}.png")
    got = _score(workspace, folder, capsys)["metrics"]
    evaluator = load_evaluator(workspace / "models/evaluator")
    accuracy = float((predict(evaluator, test.images) == test.labels).double().mean())
    assert got["num_samples"] == len(test) and got["cond_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert accuracy > 0.3  # a trained evaluator: the figure means something
    assert (
        got["fid"] == pytest.approx(0, abs=1e-9 * got["fid_floor"]) and got["precision"] == got["recall"] == 1
    )


def _write(path: Path, arrays: dict) -> Path:
    path.parent.mkdir(exist_ok=True)
    np.save(path, arrays["images"]) if path.suffix == ".npy" else np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("name", "make", "needle"),
    [
        (
            "nan.npz",
            lambda x, y: {
                "images": np.where(np.arange(len(x))[:, None, None, None] == 5, np.nan, x),
                "labels": y,
            },
            "image 5 has non-finite",
        ),
        (
            "inf.npy",
            lambda x, y: {"images": np.where(np.arange(len(x))[:, None, None, None] == 9, np.inf, x)},
            "image 9 has non-finite",
        ),
        (
            "range.npz",
            lambda x, y: {
                "images": np.where(np.arange(len(x))[:, None, None, None] == 8, 1.5, x),
                "labels": y,
            },
            "image 8 has pixels in [1.500, 1.500], not [-1, 1]",
        ),
        ("nhwc.npz", lambda x, y: {"images": x.transpose(0, 2, 3, 1), "labels": y}, "transpose"),
        ("rgb.npz", lambda x, y: {"images": np.repeat(x, 3, axis=1), "labels": y}, "expected (N, 1, 16, 16)"),
        ("dtype.npz", lambda x, y: {"images": x.astype(np.float16), "labels": y}, "dtype float16"),
        (
            "label.npz",
            lambda x, y: {"images": x, "labels": np.where(y == 3, 10, y)},
            "label 10 at index 3 is outside 0..9",
        ),
        ("count.npz", lambda x, y: {"images": x, "labels": y[:-1]}, f"expected ({N},)"),
        ("float_labels.npz", lambda x, y: {"images": x, "labels": y.astype(np.float32)}, "must be integers"),
        ("extra.npz", lambda x, y: {"images": x, "labels": y, "foo": y}, "nothing else"),
        ("few.npz", lambda x, y: {"images": x[:3], "labels": y[:3]}, "scoring needs at least 4"),
    ],
)
def test_bad_sample_sets_fail_in_one_line_naming_them(workspace, dump, name, make, needle):
    with np.load(dump) as z:
        path = _write(workspace / "bad" / name, make(z["images"], z["labels"]))
    with pytest.raises((ValueError, FloatingPointError)) as err:
        evaluate.main(params=workspace / "params.yaml", samples=path)
    message = str(err.value)
    assert "\n" not in message and needle in message and name in message, message


def test_the_cli_gives_one_line_and_exit_1_and_no_json(workspace, dump):
    with np.load(dump) as z:
        images = z["images"].copy()
    images[4, 0, 3, 3] = np.nan
    path = _write(workspace / "bad" / "cli-nan.npy", {"images": images})
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "genpipe"), "evaluate", "--samples", str(path)],
        cwd=workspace,
        env=project_env(GENPIPE_ROOT=str(workspace), GENPIPE_STAGE_SERVER="off"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"genpipe: error: evaluate: {path}: image 4 has non-finite pixels (NaN or Inf)"
    ), proc.stderr


def test_out_refuses_the_stage_reports_and_leaves_nothing_half_written(workspace, dump, capsys):
    for target in ("reports/evaluate.json", f"reports/evaluate/{MODEL}.json"):
        with pytest.raises(ValueError, match="evaluate stage's report"):
            evaluate.main(params=workspace / "params.yaml", samples=dump, out=workspace / target)
    with np.load(dump) as z:
        whole = _write(workspace / "bad/whole.npy", {"images": z["images"]})
    cut = {
        "cut.npz": (dump.read_bytes()[: dump.stat().st_size // 2], "not a readable .npz"),
        "cut.npy": (whole.read_bytes()[: whole.stat().st_size // 2], "truncated at image 11 of 23"),
    }
    for name, (data, needle) in cut.items():
        (workspace / "bad" / name).write_bytes(data)
        with pytest.raises(ValueError, match=needle):
            evaluate.main(
                params=workspace / "params.yaml",
                samples=workspace / "bad" / name,
                out=workspace / "never.json",
            )
    assert not (workspace / "never.json").exists()
    assert not list(workspace.glob("*.tmp*"))


def test_ray_workers_judge_the_same_set_to_the_same_figures(workspace, dump, capsys):
    import ray

    from pipelines.ray_start import LOCAL_RAY_ENV

    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["evaluate"]["num_workers"] = 2
    raw["ray"] = {"num_cpus": 2, "include_dashboard": False}
    params = workspace / "params-ray.yaml"
    params.write_text(yaml.safe_dump(raw))
    saved = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
    capsys.readouterr()
    try:
        evaluate.main(params=params, model=MODEL, dump_samples=workspace / "dump/ray.npz")
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("{"))
    got = json.loads(line)["metrics"]
    stage = json.loads((workspace / f"reports/evaluate/{MODEL}.json").read_text())
    for key in FIGURES:
        assert got[key] == pytest.approx(stage[key], rel=1e-9, abs=1e-12), key
    with np.load(dump) as here, np.load(workspace / "dump/ray.npz") as there:
        np.testing.assert_array_equal(here["labels"], there["labels"])
        np.testing.assert_allclose(here["images"], there["images"], rtol=0, atol=1e-6)


def test_bad_image_folders_fail_in_one_line_naming_the_file(workspace):
    grey = Image.fromarray(np.zeros((16, 16), np.uint8), mode="L")
    cases = {
        "other-file": ({"3/a.png": grey, "3/notes.txt": None}, "notes.txt: not a .png file"),
        "unknown-class": ({"cat/a.png": grey}, "cat: not a class"),
        "mixed": ({"a.png": grey, "3/b.png": grey}, "has both images"),
        "rgb": ({"3/a.png": grey.convert("RGB")}, "a.png: RGB 16x16, expected L 16x16"),
        "size": ({"3/a.png": grey.resize((8, 8))}, "a.png: L 8x8, expected L 16x16"),
        "empty": ({}, "no .png images"),
    }
    for name, (files, needle) in cases.items():
        folder = workspace / "bad-folders" / name
        folder.mkdir(parents=True)
        for rel, img in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text("x") if img is None else img.save(folder / rel)
        with pytest.raises(ValueError) as err:
            evaluate.main(params=workspace / "params.yaml", samples=folder)
        assert needle in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


def test_the_judge_catches_broken_sample_sets(workspace, capsys):
    """benchmarks/judge_sanity.py's broken sets (noise, blank, half blank, one image per class, the
    wrong class), from the val split, against the same images scored as they are, with this
    workspace's weak evaluator: each is caught on FD / floor and on the figure aimed at its failure."""
    from benchmarks.judge_sanity import check, sample_sets

    rows = {}
    for name, arrays in sample_sets(workspace / "data/processed", "val").items():
        path = workspace / "broken" / f"{name.replace(' ', '_')}.npz"
        path.parent.mkdir(exist_ok=True)
        np.savez(path, **arrays)
        rows[name] = _score(workspace, path, capsys)["metrics"]
    assert check(rows) == [], rows
    assert rows["wrong class"]["fid"] == pytest.approx(rows["real"]["fid"], rel=1e-9)  # FD cannot see labels
