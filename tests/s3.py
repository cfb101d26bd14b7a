"""A real S3-compatible server for tests: moto's server mode as its own process on a free port.

The one stand-in the project allows (no cloud here). It checks credentials like S3 does: the server
starts open, the fixture creates an IAM user with an s3:* policy, an access key and a bucket, then
turns authentication on, so a wrong key id or secret is refused as S3 would refuse it.

`s3_service()` is the reusable part (a context manager yielding endpoint, bucket and the env a
client process needs); the session fixture `s3` shares one server across every bucket test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import _answers, _wait, free_port, stop_group, unavailable

MOTO_INSTALL = "pip install 'moto[server]'"
REGION = "us-east-1"
S3_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@dataclass(frozen=True)
class S3:
    """A running server: its endpoint, one empty-at-start bucket, and the env that reaches it."""

    endpoint: str
    bucket: str
    env: dict[str, str]  # credentials, region, AWS_ENDPOINT_URL_S3 and MLFLOW_S3_ENDPOINT_URL
    folder: Path  # its log and scratch space

    def client(self):
        """A boto3 S3 client with the fixture's credentials (for tests to list and read keys)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every key in the bucket under `prefix`, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def moto_server_bin() -> Path | None:
    """The `moto_server` console script of this interpreter's environment, else on PATH."""
    here = Path(sys.executable).parent / "moto_server"
    found = here if here.exists() else shutil.which("moto_server")
    return Path(found) if found else None


@contextmanager
def s3_service(folder: Path | None = None, *, bucket: str = "genpipe-test") -> Iterator[S3]:
    """A moto S3 server with authentication on, an IAM user's key and `bucket`; stopped on exit."""
    binary = moto_server_bin()
    if binary is None:
        unavailable(f"moto_server not found: install it with `{MOTO_INSTALL}`")
    with ExitStack() as stack:
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="genpipe-s3-"))
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        port, log = free_port(), folder / "moto.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no real credentials
        with log.open("w") as out:
            proc = subprocess.Popen(
                [binary, "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        stack.callback(stop_group, proc, grace=5)
        endpoint = f"http://127.0.0.1:{port}"
        _wait(lambda: _answers(f"{endpoint}/moto-api/"), proc, log, "moto_server")
        yield S3(endpoint=endpoint, bucket=bucket, env=_provision(endpoint, bucket), folder=folder)


def _provision(endpoint: str, bucket: str) -> dict[str, str]:
    """An IAM user with s3:* and its key, then authentication on, then the bucket made with that key."""
    import boto3

    anyone = {"aws_access_key_id": "provisioning", "aws_secret_access_key": "provisioning"}
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, **anyone)
    iam.create_user(UserName="genpipe")
    iam.put_user_policy(UserName="genpipe", PolicyName="s3", PolicyDocument=json.dumps(S3_POLICY))
    key = iam.create_access_key(UserName="genpipe")["AccessKey"]
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # every later request is checked
        assert response.status == 200, response.read()
    env = {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",  # no 1-s probe of an instance metadata service
    }
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    s3.create_bucket(Bucket=bucket)
    return env


# One server per session, whichever test module asks first: a fixture imported into several modules is
# a separate fixture in each, so the server itself is kept here and stopped when the session ends.
_SHARED: list[S3] = []


@pytest.fixture(scope="session")
def s3(request, tmp_path_factory) -> S3:
    """The session's S3 server (moto), shared by all bucket tests."""
    if not _SHARED:
        stack = ExitStack()
        _SHARED.append(stack.enter_context(s3_service(tmp_path_factory.mktemp("s3"))))
        request.session.config.add_cleanup(stack.close)
    return _SHARED[0]


@pytest.fixture
def s3_env(s3: S3, monkeypatch) -> S3:
    """The session's server with its credentials and endpoint in this process's environment."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3
