"""`s4mc data upload|download`: put a data set into S3 (or fetch it back) with sha256 checksums.

A cluster's workers read data sets from object storage (`data.root: s3://bucket/prefix`, synced into a
node-local cache by orchestration/storage.py before training). This command is how a user gets a data
set there: every file is uploaded with its sha256 in the object's metadata (what the workers' sync
verifies), files already present with the same size and sha256 are skipped, and a `SHA256SUMS` file
in `sha256sum` format is written beside them so the upload can also be checked by hand
(`sha256sum -c SHA256SUMS` inside a downloaded copy). `download` mirrors a prefix into a folder, each
file verified. Credentials come only from the standard AWS chain (environment, profile, role);
errors are one line naming the path or URI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

SUMS_NAME = "SHA256SUMS"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s4mc data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("upload", help="upload a local data folder to s3://bucket/prefix with checksums")
    up.add_argument("local_dir")
    up.add_argument("uri")
    up.add_argument("--force", action="store_true", help="upload every file even when an identical one is there")
    down = sub.add_parser("download", help="mirror s3://bucket/prefix into a local folder, every file verified")
    down.add_argument("uri")
    down.add_argument("local_dir")
    for q in (up, down):
        q.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3)")
        q.add_argument("--no-progress", action="store_true")
    return p


def sums_text(local_dir: Path) -> str:
    """`sha256sum` lines for every file under local_dir (sorted, POSIX paths), SHA256SUMS itself left out."""
    from orchestration.storage import sha256_file

    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != SUMS_NAME)
    return "".join(f"{sha256_file(p)}  {p.relative_to(local_dir).as_posix()}\n" for p in files)


def upload(storage, local_dir: Path, uri: str, force: bool = False, echo=print) -> int:
    """Uploads the tree and its SHA256SUMS; returns the number of files sent (unchanged ones skipped)."""
    if not local_dir.is_dir():
        raise FileNotFoundError(f"local_dir={str(local_dir)!r} is not a directory")
    base = uri.rstrip("/")
    files = [p for p in local_dir.rglob("*") if p.is_file() and p.name != SUMS_NAME]
    if not files:
        raise ValueError(f"local_dir={str(local_dir)!r} holds no files")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / SUMS_NAME
        staged.write_text(sums_text(local_dir))
        sent = storage.upload_dir(local_dir, base, skip_unchanged=not force)
        # The tree's own SHA256SUMS (if any) was uploaded above; ours, freshly computed, replaces it.
        storage.upload_file(staged, f"{base}/{SUMS_NAME}")
    total = sum(p.stat().st_size for p in files)
    echo(f"uploaded {sent} of {len(files)} files ({total / 2**20:.1f} MiB in all) to {base}/ "
         f"with sha256 metadata; {len(files) - sent} unchanged; checksums in {base}/{SUMS_NAME}")
    return sent


def download(storage, uri: str, local_dir: Path, echo=print) -> Path:
    """Mirrors the prefix (each object verified against its sha256) and checks SHA256SUMS if present."""
    dest = storage.download_dir(uri, local_dir)
    sums = dest / SUMS_NAME
    if sums.is_file():
        expected = sums.read_text()
        got = sums_text(dest)
        if expected != got:
            bad = sorted(set(expected.splitlines()) ^ set(got.splitlines()))[0]
            raise ValueError(f"{uri}: the downloaded files do not match {SUMS_NAME} (first difference: {bad!r})")
    n = sum(1 for p in dest.rglob("*") if p.is_file() and p.name != SUMS_NAME and not p.name.startswith("."))
    echo(f"downloaded {uri} -> {dest} ({n} files, every sha256 verified)")
    return dest


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from orchestration.storage import S3Storage, StorageError, is_s3_uri

    uri = args.uri
    if not is_s3_uri(uri):
        print(f"s4mc data: error: uri={uri!r} is not an S3 URI; expected s3://bucket/prefix", file=sys.stderr)
        return 2
    try:
        storage = S3Storage(endpoint_url=args.endpoint_url, progress=not args.no_progress)
        if args.action == "upload":
            upload(storage, Path(args.local_dir), uri, force=args.force)
        else:
            download(storage, uri, Path(args.local_dir))
    except (StorageError, FileNotFoundError, ValueError) as exc:
        print(f"s4mc data: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
