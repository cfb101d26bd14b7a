"""MLflow model registry: versions with lineage tags, aliases, and loading `name@alias`.

A registered version points at the run artifacts holding `model.safetensors` + `config.json`; no
pickled model is ever logged or loaded.
"""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

FAMILIES = (
    "evaluator",
    "tokenizer",
    "prior-gpt",
    "prior-maskgit",
    "diffusion",
    "latent-diffusion",
    "vae",
    "gan",
    "wgan",
    "flow",
    "pixelcnn",
)
CHALLENGER, CHAMPION = "challenger", "champion"


def registered_name(family: str) -> str:
    """`genpipe-<family>`; an unknown family is an error naming the valid ones."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {list(FAMILIES)}")
    return f"genpipe-{family}"


def register_version(
    *, tracking_uri: str, name: str, run_id: str, artifact_path: str, tags: dict[str, str]
) -> str:
    """Register the run's `artifact_path` as a new version of `name`; returns the version."""
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"genpipe {name.removeprefix('genpipe-')}")
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
    )
    return str(version.version)


def set_alias(*, tracking_uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(name, alias, version)


def version_by_alias(*, tracking_uri: str, name: str, alias: str) -> str | None:
    """The version holding `alias`, or None."""
    try:
        return str(MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def list_versions(*, tracking_uri: str, name: str | None = None) -> list[dict]:
    """Every version (of `name`, or of every genpipe model) with its aliases and tags."""
    client = MlflowClient(tracking_uri=tracking_uri)
    query = f"name='{name}'" if name else "name LIKE 'genpipe-%'"
    rows, aliases = [], {}
    for mv in client.search_model_versions(query):
        if mv.name not in aliases:  # search results carry no aliases; the registered model does
            held = client.get_registered_model(mv.name).aliases or {}
            aliases[mv.name] = {
                str(v): sorted(a for a, w in held.items() if str(w) == str(v)) for v in held.values()
            }
        rows.append(
            {
                "name": mv.name,
                "version": str(mv.version),
                "aliases": aliases[mv.name].get(str(mv.version), []),
                "run_id": mv.run_id,
                "tags": dict(mv.tags),
            }
        )
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def download(
    *, tracking_uri: str, name: str, alias: str | None = None, version: str | None = None, dst: str | Path
) -> Path:
    """Download the files of `name@alias` (or `name` version `version`) into `dst`."""
    import mlflow.artifacts

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if (alias is None) == (version is None):
        raise ValueError("give exactly one of alias or version")
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException:
        raise LookupError(
            f"no version of {name} with {'alias ' + alias if alias else 'version ' + str(version)}"
        ) from None
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=str(dst), tracking_uri=tracking_uri
        )
    )


def version_by_tag(*, tracking_uri: str, name: str, key: str, value: str) -> dict | None:
    """The newest version of `name` whose tag `key` equals `value` (e.g. its model_sha256), or None."""
    matches = [r for r in list_versions(tracking_uri=tracking_uri, name=name) if r["tags"].get(key) == value]
    return matches[-1] if matches else None


def record_evaluation(
    *,
    tracking_uri: str,
    name: str,
    version: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    artifact: Path,
) -> None:
    """Evaluation figures into the version's run (metrics `eval/*`, the grid) and onto the version (tags)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = client.get_model_version(name, version).run_id
    for k, v in metrics.items():
        client.log_metric(run_id, f"eval/{k}", float(v))
    client.log_artifact(run_id, str(artifact), "evaluate")
    for k, v in {**{f"eval.{k}": f"{v:.6g}" for k, v in metrics.items()}, **tags}.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_registered_model_alias(name, CHALLENGER, version)
