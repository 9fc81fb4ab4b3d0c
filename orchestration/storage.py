"""S3 object storage for data sets, pretrained weights, checkpoints and sweep outputs.

`S3Storage` wraps one boto3 S3 client (any S3-compatible endpoint) and adds what training needs on
top of plain transfers: every upload stores the content's sha256 in the object's metadata and every
download is checked against it; `sync_to_cache` mirrors a prefix (or one object) into a worker-local
cache, skipping what is already there and verified, writing through temporary files and atomic
renames so that a crash never leaves a partial file under its final name. Credentials come only from
the standard AWS chain (environment, shared files, web identity, container / instance metadata):
they are never arguments, never logged, and botocore's own DEBUG records are scrubbed of signing
material. Failures surface as one-line `StorageError`s that name the URI.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bx
from botocore.config import Config
from tqdm import tqdm

log = logging.getLogger(__name__)

# Retries. botocore's "standard" mode retries throttling, 5xx and connection errors with exponential
# backoff (base 2, full jitter, capped at 20 s; botocore docs, "Retries" guide); its default of 3 total
# attempts is too few for long sweeps on shared stores, 5 rides out ~30 s of trouble. "adaptive" adds
# client-side rate limiting for stores that throttle hard.
MAX_ATTEMPTS = 5
RETRY_MODES = ("standard", "adaptive")
CONNECT_TIMEOUT_S = 10  # fail fast on a wrong endpoint; botocore's default is 60 s
READ_TIMEOUT_S = 60  # botocore's default
# Our own retry on top: a sha256 mismatch (or the object changing under us, HTTP 412) re-downloads
# up to this many times in all, sleeping 0.5 s, 1 s, ... between tries.
CHECKSUM_ATTEMPTS = 3
CHECKSUM_BACKOFF_S = 0.5
# Multipart above 64 MiB in 64 MiB parts, 4 parts in flight: 2-core workers (docs/platform.md) gain
# nothing from boto3's default of 10 threads.
TRANSFER = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=4)
PROGRESS_MIN_BYTES = 16 * 2**20  # below this a progress bar is noise
SYNC_WORKERS = 8  # concurrent HEAD / GET requests while syncing a prefix (network-bound, not CPU)
SHA256_META = "sha256"  # stored as x-amz-meta-sha256

CREDENTIAL_SOURCES = (
    "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), AWS_PROFILE in "
    "AWS_SHARED_CREDENTIALS_FILE (~/.aws/credentials) / AWS_CONFIG_FILE (~/.aws/config), "
    "AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN, SSO, container or instance metadata")


class StorageError(RuntimeError):
    """An S3 operation failed; the message names the URI."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The bucket or the key (prefix) does not exist."""


class ChecksumMismatchError(StorageError):
    """Downloaded bytes do not match the sha256 recorded on the object."""


class CredentialsError(StorageError):
    """No credentials were found in the standard AWS chain."""


class _ObjectChanged(StorageError):
    """HTTP 412 on an If-Match read: the object was replaced between HEAD and GET."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    sha256: str | None = None  # only known after a HEAD


def have_credentials() -> bool:
    """Whether the standard AWS chain finds any credentials (nothing is sent anywhere)."""
    return boto3.session.Session().get_credentials() is not None


def is_s3_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"); the key may be empty or end in '/'."""
    if not is_s3_uri(uri):
        raise ValueError(f"uri={uri!r} is not an S3 URI; expected s3://bucket/key")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"uri={uri!r} has no bucket name; expected s3://bucket/key")
    return bucket, key


def sha256_file(path: str | Path, chunk: int = 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _Redact(logging.Filter):
    """Scrubs signing material from botocore's DEBUG records (it logs full request headers)."""

    PATTERNS = (re.compile(r"(Credential=)[^/,\s'\"]+"), re.compile(r"(Signature=)[0-9a-fA-F]+"),
                re.compile(r"((?:X-Amz-Security-Token|x-amz-security-token)['\"]?\s*[:=]\s*b?['\"]?)[^'\",\s&]+"))

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        scrubbed = text
        for pattern in self.PATTERNS:
            scrubbed = pattern.sub(r"\1***", scrubbed)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            value = os.environ.get(name)
            if value and len(value) >= 8:
                scrubbed = scrubbed.replace(value, "***")
        if scrubbed != text:
            record.msg, record.args = scrubbed, None
        return True


_REDACT = _Redact()


def _install_redaction() -> None:
    # Logger-level filters apply to records created on that logger only, so attach to each one.
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("botocore", "boto3", "s3transfer", "urllib3"):
            logger = logging.getLogger(name)
            if _REDACT not in logger.filters:
                logger.addFilter(_REDACT)


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    # disable=None: tqdm turns itself off when stderr is not a terminal (Ray worker logs, CI).
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False,
                disable=None if enabled and total >= PROGRESS_MIN_BYTES else True)


