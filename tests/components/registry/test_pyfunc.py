"""Generators as MLflow pyfunc models from code: load without pickle in a fresh process, sha tags, serving.

The store holds a tiny pixel diffusion model and a tiny two-stage model (MaskGIT prior + its
tokenizer), logged and registered as the training stages do. Loading runs in subprocesses from
another directory: an already-imported `components` would shadow the model's own copy.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from components.generators import load_generator
from components.registry.registry import download, load_pyfunc, logged_model_tags, pip_requirements
from tests import services
from tests.components.registry.tiny_generators import register_tiny
from tests.conftest import REPO, project_env

DIFFUSION, PRIOR = "genpipe-diffusion", "genpipe-prior-maskgit"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("store")
    (root / "elsewhere").mkdir()
    return {"root": root, **register_tiny(root)}


def _env(store: dict) -> dict[str, str]:
    """A user's shell: this venv first on PATH (uvicorn), the store's URI, pickle refused."""
    env = project_env(MLFLOW_TRACKING_URI=store["uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    env.pop("PYTHONPATH", None)
    return env


LOAD_AND_PREDICT = """
import base64, inspect, io, json, sys
import mlflow.pyfunc, numpy as np, pandas as pd
from PIL import Image

def decode(column):  # no genpipe import here: the model must bring its own code
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(t)))) for t in column])

out = {}
for name in sys.argv[1:]:
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    table = pd.DataFrame({"label": [0, 1, 2, -1], "seed": [0, 0, 0, 5]})
    got = model.predict(table)
    x = decode(got["image"])
    fewer_steps = decode(model.predict(table.assign(steps=1))["image"])
    out[name] = {
        "shape": list(x.shape), "dtype": str(x.dtype), "std": float(x.std()),
        "labels": got["label"].tolist(), "seeds": got["seed"].tolist(),
        "same_again": bool((decode(model.predict(table)["image"]) == x).all()),
        "steps_matter": bool((fewer_steps != x).any()),
        "components": inspect.getsourcefile(inspect.unwrap(type(model.unwrap_python_model().generator).sample)),
        "left_in_sys_modules": sorted(m for m in sys.modules if m.split(".")[0] == "components"),
    }
