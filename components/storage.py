"""Object storage (S3, or any S3-compatible server: MinIO, Ceph, moto) as the one data plane nodes share.

Where is configured once, in the `storage` params section (endpoint, bucket, prefix, region); who is
never in params: credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE), as every S3 client reads them. The standard
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and AWS_REGION / AWS_DEFAULT_REGION override the params, as
MLFLOW_TRACKING_URI overrides `mlflow.tracking_uri`.

Every client here is a pyarrow S3FileSystem with a short connect timeout and few retries, so a wrong
endpoint fails in seconds, not minutes; its errors become one line naming the culprit (StorageError).
Prepared splits are published under `<prefix>/data/<DVC md5>/`: a DVC md5 names one content, so a
published prefix never changes and a re-run finds it there and uploads nothing.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from pydantic import Field, field_validator

from components.schema import StrictConfig

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # botocore's order: the S3-specific one wins
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
ENDPOINT_REGION = "us-east-1"  # S3-compatible servers take any region; SigV4 needs one
CONNECT_TIMEOUT_S = 3.0  # a refused or unroutable endpoint fails within attempts x this
REQUEST_TIMEOUT_S = 60.0  # one request; a multipart upload part of a large shard must fit
MAX_ATTEMPTS = 3  # the AWS SDK's "standard" retry mode default
COMPLETE = "_genpipe_complete.json"  # written last: a prefix without it is an unfinished upload
UPLOAD_THREADS = 8  # files in flight: S3 throughput comes from parallel requests
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's naming rules, less the rarer ones
MD5 = re.compile(r"^[0-9a-f]{32}(\.dir)?$")

Log = Callable[[str], None]


class StorageError(OSError):
    """The bucket cannot be used; the message is one line naming the culprit and the fix."""


class StorageConfig(StrictConfig):
    """The `storage` section: where the shared bucket is (credentials: the AWS environment variables)."""

    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS itself
    bucket: str | None = None  # None: no bucket; data, checkpoints and artefacts stay on local disk
    prefix: str = Field(default="genpipe", min_length=1)  # every key genpipe writes is under it
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1 with an endpoint

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            check_endpoint(v)
        return v

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str | None) -> str | None:
        if v is not None and (not BUCKET_NAME.match(v) or ".." in v):
            raise ValueError("an S3 bucket name: 3-63 lowercase letters, digits, '.' and '-' (no s3://)")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("/") or v.endswith("/") or any(p in ("", ".", "..") for p in v.split("/")):
            raise ValueError("a key prefix such as 'genpipe' or 'team/genpipe': no leading or trailing '/'")
        return v


def check_endpoint(url: str) -> None:
    """An endpoint is http(s)://host[:port] and nothing more; raise ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"endpoint {url!r}: expected http(s)://host[:port], e.g. http://127.0.0.1:9000")


@dataclass(frozen=True)
class Bucket:
    """A resolved bucket: the params with the environment's overrides applied."""

    name: str
    prefix: str
    endpoint_url: str | None  # None: AWS's own endpoints
    region: str | None

    def uri(self, *parts: str) -> str:
        """s3://<bucket>/<prefix>/<parts...>."""
        return "s3://" + "/".join([self.name, self.prefix, *parts])

    def filesystem(self) -> pafs.S3FileSystem:
        return s3_filesystem(endpoint_url=self.endpoint_url, region=self.region)

    def env(self) -> dict[str, str]:
        """What a child process (dvc, `mlflow server`, a Ray node) needs to reach the same endpoint.

        No credentials: they stay in the environment they came from.
        """
        out = {"AWS_ENDPOINT_URL_S3": self.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url}
        out |= {"AWS_DEFAULT_REGION": self.region}
        return {k: v for k, v in out.items() if v}


def env_endpoint(environ: Mapping[str, str] = os.environ) -> str | None:
    """AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, checked; raise StorageError naming the variable."""
    source = next((k for k in ENDPOINT_ENV if environ.get(k)), None)
    if source is None:
        return None
    try:
        check_endpoint(environ[source])
    except ValueError as err:
        raise StorageError(f"{source}: {err}") from None
    return environ[source]


def env_region(environ: Mapping[str, str] = os.environ) -> str | None:
    return next((environ[k] for k in REGION_ENV if environ.get(k)), None)


def resolve(cfg: StorageConfig, environ: Mapping[str, str] = os.environ) -> Bucket | None:
    """The configured bucket with the environment's endpoint and region; None when no bucket is set."""
    if cfg.bucket is None:
        return None
    endpoint = env_endpoint(environ) or cfg.endpoint_url  # the params' one was checked at load
    region = env_region(environ) or cfg.region or (ENDPOINT_REGION if endpoint else None)
    return Bucket(name=cfg.bucket, prefix=cfg.prefix, endpoint_url=endpoint, region=region)


