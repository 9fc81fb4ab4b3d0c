"""orchestration/storage.py against a real moto S3 server: checksums, cache sync, errors, no leaked secrets."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from orchestration import storage
from orchestration.storage import (
    ChecksumMismatchError,
    CredentialsError,
    ObjectNotFoundError,
    S3Storage,
    parse_s3_uri,
    resolve_local,
    sha256_file,
)

services = pytest.mark.services


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(storage, "CHECKSUM_BACKOFF_S", 0.0)


def _tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": os.urandom(200_000), "sub/deeper/c.json": b'{"c": 1}'}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _no_partials(root: Path) -> None:
    assert not [p for p in root.rglob("*") if ".part-" in p.name], "a temporary download was left behind"


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/a/b.pt") == ("bucket", "a/b.pt")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://bucket/prefix/") == ("bucket", "prefix/")
    for bad in ("bucket/key", "s3://", "s3:///key", "gs://b/k"):
        with pytest.raises(ValueError, match="S3 URI|no bucket"):
            parse_s3_uri(bad)


def test_resolve_local_passes_local_paths_through(tmp_path):
    assert resolve_local(str(tmp_path / "data"), tmp_path / "cache") == tmp_path / "data"
    assert resolve_local(tmp_path, tmp_path / "cache") == tmp_path
    assert resolve_local("relative/dir", tmp_path / "cache") == Path("relative/dir")
    assert resolve_local(None, tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists()  # nothing synced, nothing created
    with pytest.raises(ValueError, match="unsupported scheme"):
        resolve_local("gs://bucket/data", tmp_path / "cache")


@services
def test_upload_download_round_trip_with_checksum(s3, s3_bucket, tmp_path):
    src = tmp_path / "weights.pt"
    src.write_bytes(os.urandom(300_000))
    uri = f"s3://{s3_bucket}/models/weights.pt"
    digest = s3.upload_file(src, uri)
    assert digest == sha256_file(src)
    assert s3.head(uri).sha256 == digest  # stored in the object's metadata
    dest = tmp_path / "out" / "weights.pt"
    assert s3.download_file(uri, dest, require_checksum=True) == digest
    assert dest.read_bytes() == src.read_bytes()
    _no_partials(tmp_path / "out")


@services
def test_corrupted_object_is_detected(s3, s3_bucket, tmp_path, fast_retries):
    src = tmp_path / "x.bin"
    src.write_bytes(b"original content")
    uri = f"s3://{s3_bucket}/data/x.bin"
    s3.upload_file(src, uri)
    old_sha = s3.head(uri).sha256
    # Overwrite the bytes but keep the old metadata, as a broken copy or bit rot would.
    s3.client.put_object(Bucket=s3_bucket, Key="data/x.bin", Body=b"tampered content", Metadata={"sha256": old_sha})
    dest = tmp_path / "out" / "x.bin"
    with pytest.raises(ChecksumMismatchError, match=f"s3://{s3_bucket}/data/x.bin"):
        s3.download_file(uri, dest)
    assert not dest.exists()
    _no_partials(tmp_path / "out")
    with pytest.raises(ChecksumMismatchError):  # and through the cache sync, into a fresh cache
        s3.sync_to_cache(f"s3://{s3_bucket}/data", tmp_path / "cache")
    assert not (tmp_path / "cache" / s3_bucket / "data" / "x.bin").exists()
    _no_partials(tmp_path / "cache")


@services
def test_sync_to_cache_skips_unchanged_and_fetches_changed(s3, s3_bucket, tmp_path, monkeypatch):
    files = _tree(tmp_path / "src")
    prefix = f"s3://{s3_bucket}/datasets/toy"
    assert s3.upload_dir(tmp_path / "src", prefix) == 3
    assert s3.upload_dir(tmp_path / "src", prefix) == 0  # unchanged: nothing re-sent

    fetched: list[str] = []
    real_download = s3.client.download_file

    def counting_download(bucket, key, filename, **kwargs):
        fetched.append(key)
        return real_download(bucket, key, filename, **kwargs)

    monkeypatch.setattr(s3.client, "download_file", counting_download)
    cache = tmp_path / "cache"
    local = s3.sync_to_cache(prefix, cache)
    assert local == (cache / s3_bucket / "datasets" / "toy").resolve()
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == files
    assert len(fetched) == 3

    fetched.clear()
    assert s3.sync_to_cache(prefix + "/", cache) == local  # unchanged: no download at all
    assert fetched == []

    (tmp_path / "src" / "a.txt").write_bytes(b"alpha v2, longer")  # changed upstream
    s3.upload_file(tmp_path / "src" / "a.txt", f"{prefix}/a.txt")
    s3.client.delete_object(Bucket=s3_bucket, Key="datasets/toy/sub/deeper/c.json")  # removed upstream
    s3.sync_to_cache(prefix, cache)
    assert fetched == ["datasets/toy/a.txt"]
    assert (local / "a.txt").read_bytes() == b"alpha v2, longer"
    assert not (local / "sub" / "deeper" / "c.json").exists()

    one = s3.sync_to_cache(f"{prefix}/sub/b.bin", tmp_path / "cache2")  # a single object
    assert one.is_file() and one.read_bytes() == files["sub/b.bin"]
    assert resolve_local(f"{prefix}/sub/b.bin", tmp_path / "cache2", storage=s3) == one
    _no_partials(cache)


@services
def test_missing_key_and_bucket_errors_name_the_uri(s3, s3_bucket, tmp_path):
    for uri in (f"s3://{s3_bucket}/no/such/key.bin", f"s3://{s3_bucket}/no-such-prefix/"):
        with pytest.raises(ObjectNotFoundError) as info:
            s3.sync_to_cache(uri, tmp_path / "cache")
        assert uri in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ObjectNotFoundError, match="no such object") as info:
        s3.download_file(f"s3://{s3_bucket}/missing.pt", tmp_path / "m.pt")
    assert f"s3://{s3_bucket}/missing.pt" in str(info.value)
    with pytest.raises(ObjectNotFoundError, match="bucket 'no-such-bucket-s4mc' does not exist"):
        s3.download_dir("s3://no-such-bucket-s4mc/data", tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        s3.upload_file(tmp_path / "nope.bin", f"s3://{s3_bucket}/nope.bin")


@services
def test_missing_credentials_message_lists_sources_without_values(aws_env, s3_bucket, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    with pytest.raises(CredentialsError) as info:
        S3Storage(max_attempts=1).head(f"s3://{s3_bucket}/k")
    message = str(info.value)
    assert f"s3://{s3_bucket}/k" in message
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SHARED_CREDENTIALS_FILE" in message
    assert aws_env["AWS_SECRET_ACCESS_KEY"] not in message


@services
def test_credentials_never_appear_in_logs(aws_env, s3, s3_bucket, tmp_path, caplog, fast_retries):
    caplog.set_level(logging.DEBUG)  # everything, botocore's request dumps included
    src = tmp_path / "f.bin"
    src.write_bytes(b"payload")
    uri = f"s3://{s3_bucket}/logs/f.bin"
    s3.upload_file(src, uri)
    s3.download_file(uri, tmp_path / "g.bin")
    s3.sync_to_cache(f"s3://{s3_bucket}/logs", tmp_path / "cache")
    errors = []
    for bad in (f"s3://{s3_bucket}/missing", "s3://no-such-bucket-s4mc/x"):
        with pytest.raises(ObjectNotFoundError) as info:
            s3.sync_to_cache(bad, tmp_path / "cache")
        errors.append(str(info.value))
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records) + "\n".join(errors)
    assert "Authorization" in text or "signature" in text.lower()  # botocore did log the requests
    for secret in (aws_env["AWS_ACCESS_KEY_ID"], aws_env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in text


@services
def test_service_handle_stops_its_process_group():
    from orchestration.services import start_moto_server

    with start_moto_server() as server:
        pid = server.proc.pid
        assert server.alive and server.url.startswith("http://127.0.0.1:")
    assert not server.alive
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
