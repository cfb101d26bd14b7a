"""MLflow artefacts in the bucket: a real `mlflow server --artifacts-destination s3://...` over moto.

Only the server holds the bucket's credentials (MLFLOW_S3_ENDPOINT_URL and the AWS variables); the
client logs through the server's artefact proxy, as a Ray worker on another node would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlflow import MlflowClient

from components.registry.registry import log_generator
from tests import s3 as s3_fixtures
from tests.components.registry.tiny_generators import pixel_diffusion
from tests.services import mlflow_server

s3 = s3_fixtures.s3  # the session's S3 server


def test_a_runs_artefacts_and_logged_model_land_in_the_bucket(s3, tmp_path, monkeypatch):
    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL_S3",
        "MLFLOW_S3_ENDPOINT_URL",
    ):
        monkeypatch.delenv(key, raising=False)  # the client never talks to the bucket itself
    # Downloads stream through the server: moto answers a presigned URL (the server's default for an
    # S3 store, fetched by the client straight from the bucket) with a 500 once authentication is on.
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    destination = f"s3://{s3.bucket}/mlflow"
    with mlflow_server(store, tmp_path / "server", artifacts=destination, extra_env=s3.env) as url:
        client = MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("bucket")
        run_id = client.create_run(experiment).info.run_id
        note = tmp_path / "note.txt"
        note.write_text("a run's artefact\n")
        client.log_artifact(run_id, str(note), artifact_path="notes")
        key = f"mlflow/{experiment}/{run_id}/artifacts/notes/note.txt"
        assert key in s3.keys("mlflow/")
        assert s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read() == note.read_bytes()
        back = client.download_artifacts(run_id, "notes/note.txt", str(tmp_path / "back"))
        assert Path(back).read_text() == note.read_text()

        model_dir = pixel_diffusion(tmp_path / "models" / "diffusion_pixel")  # a tiny exported generator
        log_generator(tracking_uri=url, run_id=run_id, model_dir=model_dir)  # as the training stages log it
        weights = model_dir / "model.safetensors"
        stored = [k for k in s3.keys("mlflow/") if k.endswith("/model.safetensors")]
        assert len(stored) == 1, stored
        body = s3.client().get_object(Bucket=s3.bucket, Key=stored[0])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not (tmp_path / "server" / "artifacts").exists()  # nothing on the server's local disk