def s3_filesystem(*, endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem that fails fast; credentials from the AWS chain of whichever process uses it.

    It pickles without credentials, so a Ray worker that unpickles it uses its own node's.
    """
    kw: dict = {"region": region} if region else {}
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        kw |= {"endpoint_override": parts.netloc, "scheme": parts.scheme}
    return pafs.S3FileSystem(
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        **kw,
    )


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key/... -> ("bucket", "key/..."); raise ValueError for anything else."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"{uri!r}: expected s3://<bucket>/<key>")
    return parts.netloc, parts.path.strip("/")


# --- errors -----------------------------------------------------------------------------------
def explain(err: BaseException, *, uri: str, endpoint: str | None) -> str:
    """One line naming what is wrong with reaching `uri`, from a pyarrow or botocore error."""
    bucket, _ = split_uri(uri)
    where = endpoint or "AWS S3"
    code = _code(err)
    if code in ("NETWORK_CONNECTION", "EndpointConnectionError", "ConnectTimeoutError", "ConnectionError"):
        return f"cannot connect to the S3 endpoint {where}: check storage.endpoint_url / AWS_ENDPOINT_URL_S3"
    if code in ("NO_SUCH_BUCKET", "NoSuchBucket", "404"):
        return f"bucket {bucket!r} does not exist at {where}: create it, or fix storage.bucket"
    if code in ("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "InvalidClientTokenId"):
        return f"access key {_masked_key()} is unknown to {where}: check AWS_ACCESS_KEY_ID"
    if code in ("SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch"):
        return f"wrong secret key for access key {_masked_key()} at {where}: check AWS_SECRET_ACCESS_KEY"
    if code in ("ACCESS_DENIED", "AccessDenied", "403"):
        return (
            f"access to bucket {bucket!r} at {where} denied to access key {_masked_key()}: "
            "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the key's permissions"
        )
    if code in ("NoCredentialsError", "INTERNAL_FAILURE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        return (
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{uri} at {where}: {first}"


def _code(err: BaseException) -> str:
    """The error's S3 code: botocore's Error.Code or class name, pyarrow's 'AWS Error <CODE>'."""
    response = getattr(err, "response", None)
    if isinstance(response, dict) and response.get("Error", {}).get("Code"):
        return str(response["Error"]["Code"])
    if found := re.search(r"AWS Error ([A-Z_]+)", str(err)):
        return found.group(1)
    return type(err).__name__


def _masked_key() -> str:
    key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    return f"{key[:4]}...{key[-4:]}" if len(key) > 8 else repr(key or "(not set)")


def check(uri: str, *, fs: pafs.FileSystem, endpoint: str | None, need_prefix: bool) -> None:
    """Reach `uri` with one listing request; raise StorageError naming the endpoint, bucket,
    credentials or (with need_prefix) the prefix that is wrong."""
    bucket, key = split_uri(uri)
    try:
        if not key:
            found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        else:  # a listing, not a HEAD: its error body tells a wrong key id from a wrong secret
            found = bool(fs.get_file_info(pafs.FileSelector(f"{bucket}/{key}")))
    except FileNotFoundError:  # the bucket is there (else NO_SUCH_BUCKET), the prefix is not
        found = False
    except OSError as err:
        raise StorageError(explain(err, uri=uri, endpoint=endpoint)) from err
    if not key and not found:
        raise StorageError(explain(OSError("AWS Error NO_SUCH_BUCKET"), uri=uri, endpoint=endpoint))
    if need_prefix and not found:
        raise StorageError(f"prefix {uri} holds no objects at {endpoint or 'AWS S3'}: check the path")


# --- Ray Train checkpoints --------------------------------------------------------------------
def ray_storage(path: str, environ: Mapping[str, str] = os.environ) -> dict:
    """RunConfig's storage keywords: an s3:// path through an S3 filesystem with the environment's
    endpoint (prefix-stripped, as Ray wants it with a filesystem), checked first; anything else as given."""
    if not path.startswith("s3://"):
        return {"storage_path": path}
    endpoint = env_endpoint(environ)
    fs = s3_filesystem(
        endpoint_url=endpoint, region=env_region(environ) or (ENDPOINT_REGION if endpoint else None)
    )
    bucket, key = split_uri(path)
    check(path, fs=fs, endpoint=endpoint, need_prefix=False)  # a new run's path need not exist yet
    return {"storage_path": f"{bucket}/{key}".rstrip("/"), "storage_filesystem": fs}


# --- prepared splits, published by DVC md5 ----------------------------------------------------
@dataclass(frozen=True)
class Published:
    """A folder in the bucket: pass `files` and `filesystem` to pyarrow or ray.data.read_parquet."""

    uri: str  # s3://bucket/prefix/data/<md5>
    path: str  # bucket/prefix/data/<md5>: the same, as a path on `filesystem`
    filesystem: pafs.S3FileSystem
    names: tuple[str, ...]  # file names relative to the folder, sorted
    uploaded: bool  # False: it was there already

    def files(self, pattern: str = "*") -> list[str]:
        """Paths on `filesystem` of the files whose name matches the glob `pattern` (e.g. 'train-*.parquet')."""
        from fnmatch import fnmatch

        return [f"{self.path}/{n}" for n in self.names if fnmatch(n, pattern)]


def data_uri(bucket: Bucket, md5: str) -> str:
    """Where the folder with DVC md5 `md5` ('<32 hex>.dir' as in dvc.lock) lives in the bucket."""
    if not MD5.match(md5):
        raise ValueError(f"md5={md5!r}: expected a DVC md5, 32 hex digits (with .dir for a folder)")
    return bucket.uri("data", md5.removesuffix(".dir"))


def publish(folder: str | Path, *, md5: str, bucket: Bucket, log: Log | None = None) -> Published:
    """Upload `folder` (a DVC-tracked output with DVC md5 `md5`) once to its immutable prefix.

    Skipped when the prefix is complete already (its COMPLETE marker lists the same file names and
    sizes; different ones mean a wrong md5, an error). The marker is written last, so an upload
    that died half-way is redone, never used.
    """
    folder = Path(folder)
    local = {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
    }
    if not local:
        raise StorageError(f"{folder}: no files to publish (missing or empty folder)")
    uri = data_uri(bucket, md5)
    fs = bucket.filesystem()
    check(bucket.uri(), fs=fs, endpoint=bucket.endpoint_url, need_prefix=False)
    path = uri.removeprefix("s3://")
    remote = _marker(fs, path, uri=uri, endpoint=bucket.endpoint_url)
    if remote is not None:
        if remote != local:
            raise StorageError(f"{uri} holds other files than {folder}: md5 {md5} does not describe {folder}")
        return Published(uri=uri, path=path, filesystem=fs, names=tuple(local), uploaded=False)
    try:
        _upload(folder, local, fs=fs, path=path, log=log or (lambda _: None))
        with fs.open_output_stream(f"{path}/{COMPLETE}") as out:
            out.write(json.dumps({"files": local}, sort_keys=True).encode())
    except OSError as err:
        raise StorageError(explain(err, uri=uri, endpoint=bucket.endpoint_url)) from err
    return Published(uri=uri, path=path, filesystem=fs, names=tuple(local), uploaded=True)


def published(bucket: Bucket, md5: str) -> Published:
    """The published folder with DVC md5 `md5`, for a node that has no local copy of it."""
    uri = data_uri(bucket, md5)
    fs = bucket.filesystem()
    check(uri, fs=fs, endpoint=bucket.endpoint_url, need_prefix=True)
    remote = _marker(fs, uri.removeprefix("s3://"), uri=uri, endpoint=bucket.endpoint_url)
    if remote is None:
        raise StorageError(f"{uri} is an unfinished upload (no {COMPLETE}): publish it again")
    return Published(
        uri=uri, path=uri.removeprefix("s3://"), filesystem=fs, names=tuple(remote), uploaded=False
    )


def _marker(fs: pafs.FileSystem, path: str, *, uri: str, endpoint: str | None) -> dict[str, int] | None:
    try:
        with fs.open_input_stream(f"{path}/{COMPLETE}") as f:
            return json.loads(f.read())["files"]
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StorageError(explain(err, uri=uri, endpoint=endpoint)) from err


def _upload(folder: Path, files: dict[str, int], *, fs: pafs.FileSystem, path: str, log: Log) -> None:
    total, done, t0 = sum(files.values()), 0, time.perf_counter()
    every = max(total // 10, 1)
    local = pafs.LocalFileSystem()

    def one(name: str) -> int:
        pafs.copy_files(
            str(folder / name), f"{path}/{name}", source_filesystem=local, destination_filesystem=fs
        )
        return files[name]

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for size in pool.map(one, files):
            before, done = done, done + size
            if done // every > before // every or done == total:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                eta = (total - done) / max(rate, 1e-9)
                log(
                    f"publish: {done / 1e6:.1f}/{total / 1e6:.1f} MB to s3://{path} ({rate / 1e6:.1f} MB/s, ETA {eta:.0f}s)"
                )
