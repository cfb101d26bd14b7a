"""MLflow model registry: versions with lineage tags, aliases, and loading `name@alias`.

A generator is logged as an MLflow pyfunc model from code (`log_generator`): the file
`pyfunc_model.py`, the `components` package as `code_paths`, the exported folder (safetensors +
JSON) as its artifact `generator`, explicit pip requirements; its version is registered from the
logged model's URI. The evaluator and the tokenizer stay plain exported folders in their runs. No
pickled model is ever logged or loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from components import catalog
from components.registry.card import record_evaluation, record_judgement  # noqa: F401 - the evaluate stage's API
from components.registry.versions import (  # noqa: F401 - the registry's API
    CHALLENGER,
    CHAMPION,
    list_versions,
    logged_model_id,
    version_by_tag,
)

FAMILIES = tuple(m.family for m in catalog.MODELS)  # registered as genpipe-<family>


def registered_name(family: str) -> str:
    """`genpipe-<family>`; an unknown family is an error naming the valid ones."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {list(FAMILIES)}")
    return f"genpipe-{family}"


def register_version(
    *,
    tracking_uri: str,
    name: str,
    run_id: str,
    tags: dict[str, str],
    artifact_path: str | None = None,
    model_id: str | None = None,
) -> str:
    """Register a logged model (`model_id`) or the run's `artifact_path` as a new version of `name`.

    The version keeps the run id either way: the evaluate stage logs its figures into that run. A
    logged model is registered from its URI `models:/<model_id>`. Of `tags`, the version keeps the
    lineage keys (`card.VERSION_TAGS`); a logged model gets the model's own settings as parameters
    (a plain folder keeps them as tags); the stage's `metric.*` are its run's `final/*` metrics.
    The version's description is its card (components/registry/card.py).
    """
    from components.registry.card import refresh_card, registered_description, split_tags

    if (artifact_path is None) == (model_id is None):
        raise ValueError("give exactly one of artifact_path (a plain folder) or model_id (a logged model)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        model = client.get_registered_model(name)
        if model.description in (None, "", f"genpipe {name.removeprefix('genpipe-')}"):  # an older genpipe's
            client.update_registered_model(name, description=registered_description(name))
    except MlflowException:
        client.create_registered_model(name, description=registered_description(name))
    keep, settings = split_tags(tags)
    if model_id:
        if settings:
            client.log_model_params(model_id, settings)
    else:
        keep |= settings
    source = (
        f"models:/{model_id}" if model_id else f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    )
    with _process_tracking_uri(tracking_uri):
        version = client.create_model_version(name, source, run_id=run_id, tags=keep, model_id=model_id)
    if model_id:  # what `mlflow.register_model` adds: the Models tab's "Registered models" column reads it
        held = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
        listed, entry = json.loads(held or "[]"), {"name": name, "version": str(version.version)}
        if entry not in listed:  # a tracking server adds it itself
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])})
    refresh_card(client, name, str(version.version))
    return str(version.version)


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking URI at `uri` for a moment, then restore it and the env var.

    The sqlite registry resolves a `models:/<model_id>` source with a client on the global URI (an
    MLflow TODO in `SqlAlchemyStore.create_model_version`); a server resolves it on its side.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


# --- generators as pyfunc models from code ------------------------------------------------------
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
#: What the pyfunc model imports when it loads and samples, pinned to this environment's versions.
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow", "safetensors", "pydantic")


def pip_requirements() -> list[str]:
    """`dist==version` for each of REQUIREMENTS as installed here (local tags such as +cpu dropped)."""
    return [f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in REQUIREMENTS]