class S3Storage:
    """One S3 client. endpoint_url (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) selects an S3-compatible
    store; credentials always come from the standard AWS chain."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None,
                 max_attempts: int = MAX_ATTEMPTS, retry_mode: str = "standard", progress: bool = True,
                 workers: int = SYNC_WORKERS):
        if retry_mode not in RETRY_MODES:
            raise ValueError(f"retry_mode={retry_mode!r} is not allowed; expected one of: {', '.join(RETRY_MODES)}")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.progress, self.workers = progress, max(1, workers)
        config = Config(retries={"max_attempts": max_attempts, "mode": retry_mode},
                        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                        max_pool_connections=max(10, 2 * self.workers),
                        # S3-compatible stores on an IP / localhost have no per-bucket DNS names.
                        s3={"addressing_style": "path"} if self.endpoint_url else None)
        self.client = boto3.session.Session(region_name=region).client(
            "s3", endpoint_url=self.endpoint_url, config=config)
        _install_redaction()

    # -- errors -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, uri: str, action: str):
        _install_redaction()  # again: botocore / s3transfer create some loggers on first use
        try:
            yield
        except (bx.NoCredentialsError, bx.PartialCredentialsError):
            raise CredentialsError(f"cannot {action} {uri}: no AWS credentials found; consulted "
                                   f"{CREDENTIAL_SOURCES}") from None
        except bx.EndpointConnectionError:
            where = self.endpoint_url or "AWS default"
            raise StorageError(f"cannot {action} {uri}: S3 endpoint {where} is unreachable") from None
        except bx.ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "?"))
            if code == "NoSuchBucket":
                bucket = parse_s3_uri(uri)[0]
                raise ObjectNotFoundError(f"cannot {action} {uri}: bucket {bucket!r} does not exist") from None
            if code in ("412", "PreconditionFailed"):
                raise _ObjectChanged(f"{uri} changed while being read") from None
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFoundError(f"cannot {action} {uri}: no such object") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(f"cannot {action} {uri}: access denied ({code}); check the "
                                   "credentials from the standard AWS chain") from None
            raise StorageError(f"cannot {action} {uri}: {code} {err.get('Message', '')}".rstrip()) from None
        except bx.BotoCoreError as exc:
            raise StorageError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}") from None
        except S3UploadFailedError as exc:  # boto3's transfer manager wraps the ClientError in its own type
            raise StorageError(f"cannot {action} {uri}: {str(exc).splitlines()[0][:300]}") from None

    def check_bucket(self, bucket: str) -> None:
        """Raises (botocore's error) unless the bucket exists and these credentials may use it."""
        self.client.head_bucket(Bucket=bucket)

    # -- objects ----------------------------------------------------------------------------------
    def head(self, uri: str) -> ObjectInfo:
        bucket, key = parse_s3_uri(uri)
        with self._errors(uri, "read"):
            resp = self.client.head_object(Bucket=bucket, Key=key)
        return ObjectInfo(key, resp["ContentLength"], resp["ETag"], resp.get("Metadata", {}).get(SHA256_META))

    def exists(self, uri: str) -> bool:
        try:
            self.head(uri)
        except ObjectNotFoundError:
            return False
        return True

    def list_objects(self, uri: str, shown: str | None = None) -> list[ObjectInfo]:
        """Every object whose key starts with the URI's key (directory markers left out); errors name
        `shown` (the URI the caller was given) when set."""
        bucket, prefix = parse_s3_uri(uri)
        out: list[ObjectInfo] = []
        with self._errors(shown or uri, "list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out += [ObjectInfo(o["Key"], o["Size"], o["ETag"]) for o in page.get("Contents", ())
                        if not o["Key"].endswith("/")]
        return out

    def upload_file(self, local: str | Path, uri: str) -> str:
        """Uploads one file with its sha256 in the object metadata; returns the sha256."""
        local = Path(local)
        if not local.is_file():
            raise FileNotFoundError(f"local file {local} does not exist")
        bucket, key = parse_s3_uri(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"uri={uri!r} names a prefix; expected s3://bucket/key for a file")
        digest = sha256_file(local)
        with self._errors(uri, "upload to"), _progress(local.stat().st_size, key, self.progress) as bar:
            self.client.upload_file(str(local), bucket, key, ExtraArgs={"Metadata": {SHA256_META: digest}},
                                    Config=TRANSFER, Callback=bar.update)
        log.debug("uploaded %s -> %s (sha256 %s)", local, uri, digest[:12])
        return digest

    def download_file(self, uri: str, local: str | Path, require_checksum: bool = False) -> str:
        """Downloads one object, verified against its metadata sha256; returns the sha256."""
        return self._download(uri, Path(local), self.head(uri), require_checksum)

    def _download(self, uri: str, dest: Path, info: ObjectInfo, require_checksum: bool = False,
                  bar: tqdm | None = None) -> str:
        bucket, key = parse_s3_uri(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if info.sha256 is None and require_checksum:
            raise ChecksumMismatchError(f"{uri} has no sha256 metadata; upload it with S3Storage.upload_file")
        for attempt in range(CHECKSUM_ATTEMPTS):
            # A unique hidden name beside the target: same file system for the atomic rename, and two
            # processes syncing the same cache never write into each other's file.
            tmp = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:8]}")
            own_bar = bar is None
            pbar = _progress(info.size, key, self.progress) if own_bar else bar
            try:
                with self._errors(uri, "download"):
                    # s3transfer pins the ranged GETs of a multipart download to one ETag (HTTP 412 if
                    # the object is replaced meanwhile); the sha256 check catches any other change.
                    self.client.download_file(bucket, key, str(tmp), Config=TRANSFER, Callback=pbar.update)
                got = sha256_file(tmp)
                if info.sha256 is None or got == info.sha256:
                    if (size := tmp.stat().st_size) != info.size:
                        raise StorageError(f"{uri}: downloaded {size} bytes, expected {info.size}")
                    os.replace(tmp, dest)
                    return got
                problem = f"sha256 {got[:12]}... of the downloaded bytes != metadata sha256 {info.sha256[:12]}..."
            except _ObjectChanged:
                problem = "the object changed during the download"
            finally:
                tmp.unlink(missing_ok=True)
                if own_bar:
                    pbar.close()
            log.warning("%s: %s (attempt %d/%d)", uri, problem, attempt + 1, CHECKSUM_ATTEMPTS)
            if attempt + 1 < CHECKSUM_ATTEMPTS:
                time.sleep(CHECKSUM_BACKOFF_S * 2**attempt)
                info = self.head(uri)  # it may have been re-uploaded meanwhile
        raise ChecksumMismatchError(f"{uri}: {problem} after {CHECKSUM_ATTEMPTS} attempts")

    # -- prefixes ---------------------------------------------------------------------------------
    def upload_dir(self, local_dir: str | Path, uri: str, skip_unchanged: bool = True) -> int:
        """Uploads a directory tree under the prefix; returns how many files were sent."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"local directory {local_dir} does not exist")
        base = uri.rstrip("/")
        remote = {o.key: o for o in self.list_objects(base + "/")} if skip_unchanged else {}
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and ".part-" not in p.name)

        def one(path: Path) -> int:
            target = f"{base}/{path.relative_to(local_dir).as_posix()}"
            known = remote.get(parse_s3_uri(target)[1])
            if known and known.size == path.stat().st_size and self.head(target).sha256 == sha256_file(path):
                return 0
            self.upload_file(path, target)
            return 1

        with cf.ThreadPoolExecutor(self.workers) as pool:
            return sum(pool.map(one, files))

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Mirrors the prefix into local_dir (see `sync_to_cache`); returns local_dir."""
        bucket, prefix = parse_s3_uri(uri)
        prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        objects = self.list_objects(f"s3://{bucket}/{prefix}", shown=uri)
        if not objects:
            raise ObjectNotFoundError(f"cannot download {uri}: no such object or prefix")
        self._sync(bucket, prefix, Path(local_dir), objects, prune=True)
        return Path(local_dir)

    def sync_to_cache(self, uri: str, cache_dir: str | Path) -> Path:
        """Mirrors an object or a prefix into <cache_dir>/<bucket>/<key> and returns that local path.

        Files already there whose size and sha256 match the object are kept; a small state file beside
        the mirror remembers (size, mtime, ETag, sha256) so that an unchanged cache costs one LIST and
        no hashing. Every fetched file is verified before its atomic rename.
        """
        bucket, key = parse_s3_uri(uri)
        root = Path(cache_dir).expanduser().resolve() / bucket
        if key and not key.endswith("/"):
            try:
                info = self.head(uri)
            except ObjectNotFoundError:
                info = None  # not an object: try it as a prefix
            if info is not None:
                parent, _, _ = key.rpartition("/")
                self._sync(bucket, parent + "/" if parent else "", root / parent, [info], prune=False)
                return root / key
        return self.download_dir(uri, root / key.rstrip("/") if key else root)

    def _sync(self, bucket: str, prefix: str, dest: Path, objects: list[ObjectInfo], prune: bool) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        state_path = dest.parent / f".{dest.name}.s4mc-sync.json"
        # One sync of a mirror at a time per machine: parallel trials on a node share the cache.
        with open(dest.parent / f".{dest.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(state_path.read_text()) if state_path.is_file() else {}
            wanted: dict[str, ObjectInfo] = {}
            for obj in objects:
                rel = obj.key[len(prefix):]
                if rel.startswith("/") or ".." in Path(rel).parts:
                    raise StorageError(f"s3://{bucket}/{obj.key}: key escapes the mirror directory")
                wanted[rel] = obj
            todo = [rel for rel, obj in wanted.items() if not self._fresh(dest / rel, obj, state.get(rel))]
            guard = threading.Lock()

            def fetch(rel: str) -> None:
                path, uri = dest / rel, f"s3://{bucket}/{wanted[rel].key}"
                info = self.head(uri)
                if path.is_file() and path.stat().st_size == info.size and info.sha256 == sha256_file(path):
                    digest = info.sha256  # already present and intact: adopt it
                    bar.update(info.size)
                else:
                    digest = self._download(uri, path, info, bar=bar)
                stat = path.stat()
                with guard:
                    state[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "etag": info.etag,
                                  "sha256": digest}

            total = sum(wanted[rel].size for rel in todo)
            try:
                with _progress(total, f"sync s3://{bucket}/{prefix}", self.progress) as bar, \
                        cf.ThreadPoolExecutor(self.workers) as pool:
                    list(pool.map(fetch, todo))
            finally:
                # Remove what we mirrored earlier and the store no longer has, then save the state even
                # after a failure so the files already verified are not fetched again.
                for rel in [r for r in state if r not in wanted] if prune else ():
                    (dest / rel).unlink(missing_ok=True)
                    del state[rel]
                tmp = state_path.with_name(state_path.name + f".{os.getpid()}")
                tmp.write_text(json.dumps(state, indent=0, sort_keys=True))
                os.replace(tmp, state_path)
            log.info("synced s3://%s/%s -> %s (%d fetched or verified, %d cached)", bucket, prefix, dest,
                     len(todo), len(wanted) - len(todo))

    @staticmethod
    def _fresh(path: Path, obj: ObjectInfo, seen: dict | None) -> bool:
        if not seen or not path.is_file():
            return False
        stat = path.stat()
        return (seen["size"] == stat.st_size == obj.size and seen["mtime_ns"] == stat.st_mtime_ns
                and seen["etag"] == obj.etag)


def resolve_local(path_or_uri: str | Path | None, cache_dir: str | Path,
                  storage: S3Storage | None = None) -> Path | None:
    """A local path unchanged; an s3:// URI synced into cache_dir (data.root, model.pretrained)."""
    if path_or_uri is None:
        return None
    if is_s3_uri(path_or_uri):
        return (storage or S3Storage()).sync_to_cache(str(path_or_uri), cache_dir)
    if isinstance(path_or_uri, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", path_or_uri):
        raise ValueError(f"path_or_uri={path_or_uri!r} has an unsupported scheme; expected a local path "
                         "or s3://bucket/key")
    return Path(path_or_uri)


def storage_filesystem(storage: str):
    """(pyarrow filesystem or None, path) for Ray's RunConfig; S3 needs the endpoint passed explicitly
    because pyarrow ignores AWS_ENDPOINT_URL_S3 (docs/platform.md)."""
    if not storage.startswith("s3://"):
        return None, storage
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        url = urlparse(endpoint)
        kwargs = {"endpoint_override": url.netloc, "scheme": url.scheme or "https"}
    if os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"):
        kwargs["region"] = os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
    return pyarrow.fs.S3FileSystem(**kwargs), storage[len("s3://"):].rstrip("/")
