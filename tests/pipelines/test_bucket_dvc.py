"""The DVC remote in the bucket: real `dvc push` through dvc-s3 to moto, a fresh clone, `dvc pull`.

The remote's endpoint goes in the repo's DVC config (`endpointurl`); credentials only in the
environment, so nothing secret is committed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tests import s3 as s3_fixtures
from tests.conftest import BIN, run

s3 = s3_fixtures.s3  # the session's S3 server
DVC = str(BIN / "dvc")


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _git_repo(path: Path) -> Path:
    path.mkdir()
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@genpipe"],
        ["git", "config", "user.name", "t"],
    ):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)
    return path


def test_dvc_push_then_a_fresh_clone_pulls_identical_files(s3, tmp_path):
    env = {**s3.env, "DVC_NO_ANALYTICS": "1"}
    repo = _git_repo(tmp_path / "repo")
    data = repo / "data" / "processed"
    data.mkdir(parents=True)
    (data / "train-00000.parquet").write_bytes(bytes(range(256)) * 40)
    (data / "meta.json").write_text('{"schema_version": 1}\n')
    run([DVC, "init", "-q"], repo, **env)
    remote = f"s3://{s3.bucket}/dvc-test/dvc"
    run([DVC, "remote", "add", "-d", "bucket", remote], repo, **env)
    run([DVC, "remote", "modify", "bucket", "endpointurl", s3.endpoint], repo, **env)
    run([DVC, "add", "-q", "data/processed"], repo, **env)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "data"], repo)
    config = (repo / ".dvc" / "config").read_text()
    assert s3.endpoint in config and s3.env["AWS_SECRET_ACCESS_KEY"] not in config
    run([DVC, "push", "-q"], repo, **env)
    assert len([k for k in s3.keys("dvc-test/dvc/files/md5/")]) == 3  # two files and the .dir listing

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data" / "processed").exists()
    run([DVC, "pull", "-q"], clone, **env)
    assert _tree(clone / "data" / "processed") == _tree(data)

    # Bad input through DVC's own messages: each names the remote or the bucket and the reason.
    wrong = run([DVC, "pull", "--force"], clone, check=False, **{**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert wrong.returncode != 0
    assert (
        f"failed to connect to s3 ({s3.bucket}/dvc-test/dvc" in wrong.stderr and "Forbidden" in wrong.stderr
    )
    run([DVC, "remote", "modify", "bucket", "url", f"s3://no-such-{s3.bucket}/dvc"], clone, **env)
    missing = run([DVC, "push"], clone, check=False, **env)
    assert missing.returncode != 0 and "The specified bucket does not exist" in missing.stderr


def test_a_folder_is_published_only_while_it_matches_its_dvc_record(s3, tmp_path, monkeypatch):
    """publish_data keys the bucket's copy by the DVC md5 in dvc.lock: a folder changed since (even
    one byte, at the same size and file count) is refused in one line, not uploaded under a wrong key."""
    import yaml

    from components.data.shards import SCHEMA_VERSION
    from components.storage import StorageConfig, StorageError
    from pipelines.bucket import dvc_md5, publish_data

    env = {**s3.env, "DVC_NO_ANALYTICS": "1"}
    repo = _git_repo(tmp_path / "repo")
    data = repo / "data" / "processed"
    data.mkdir(parents=True)
    (data / "train-00000.parquet").write_bytes(bytes(range(256)) * 40)
    meta = {"schema_version": SCHEMA_VERSION, "shards": {"train": ["train-00000.parquet"], "val": []}}
    (data / "meta.json").write_text(json.dumps(meta))
    run([DVC, "init", "-q"], repo, **env)
    run([DVC, "add", "-q", "data/processed"], repo, **env)
    record = yaml.safe_load((repo / "data" / "processed.dvc").read_text())["outs"][0]
    assert dvc_md5(data) == record["md5"]  # what `dvc add` (and dvc.lock) records
    record["path"] = "data/processed"  # a .dvc file's paths are relative to it, dvc.lock's to the root
    (repo / "dvc.lock").write_text(yaml.safe_dump({"stages": {"prepare": {"outs": [record]}}}))

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GENPIPE_ROOT", str(repo))
    monkeypatch.setenv("GENPIPE_IN_DRIVER_BYTES", "0")  # every split is read by Ray Data: publish
    sections = {"storage": StorageConfig(bucket=s3.bucket, prefix="publish-test")}
    published = publish_data(sections, data)
    assert published is not None and published.uploaded
    assert published.uri.endswith(record["md5"].removesuffix(".dir"))
    assert not publish_data(sections, data).uploaded  # once

    shard = data / "train-00000.parquet"
    shard.write_bytes(b"\x01" + shard.read_bytes()[1:])  # same size, same file count
    with pytest.raises(StorageError, match="data/processed differs from its record in dvc.lock"):
        publish_data(sections, data)
