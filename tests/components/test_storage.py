"""The bucket plumbing against a real S3-compatible server (moto, tests/s3.py) through pyarrow's S3 client.

Each bad input (wrong endpoint, missing bucket, unknown key id, wrong secret, missing prefix) is one
StorageError line naming the culprit, and a wrong endpoint fails in seconds. A published split reads
back as the same table, and publishing it again uploads nothing.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.storage import (
    COMPLETE,
    Bucket,
    StorageConfig,
    StorageError,
    check,
    explain,
    publish,
    published,
    ray_storage,
    resolve,
    s3_filesystem,
)
from tests import s3 as s3_fixtures
from tests.s3 import S3
from tests.services import free_port

s3, s3_env = s3_fixtures.s3, s3_fixtures.s3_env  # the session's S3 server (tests/s3.py)
MD5 = "0123456789abcdef0123456789abcdef.dir"


def _bucket(server: S3, **kw) -> Bucket:
    return Bucket(
        **{
            "name": server.bucket,
            "prefix": "unit",
            "endpoint_url": server.endpoint,
            "region": "us-east-1",
            **kw,
        }
    )


def _folder(tmp_path: Path) -> tuple[Path, pa.Table]:
    """A tiny prepared-data folder: two Parquet shards and a meta.json."""
    folder = tmp_path / "processed"
    folder.mkdir()
    table = pa.table(
        {
            "id": [f"i{k}" for k in range(6)],
            "image": [bytes([k]) * 5 for k in range(6)],
            "label": list(range(6)),
        }
    )
    pq.write_table(table.slice(0, 4), folder / "train-00000.parquet")
    pq.write_table(table.slice(4), folder / "train-00001.parquet")
    (folder / "meta.json").write_text('{"schema_version": 1}')
    return folder, table


def test_config_validates_and_the_environment_overrides_it():
    for bad in (
        {"bucket": "s3://b"},
        {"bucket": "Upper"},
        {"endpoint_url": "127.0.0.1:9000"},
        {"prefix": "/p"},
    ):
        with pytest.raises(ValueError):
            StorageConfig(**bad)
    cfg = StorageConfig(
        bucket="data-bkt", prefix="team/gp", endpoint_url="http://params:9000", region="eu-west-1"
    )
    assert resolve(StorageConfig()) is None  # no bucket: everything stays on local disk
    assert resolve(cfg, {}) == Bucket("data-bkt", "team/gp", "http://params:9000", "eu-west-1")
    env = {
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "https://s3env:2",
        "AWS_REGION": "r1",
    }
    bucket = resolve(cfg, env)
    assert (bucket.endpoint_url, bucket.region) == ("https://s3env:2", "r1")
    assert bucket.uri("data", "x") == "s3://data-bkt/team/gp/data/x"
    assert bucket.env() == {
        "AWS_ENDPOINT_URL_S3": "https://s3env:2",
        "MLFLOW_S3_ENDPOINT_URL": "https://s3env:2",
        "AWS_DEFAULT_REGION": "r1",
    }
    assert resolve(StorageConfig(bucket="data-bkt", endpoint_url="http://m:9000"), {}).region == "us-east-1"
    assert ray_storage("/abs/ray_results", {}) == {"storage_path": "/abs/ray_results"}
    with pytest.raises(StorageError, match=r"^AWS_ENDPOINT_URL_S3: endpoint 'minio:9000': expected http"):
        ray_storage("s3://data-bkt/ray", {"AWS_ENDPOINT_URL_S3": "minio:9000"})


def test_the_filesystem_travels_to_workers_without_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMTHEDRIVERENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "driver-secret-never-pickled")
    blob = pickle.dumps(s3_filesystem(endpoint_url="https://s3.example:9000", region="r1"))
    assert b"AKIAFROMTHEDRIVERENV" not in blob and b"driver-secret" not in blob
    fs = pickle.loads(blob)  # what a Ray worker gets: the endpoint and region only
    assert fs.region == "r1" and fs.equals(s3_filesystem(endpoint_url="https://s3.example:9000", region="r1"))


def test_each_bad_input_is_one_line_naming_the_culprit(s3_env, monkeypatch):
    fs = s3_filesystem(endpoint_url=s3_env.endpoint, region="us-east-1")
    check(f"s3://{s3_env.bucket}", fs=fs, endpoint=s3_env.endpoint, need_prefix=False)  # reachable

    refused = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(StorageError) as err:
        ray_storage(f"s3://{s3_env.bucket}/ray", {**s3_env.env, "AWS_ENDPOINT_URL_S3": refused})
    assert time.perf_counter() - t0 < 20  # bounded retries, not minutes (3 attempts, back-off < 1 s)
    cases = {"endpoint": (str(err.value), f"cannot connect to the S3 endpoint {refused}")}

    with pytest.raises(StorageError) as err:
        check("s3://no-such-bucket", fs=fs, endpoint=s3_env.endpoint, need_prefix=False)
    cases["bucket"] = (str(err.value), "bucket 'no-such-bucket' does not exist")
    with pytest.raises(StorageError) as err:  # a listing too: the bucket is named, not a bare 404
        check("s3://no-such-bucket/some/prefix", fs=fs, endpoint=s3_env.endpoint, need_prefix=True)
    cases["bucket, listed"] = (str(err.value), "bucket 'no-such-bucket' does not exist")
    with pytest.raises(StorageError) as err:
        published(_bucket(s3_env, prefix="not-there"), MD5)
    cases["prefix"] = (
        str(err.value),
        f"prefix s3://{s3_env.bucket}/not-there/data/{MD5[:32]} holds no objects",
    )

    secret = s3_env.env["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret[:-4] + "XXXX")
    with pytest.raises(StorageError) as err:
        check(
            f"s3://{s3_env.bucket}/unit",
            fs=s3_filesystem(endpoint_url=s3_env.endpoint, region="us-east-1"),
            endpoint=s3_env.endpoint,
            need_prefix=False,
        )
    cases["secret"] = (str(err.value), "wrong secret key for access key AKIA...")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    with pytest.raises(StorageError) as err:
        ray_storage(f"s3://{s3_env.bucket}/ray", dict(s3_env.env))
    cases["key id"] = (str(err.value), "access key AKIA...0000 is unknown to")
    with pytest.raises(StorageError) as err:  # the bucket alone is a HEAD, whose 403 has no body
        check(
            f"s3://{s3_env.bucket}",
            fs=s3_filesystem(endpoint_url=s3_env.endpoint, region="us-east-1"),
            endpoint=s3_env.endpoint,
            need_prefix=False,
        )
    cases["key id, HEAD"] = (str(err.value), "denied to access key AKIA...0000: check AWS_ACCESS_KEY_ID")
    for what, (message, culprit) in cases.items():
        assert culprit in message and "\n" not in message, (what, message)
        assert secret not in message and secret[:-4] not in message, what


def test_a_published_split_reads_back_and_is_uploaded_once(s3_env, tmp_path):
    folder, table = _folder(tmp_path)
    bucket = _bucket(s3_env, prefix="publish")
    lines: list[str] = []
    first = publish(folder, md5=MD5, bucket=bucket, log=lines.append)
    assert first.uploaded and first.uri == f"s3://{s3_env.bucket}/publish/data/{MD5[:32]}"
    assert lines and lines[-1].startswith("publish: 0.0/0.0 MB") and "MB/s, ETA" in lines[-1]
    keys = s3_env.keys("publish/")
    assert keys == sorted(f"publish/data/{MD5[:32]}/{n}" for n in (*first.names, COMPLETE))
    stamps = {
        o["Key"]: o["LastModified"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket)["Contents"]
    }

    again = publish(folder, md5=MD5, bucket=bucket)  # a re-run: immutable prefix, nothing uploaded
    assert not again.uploaded and again.names == first.names
    now = {
        o["Key"]: o["LastModified"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket)["Contents"]
    }
    assert now == stamps

    remote = published(bucket, MD5)  # a node without the folder
    read = pq.read_table(remote.files("train-*.parquet"), filesystem=remote.filesystem)
    assert read.sort_by("id").equals(table.sort_by("id").cast(read.schema))

    (folder / "meta.json").write_text('{"schema_version": 2, "other": true}')  # other content, same md5
    with pytest.raises(StorageError, match="does not describe"):
        publish(folder, md5=MD5, bucket=bucket)
    with pytest.raises(StorageError, match="no files to publish"):
        publish(tmp_path / "missing", md5=MD5, bucket=bucket)
    with pytest.raises(ValueError, match="expected a DVC md5"):
        publish(folder, md5="not-an-md5", bucket=bucket)


def test_an_unfinished_upload_is_redone_not_used(s3_env, tmp_path):
    folder, _ = _folder(tmp_path)
    bucket = _bucket(s3_env, prefix="unfinished")
    s3_env.client().put_object(
        Bucket=s3_env.bucket, Key=f"unfinished/data/{MD5[:32]}/train-00000.parquet", Body=b"torn"
    )
    with pytest.raises(StorageError, match="unfinished upload"):
        published(bucket, MD5)
    assert publish(folder, md5=MD5, bucket=bucket).uploaded
    body = s3_env.client().get_object(
        Bucket=s3_env.bucket, Key=f"unfinished/data/{MD5[:32]}/train-00000.parquet"
    )
    assert body["Body"].read() == (folder / "train-00000.parquet").read_bytes()


def test_botocore_errors_and_missing_credentials_get_the_same_lines(s3_env, monkeypatch):
    import boto3
    from botocore.config import Config

    def boto_error(**kw) -> str:
        client = boto3.client("s3", config=Config(retries={"max_attempts": 1}), **kw)
        with pytest.raises(Exception) as err:
            client.list_objects_v2(Bucket=kw.pop("bucket", s3_env.bucket), MaxKeys=1)
        return explain(err.value, uri=f"s3://{s3_env.bucket}/x", endpoint=s3_env.endpoint)

    assert boto_error(
        endpoint_url=s3_env.endpoint,
        aws_access_key_id=s3_env.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key="wrong",
    ).startswith("wrong secret key")
    refused = f"http://127.0.0.1:{free_port()}"
    assert boto_error(endpoint_url=refused).startswith("cannot connect to the S3 endpoint")
    client = boto3.client("s3", endpoint_url=s3_env.endpoint)
    with pytest.raises(Exception) as err:
        client.list_objects_v2(Bucket="no-such-bucket")
    assert explain(err.value, uri="s3://no-such-bucket", endpoint=s3_env.endpoint).startswith(
        "bucket 'no-such-bucket' does not exist"
    )

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")  # no ~/.aws of this machine
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StorageError, match="^no S3 credentials for s3://"):
        check(
            f"s3://{s3_env.bucket}/x",
            fs=s3_filesystem(endpoint_url=s3_env.endpoint, region="us-east-1"),
            endpoint=s3_env.endpoint,
            need_prefix=False,
        )
