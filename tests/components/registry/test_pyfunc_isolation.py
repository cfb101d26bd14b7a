"""Each loaded generator runs the `components` code logged with it, even beside other versions.

Two versions of one tiny model are logged with different copies of the package: B's copy inverts
every image (`to_uint8` wrapped at the end of `components/evaluation/grid.py`). Both load into this
test process, which has imported the checkout's own `components`, and each predict must run its own
copy: sequentially, interleaved and from concurrent threads.
"""

from __future__ import annotations

import inspect
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

import components
from components.registry.registry import load_pyfunc, log_generator, register_version
from components.registry.serving import decode_images
from tests.components.registry.tiny_generators import pixel_diffusion
from tests.conftest import REPO

NAME = "genpipe-diffusion"
INVERT = """

_plain_to_uint8 = to_uint8


def to_uint8(x):  # the marker of this copy: every image inverted
    return 255 - _plain_to_uint8(x)
"""


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, object]:
    """Version 1 logged with an unchanged copy of `components`, version 2 with the inverting copy."""
    root = tmp_path_factory.mktemp("isolation")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("iso", artifact_location=(root / "mlartifacts").as_uri())
    model_dir = pixel_diffusion(root / "models" / "diffusion_pixel")
    source = Path(components.__file__).parent
    for copy in ("a", "b"):
        shutil.copytree(source, root / copy / "components", ignore=shutil.ignore_patterns("__pycache__"))
    with (root / "b" / "components" / "evaluation" / "grid.py").open("a") as f:
        f.write(INVERT)
    for copy in ("a", "b"):
        run_id = client.create_run(experiment).info.run_id
        logged = log_generator(
            tracking_uri=uri, run_id=run_id, model_dir=model_dir, code_dir=root / copy / "components"
        )
        register_version(
            tracking_uri=uri, name=NAME, run_id=run_id, tags=logged.tags, model_id=logged.model_id
        )
    path = list(sys.path)
    loaded = {
        v: load_pyfunc(tracking_uri=uri, name=NAME, version=v, cache=root / "cache")[0] for v in ("1", "2")
    }
    assert sys.path == path, "loading left a model's code folder on sys.path"
    return loaded


TABLE = pd.DataFrame({"label": [0, 1, 2, -1], "seed": [0, 0, 0, 5], "steps": [2, 2, 2, 2]})


def _pixels(model) -> np.ndarray:
    return decode_images(model.predict(TABLE)["image"]).astype(int)


def test_each_version_runs_its_own_code(versions: dict):
    a, b = versions["1"], versions["2"]
    x_a = _pixels(a)
    assert x_a.std() > 1
    assert np.array_equal(_pixels(b), 255 - x_a)  # B's code ran, not A's (loaded first)
    assert np.array_equal(_pixels(a), x_a)  # and A's again after B
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(_pixels, [a, b, a, b, b, a]))
    for x, model in zip(got, "ababba", strict=True):
        assert np.array_equal(x, x_a if model == "a" else 255 - x_a), model
    # The objects each model built keep referencing that model's modules.
    for version, model in versions.items():
        generator = model.unwrap_python_model().generator
        method = next(f for f in vars(type(generator)).values() if inspect.isfunction(f))
        assert not method.__code__.co_filename.startswith(str(REPO)), version
    # This process's own `components` is untouched.
    grid = sys.modules["components.evaluation.grid"]
    assert Path(grid.__file__).is_relative_to(REPO) and not hasattr(grid, "_plain_to_uint8")