def tree_sha256(root: str | Path, pattern: str = "*") -> str:
    """sha256 over the files under `root` matching `pattern`: each relative path, NUL, its bytes."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class LoggedGenerator:
    model_id: str
    model_uri: str  # models:/<model_id>
    tags: dict[str, str]  # weights_sha256, code_sha256 (and tokenizer_sha256 for a two-stage model)
    seconds: float  # wall time of building, uploading and finalising the model


def log_generator(
    *,
    tracking_uri: str,
    run_id: str,
    model_dir: str | Path,
    name: str | None = None,
    code_dir: str | Path | None = None,
) -> LoggedGenerator:
    """Log the exported generator in `model_dir` as a pyfunc model from code, as an output of the run.

    `name` is what the experiment's Models tab lists (default: the registered name of the catalog
    model in `model_dir`, else the folder's name); `code_dir` is the `components` package logged
    with it (default: the one imported here).

    Explicit client calls, no fluent run or global tracking URI: a logged model in the run's
    experiment, the model saved locally by `mlflow.pyfunc.save_model` (no input example, so the
    sampler never runs at log time; pip requirements given, so none are inferred), then uploaded.
    """
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    import components
    from components.generators import TOKENIZER_DIR
    from components.registry.card import REQUEST_TAG
    from components.registry.pyfunc_model import GENERATOR_ARTIFACT
    from components.registry.serving import IMAGE, LABEL, SEED, describe, load

    start = time.perf_counter()
    model_dir = Path(model_dir)
    info = describe(load(str(model_dir), device="cpu"))  # also proves the folder loads
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    spec = next((m for m in catalog.MODELS if m.name == model_dir.name), None)
    logged = client.create_logged_model(
        experiment_id=experiment_id,
        name=name or (spec.registered if spec else model_dir.name),
        source_run_id=run_id,
        model_type="genpipe-generator",
    )
    try:
        with tempfile.TemporaryDirectory(prefix="genpipe-pyfunc-") as tmp, warnings.catch_warnings():
            # MLflow nags for an input example: one would run the sampler at log time.
            warnings.filterwarnings("ignore", message=".*input example.*")
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(CODE_FILE),
                artifacts={GENERATOR_ARTIFACT: str(model_dir)},
                code_paths=[str(code_dir or Path(components.__file__).parent)],
                pip_requirements=pip_requirements(),
                signature=ModelSignature(
                    outputs=Schema([ColSpec("string", IMAGE), ColSpec("long", LABEL), ColSpec("long", SEED)])
                ),
                metadata={"genpipe": info},
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=logged.model_id,
                    run_id=run_id,
                    model_id=logged.model_id,
                ),
            )
            for cache in list(local.rglob("__pycache__")):  # bytecode of this process, not the code
                shutil.rmtree(cache)
            tags = {
                "weights_sha256": tree_sha256(model_dir, "*.safetensors"),
                "code_sha256": tree_sha256(local / "code"),
            }
            if (model_dir / TOKENIZER_DIR).is_dir():
                tags["tokenizer_sha256"] = tree_sha256(model_dir / TOKENIZER_DIR, "*.safetensors")
            client.log_model_artifacts(logged.model_id, str(local))
        client.set_logged_model_tags(logged.model_id, {**tags, REQUEST_TAG: json.dumps(info, sort_keys=True)})
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return LoggedGenerator(
        model_id=logged.model_id,
        model_uri=f"models:/{logged.model_id}",
        tags=tags,
        seconds=time.perf_counter() - start,
    )


def set_alias(*, tracking_uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(name, alias, version)


def version_by_alias(*, tracking_uri: str, name: str, alias: str) -> str | None:
    """The version holding `alias`, or None."""
    try:
        return str(MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _model_version(client: MlflowClient, name: str, *, alias: str | None, version: str | None):
    """The ModelVersion of `name@alias` or `name` version `version`; a one-line LookupError naming what exists."""
    if (alias is None) == (version is None):
        raise ValueError("give exactly one of alias or version")
    try:
        held = client.get_registered_model(name).aliases or {}
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models("name LIKE 'genpipe-%'"))
        raise LookupError(f"no registered model {name!r}; registered: {', '.join(names) or 'none'}") from None
    try:
        return (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version!r}"
        valid = ", ".join(f"{a} (v{v})" for a, v in sorted(held.items())) or "none"
        raise LookupError(f"{name} has no {what}; its aliases: {valid}") from None


def generator_folder(path: str | Path) -> Path:
    """The exported folder in a downloaded version: the pyfunc model's `generator` artifact, or the folder itself."""
    path = Path(path)
    if not (path / "MLmodel").is_file():
        return path  # a plain folder (the evaluator, the tokenizer)
    from mlflow.models import Model

    from components.registry.pyfunc_model import GENERATOR_ARTIFACT

    artifacts = Model.load(str(path)).flavors["python_function"].get("artifacts", {})
    if GENERATOR_ARTIFACT not in artifacts:
        raise ValueError(f"{path} is an MLflow model without a genpipe {GENERATOR_ARTIFACT!r} artifact")
    return path / artifacts[GENERATOR_ARTIFACT]["path"]


def download(
    *, tracking_uri: str, name: str, alias: str | None = None, version: str | None = None, dst: str | Path
) -> Path:
    """Download `name@alias` (or `name` version `version`) into `dst`; returns its exported folder.

    For a generator that is the `generator` artifact inside the pyfunc model (`dst/artifacts/..`);
    for a plain folder version, the folder itself.
    """
    import mlflow.artifacts

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = _model_version(client, name, alias=alias, version=version)
    got = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(name, mv.version),
        dst_path=str(dst),
        tracking_uri=tracking_uri,
    )
    return generator_folder(got)


def logged_model_tags(tracking_uri: str, name: str, version: str) -> dict[str, str]:
    """The tags of the logged model a version was registered from ({} for a plain folder)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    model_id = logged_model_id(client.get_model_version(name, version))
    return dict(client.get_logged_model(model_id).tags) if model_id else {}


def version_settings(*, tracking_uri: str, name: str, version: str) -> dict[str, str]:
    """The model's own settings a training stage registered with it: its logged model's parameters."""
    client = MlflowClient(tracking_uri=tracking_uri)
    model_id = logged_model_id(client.get_model_version(name, version))
    return dict(client.get_logged_model(model_id).params) if model_id else {}


def load_pyfunc(
    *, tracking_uri: str, name: str, alias: str | None = None, version: str | None = None, cache: str | Path
):
    """`(pyfunc model, version)` of `name@alias`, downloaded once per logged model into `cache/<model_id>`.

    `mlflow.pyfunc.load_model("models:/..")` downloads into a fresh temporary folder on every call
    and never removes it; a logged model never changes, so its id is a safe cache key.
    """
    import mlflow.artifacts
    import mlflow.pyfunc

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = _model_version(client, name, alias=alias, version=version)
    model_id = logged_model_id(mv)
    if model_id is None:
        raise ValueError(
            f"{name} version {mv.version} is a plain folder, not a pyfunc model: only generators are "
            "logged as models, and only since genpipe logs them from code (retrain it: dvc repro)"
        )
    local = Path(cache) / model_id
    if not (local / "MLmodel").is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=local.parent, prefix=f".{model_id}.tmp-") as tmp:
            got = mlflow.artifacts.download_artifacts(
                artifact_uri=client.get_model_version_download_uri(name, mv.version),
                dst_path=tmp,
                tracking_uri=tracking_uri,
            )
            if not (local / "MLmodel").is_file():  # another process may have finished first
                shutil.rmtree(local, ignore_errors=True)  # an incomplete copy (no MLmodel)
                os.replace(got, local)
    return mlflow.pyfunc.load_model(str(local)), mv