print(json.dumps(out))
"""


def test_loads_from_registry_without_pickle_in_a_fresh_process(store: dict):
    """`models:/NAME@champion` loads with pickle refused, from another directory, and predicts images."""
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, DIFFUSION, PRIOR],
        cwd=store["root"] / "elsewhere",
        env=_env(store),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in (DIFFUSION, PRIOR):
        got = out[name]
        assert got["shape"] == [4, 16, 16] and got["dtype"] == "uint8" and got["std"] > 1, name
        assert got["labels"] == [0, 1, 2, -1] and got["seeds"] == [0, 0, 0, 5]
        assert got["same_again"] and got["steps_matter"], name  # seeded; the steps option is applied
        # The model's own copy of the code ran, not this checkout's.
        assert not got["components"].startswith(str(REPO)), got["components"]
        assert got["components"].endswith(
            "/code/components/diffusion/generator.py"
            if name == DIFFUSION
            else "/code/components/prior/generator.py"
        ), got["components"]
        assert got["left_in_sys_modules"] == []  # each model's code is in place only while it runs
    assert not (store["root"] / "elsewhere" / "mlflow.db").exists()


def _logged_files(store: dict, name: str, dst: Path) -> Path:
    import mlflow.artifacts

    client = MlflowClient(tracking_uri=store["uri"])
    uri = client.get_model_version_download_uri(name, "1")
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=store["uri"])
    )


def _tree_sha(root: Path, pattern: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", [DIFFUSION, PRIOR])
def test_logged_model_has_no_pickle_and_sha_tags_match_its_files(store: dict, name: str, tmp_path: Path):
    model = _logged_files(store, name, tmp_path)
    files = [p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()]
    assert "MLmodel" in files and "code/components/generators.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pyc"))]
    flavor = yaml.safe_load((model / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert "pyfunc_model.py" in files  # models from code: the file, not a pickled instance
    assert (model / "requirements.txt").read_text().split() == pip_requirements()
    tags = MlflowClient(tracking_uri=store["uri"]).get_model_version(name, "1").tags
    hashes = logged_model_tags(store["uri"], name, "1")  # the logged model's own files: on the logged model
    folder = download(tracking_uri=store["uri"], name=name, alias="champion", dst=tmp_path / "dl")
    assert (folder / "config.json").is_file() and load_generator(folder).image_shape == (1, 16, 16)
    assert hashes["weights_sha256"] == _tree_sha(folder, "*.safetensors")
    assert hashes["code_sha256"] == _tree_sha(model / "code", "*")
    assert tags["model_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert tags["git_commit"] == "abc123"  # the lineage tags travel with the version
    assert "weights_sha256" not in tags and "code_sha256" not in tags  # a version's tags stay few
    if name == PRIOR:  # two-stage: the tokenizer is inside the one model
        assert (folder / "tokenizer" / "model.safetensors").is_file()
        assert hashes["tokenizer_sha256"] == _tree_sha(folder / "tokenizer", "*.safetensors")


def test_bad_tables_are_one_line_errors_and_loads_are_cached(store: dict, tmp_path: Path):
    model, mv = load_pyfunc(tracking_uri=store["uri"], name=DIFFUSION, alias="champion", cache=tmp_path)
    again, _ = load_pyfunc(tracking_uri=store["uri"], name=DIFFUSION, alias="champion", cache=tmp_path)
    assert os.listdir(tmp_path) == [mv.source.removeprefix("models:/")]  # one download per logged model
    cases = {
        "unknown column 'stepz'; valid: label, seed, and the sampling options S_churn": {
            "seed": [0],
            "stepz": [3],
        },
        "column 'seed' is missing": {"label": [0]},
        r"row 1: label=3 must lie in \[0, 3\)": {"label": [0, 3], "seed": [0, 0]},
        "row 0: option steps='many' must be an integer": {"seed": [0], "steps": ["many"]},
        "the table is empty": {"seed": []},
    }
    for message, columns in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            again.predict(pd.DataFrame(columns))
        assert "\n" not in str(err.value)
    with pytest.raises(LookupError, match="genpipe-diffusion has no alias 'best'; its aliases: champion"):
        load_pyfunc(tracking_uri=store["uri"], name=DIFFUSION, alias="best", cache=tmp_path)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_log_register_and_load_over_http(backend: str, request, tmp_path: Path):
    """Against `mlflow server`: artefacts go through its proxy, the server resolves `models:/<id>`,
    and `load_pyfunc` downloads each logged model once."""
    if backend == "sqlite":
        with services.mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server") as url:
            _exercise_http(url, tmp_path)
    else:
        _exercise_http(request.getfixturevalue("postgres_registry"), tmp_path)


def _exercise_http(url: str, tmp_path: Path) -> None:
    store = register_tiny(tmp_path, uri=url, pixel_only=True)
    mv = MlflowClient(tracking_uri=url).get_model_version(DIFFUSION, "1")
    assert mv.source == store["logged"][DIFFUSION].model_uri and mv.run_id
    cache = tmp_path / "cache"
    for _ in range(2):
        model, _ = load_pyfunc(tracking_uri=url, name=DIFFUSION, alias="champion", cache=cache)
    assert os.listdir(cache) == [store["logged"][DIFFUSION].model_id]
    got = model.predict(pd.DataFrame({"label": [2, 0], "seed": [1, 1]}))
    assert got["label"].tolist() == [2, 0] and got["image"].str.len().min() > 100
    folder = download(tracking_uri=url, name=DIFFUSION, alias="champion", dst=tmp_path / "dl")
    assert _tree_sha(folder, "*.safetensors") == logged_model_tags(url, DIFFUSION, "1")["weights_sha256"]


@pytest.fixture
def served(store: dict, free_port: int):
    """`mlflow models serve` of genpipe-diffusion@champion on a free port; always stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{DIFFUSION}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(free_port), "-w", "1"],
        cwd=store["root"] / "elsewhere",
        env=_env(store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{free_port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow models serve exited: {proc.stderr.read().decode()[-2000:]}")
                if time.time() > deadline:
                    pytest.fail("mlflow models serve did not answer /ping in 180 s")
                time.sleep(0.5)
        yield url
    finally:  # the server's own session: uvicorn and its worker go with it
        services.stop_group(proc, grace=20)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_with_images(served: str):
    status, body = _post(
        served,
        {
            "dataframe_split": {
                "columns": ["label", "seed", "steps"],
                "data": [[0, 0, 2], [2, 0, 2], [1, 7, 2]],
            }
        },
    )
    assert status == 200, body
    rows = body["predictions"]
    assert [(r["label"], r["seed"]) for r in rows] == [(0, 0), (2, 0), (1, 7)]
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"])))) for r in rows]
    assert all(x.shape == (16, 16) and x.dtype == np.uint8 for x in images)
    assert not np.array_equal(images[0], images[2])
    # A model error is HTTP 400 with the project's one line, even from plain `mlflow models serve`.
    status, body = _post(served, {"dataframe_records": [{"seed": 0, "stepz": 3}]})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
    assert body["message"].startswith("unknown column 'stepz'; valid: label, seed,"), body
    assert "\n" not in body["message"] and "stack_trace" not in body, body


def test_deadline_stops_a_predict_and_stays_with_its_call(store: dict, tmp_path: Path, monkeypatch):
    """GENPIPE_REQUEST_TIMEOUT stops a long predict at a network forward (one line, DEADLINE_EXCEEDED);
    the next call samples normally; `stop()` ends every call at once."""
    from mlflow.exceptions import MlflowException

    model, _ = load_pyfunc(tracking_uri=store["uri"], name=DIFFUSION, alias="champion", cache=tmp_path)
    long = pd.DataFrame({"label": [0, 1], "seed": [0, 1], "steps": [1000, 1000]})
    monkeypatch.setenv("GENPIPE_REQUEST_TIMEOUT", "0.2")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^request stopped after 0.2 s \(GENPIPE_REQUEST_TIMEOUT\)") as err:
        model.predict(long)
    assert time.monotonic() - start < 20  # liveness: 2 x 1000 Heun steps would take far longer
    assert isinstance(err.value, MlflowException) and err.value.get_http_status_code() == 504
    monkeypatch.setenv("GENPIPE_REQUEST_TIMEOUT", "60")  # the past call's deadline does not linger
    got = model.predict(pd.DataFrame({"label": [0], "seed": [0], "steps": [2]}))
    assert len(got) == 1
    monkeypatch.setenv("GENPIPE_REQUEST_TIMEOUT", "zero")
    with pytest.raises(ValueError, match="GENPIPE_REQUEST_TIMEOUT='zero' must be a positive number"):
        model.predict(long)
    monkeypatch.delenv("GENPIPE_REQUEST_TIMEOUT")
    model.unwrap_python_model().stop()
    with pytest.raises(MlflowException, match="the server is shutting down") as err:
        model.predict(long)
    assert err.value.get_http_status_code() == 503
