"""The embedded benchmark's digit-pretrained encoder (s4mc/pretrain.py): the pretraining share of the
scans never reaches a scene, pretraining is deterministic to the byte, the cache is verified by sha256,
and the file loads through the same path as ImageNet weights. Every test but the last two uses a tiny
spec (a few seconds); the end-to-end one trains on the real default encoder from the default cache
(~65 s once per machine to pretrain it, then a few seconds)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from s4mc import pretrain
from s4mc.config import ConfigError, load_config
from s4mc.data.embedded import (
    PRETRAIN_FRACTION,
    VAL_FRACTION,
    _digits,
    digit_partition,
    digit_pools,
    make_embedded,
    render_digit_crops,
)
from s4mc.models import BACKBONES, build_model
from s4mc.pretrain import (
    PretrainError,
    PretrainSpec,
    default_cache_dir,
    ensure_encoder,
    sha256_file,
    train_encoder,
    verify_encoder,
)

pytestmark = pytest.mark.integration  # trains tiny runs (tests tiers: pyproject.toml)

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "experiments" / "embedded"
TINY = PretrainSpec(steps=3, num_images=64, batch_size=8, crop_size=32)
NUM_SCANS = 1797


def _quiet(*_args) -> None:
    pass


def _equal_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny spec pretrained once into a fresh cache, recording the pools its crops came from."""
    pools: list[np.ndarray] = []
    real = pretrain.render_digit_crops

    def recording(n, size, seed, pool, *args, **kwargs):
        pools.append(np.asarray(pool).copy())
        return real(n, size, seed, pool, *args, **kwargs)

    cache = tmp_path_factory.mktemp("encoder-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "render_digit_crops", recording)
        path = ensure_encoder(TINY, cache, log=_quiet)
    return SimpleNamespace(path=path, cache=cache, pools=pools, sha256=sha256_file(path))


def _copy_cache(tiny, dest: Path) -> Path:
    """The tiny encoder and its sidecar copied into ``dest`` (for tests that damage them)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in (tiny.path, tiny.path.with_suffix(".json")):
        (dest / src.name).write_bytes(src.read_bytes())
    return dest / tiny.path.name


def _no_training(*_args, **_kwargs):
    raise AssertionError("train_encoder was called: the cached encoder should have been reused")


# ------------------------------------------------------------------------------ digit shares
@pytest.mark.parametrize("seed", [0, 1])
def test_digit_shares_are_disjoint_stratified_and_cover_every_scan(seed):
    parts = digit_partition(seed)
    assert set(parts) == {"pretrain", "train", "val"}
    sets = {k: set(v.tolist()) for k, v in parts.items()}
    assert all(len(sets[k]) == len(parts[k]) for k in parts)  # no scan twice within a share
    assert not sets["pretrain"] & sets["train"] and not sets["pretrain"] & sets["val"]
    assert not sets["train"] & sets["val"]
    assert sets["pretrain"] | sets["train"] | sets["val"] == set(range(NUM_SCANS))
    _, target = _digits()
    for c in range(10):  # each share holds its fraction of every digit class
        n_c = int((target == c).sum())
        assert int((target[parts["val"]] == c).sum()) == round(n_c * VAL_FRACTION)
        assert int((target[parts["pretrain"]] == c).sum()) == round(n_c * PRETRAIN_FRACTION)
    train, val = digit_pools(seed)
    assert np.array_equal(train, parts["train"]) and np.array_equal(val, parts["val"])
    assert not np.array_equal(digit_partition(1 - seed)["pretrain"], parts["pretrain"])


@pytest.mark.parametrize("seed", [0, 1])
def test_scenes_never_use_the_pretraining_share(seed):
    data = make_embedded(image_size=32, num_train=400, num_val=100, seed=seed)
    parts = digit_partition(seed)
    used_train, used_val = set(data.used_digits["train"].tolist()), set(data.used_digits["val"].tolist())
    assert used_train and used_val
    assert used_train <= set(parts["train"].tolist()) and used_val <= set(parts["val"].tolist())
    assert not (used_train | used_val) & set(parts["pretrain"].tolist())
    assert np.array_equal(data.train_digits, parts["train"]) and np.array_equal(data.val_digits, parts["val"])


def test_render_digit_crops_draws_only_from_its_pool():
    images, target = _digits()
    pool = np.array([3, 10, 20, 40, 100])
    imgs, labels, order = render_digit_crops(12, 32, 0, pool)
    assert imgs.shape == (12, 3, 32, 32) and imgs.dtype == torch.uint8
    assert set(order.tolist()) <= set(pool.tolist())
    assert labels.tolist() == target[order].tolist()
    counts = np.bincount(np.searchsorted(pool, order), minlength=len(pool))
    assert counts.max() - counts.min() <= 1  # every scan drawn in turn
    # The crops render the pool's scans: same pool, same bytes; another scan, other pixels.
    a, _, _ = render_digit_crops(4, 32, 0, np.array([3]))
    assert torch.equal(a, render_digit_crops(4, 32, 0, np.array([3]))[0])
    other = int(np.flatnonzero(target != target[3])[0])
    assert not torch.equal(a, render_digit_crops(4, 32, 0, np.array([other]))[0])


def test_pretraining_reads_only_the_pretrain_share(tiny):
    share = digit_partition(TINY.data_seed)["pretrain"]
    assert len(tiny.pools) == 2  # training crops and held-out crops
    train_pool, held_pool = (set(p.tolist()) for p in tiny.pools)
    assert train_pool and held_pool and not train_pool & held_pool
    assert train_pool | held_pool == set(share.tolist())
    meta = verify_encoder(tiny.path)
    assert (meta["pretrain_scans"], meta["heldout_scans"]) == (len(train_pool), len(held_pool))


# ------------------------------------------------------------------------- determinism and cache
def test_train_encoder_is_deterministic(tiny):
    a, report_a = train_encoder(TINY)
    b, report_b = train_encoder(TINY)
    assert _equal_state(a, b)
    assert report_a["heldout_accuracy"] == report_b["heldout_accuracy"]
    assert _equal_state(a, _load(tiny.path))  # what the cache holds is that same state
    # The seed matters (a test that cannot fail would pass here too).
    c, _ = train_encoder(dataclasses.replace(TINY, seed=1))
    assert not _equal_state(a, c)


def test_every_spec_field_enters_the_cache_key():
    names = set()
    for field in dataclasses.fields(PretrainSpec):
        value = getattr(TINY, field.name)
        changed = (not value if isinstance(value, bool) else value + "x" if isinstance(value, str)
                   else value * 2 + 1)
        names.add(dataclasses.replace(TINY, **{field.name: changed}).filename())
    names.add(TINY.filename())
    assert len(names) == len(dataclasses.fields(PretrainSpec)) + 1


def test_ensure_encoder_writes_a_verified_file_and_reuses_it(tiny, monkeypatch):
    assert tiny.path == tiny.cache / TINY.filename() and tiny.path.is_file()
    meta = json.loads(tiny.path.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(tiny.path.read_bytes()).hexdigest() == tiny.sha256
    assert meta["spec"] == dataclasses.asdict(TINY) and meta["key"] == TINY.key()
    assert 0.0 <= meta["heldout_accuracy"] <= 1.0
    mtime = tiny.path.stat().st_mtime_ns
    monkeypatch.setattr(pretrain, "train_encoder", _no_training)
    assert ensure_encoder(TINY, tiny.cache, log=_quiet) == tiny.path
    assert tiny.path.stat().st_mtime_ns == mtime and sha256_file(tiny.path) == tiny.sha256


def test_fresh_process_regenerates_the_same_bytes(tiny, tmp_path):
    code = ("import sys; from s4mc.pretrain import PretrainSpec, ensure_encoder, sha256_file; "
            f"p = ensure_encoder(PretrainSpec(**{dataclasses.asdict(TINY)!r}), sys.argv[1], log=lambda *a: None); "
            "print(p.name, sha256_file(p))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         check=True, env=env, timeout=300)
    assert out.stdout.split() == [tiny.path.name, tiny.sha256]  # bit-for-bit, in another directory
    assert (tmp_path / tiny.path.name).read_bytes() == tiny.path.read_bytes()


def test_tampered_cached_file_is_an_error_naming_it(tiny, tmp_path, monkeypatch):
    path = _copy_cache(tiny, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(pretrain, "train_encoder", _no_training)  # never silently re-pretrained
    with pytest.raises(PretrainError, match=re.escape(f"{path}: sha256")):
        ensure_encoder(TINY, tmp_path, log=_quiet)
    with pytest.raises(PretrainError, match="modified"):
        verify_encoder(path)


@pytest.mark.parametrize("damage", ["missing", "not json", "no sha256"])
def test_missing_or_corrupt_sidecar_is_an_error(tiny, tmp_path, monkeypatch, damage):
    path = _copy_cache(tiny, tmp_path)
    sidecar = path.with_suffix(".json")
    if damage == "missing":
        sidecar.unlink()
    elif damage == "not json":
        sidecar.write_text("{not json")
    else:
        meta = json.loads(sidecar.read_text())
        del meta["sha256"]
        sidecar.write_text(json.dumps(meta))
    monkeypatch.setattr(pretrain, "train_encoder", _no_training)
    with pytest.raises(PretrainError, match=re.escape(path.stem)):
        ensure_encoder(TINY, tmp_path, log=_quiet)


# ------------------------------------------------------------------------------- loading and config
def test_cached_encoder_loads_through_build_model(tiny):
    saved = _load(tiny.path)
    torch.manual_seed(0)
    model = build_model(backbone=TINY.backbone, num_classes=11, width=TINY.width, deep_stem=TINY.deep_stem,
                        head_channels=32, pretrained=str(tiny.path))
    assert _equal_state(model.backbone.state_dict(), saved)
    torch.manual_seed(0)
    fresh = build_model(backbone=TINY.backbone, num_classes=11, width=TINY.width, head_channels=32)
    assert not _equal_state(fresh.backbone.state_dict(), saved)  # the weights came from the file


def test_embedded_weights_need_the_embedded_data(tmp_path):
    # Refused at load time (one line, before anything runs), and again by the builder if a config
    # was assembled some other way.
    with pytest.raises(ConfigError, match="model.pretrained='embedded'.*data.name='pascal'"):
        load_config(overrides=["data.name=pascal", f"data.root={tmp_path}", "model.pretrained=embedded"])
    cfg = load_config(overrides=["data.name=pascal", f"data.root={tmp_path}"])
    cfg.model.pretrained = "embedded"
    from s4mc.train.build import resolve_pretrained

    with pytest.raises(ConfigError, match="model.pretrained='embedded'.*data.name='pascal'"):
        resolve_pretrained(cfg)
    other = load_config(overrides=["data.name=pascal", f"data.root={tmp_path}", "model.pretrained=/w/r18.pth"])
    assert resolve_pretrained(other) == "/w/r18.pth"  # a file path passes through untouched
    assert resolve_pretrained(load_config()) is None


def test_resolve_pretrained_builds_the_spec_from_the_config(monkeypatch, tmp_path):
    from s4mc.train.build import resolve_pretrained

    seen = []
    monkeypatch.setattr(pretrain, "ensure_encoder", lambda spec, **kw: seen.append(spec) or tmp_path / "e.pt")
    cfg = load_config(EMBEDDED / "_base.yaml", ["model.width=0.5", "model.deep_stem=true",
                                                "data.embedded.seed=2"])
    assert resolve_pretrained(cfg) == str(tmp_path / "e.pt")
    assert seen == [PretrainSpec(backbone="resnet18", width=0.5, deep_stem=True, data_seed=2)]


# ------------------------------------------------------------------------------------------- CLI
def test_cli_pretrain_help():
    from s4mc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--help"])
    assert exc.value.code == 0


def test_cli_pretrain_caches_the_manifests_encoder(tmp_path, monkeypatch, capsys):
    """`s4mc pretrain` picks the spec from the manifest (default _base.yaml) + overrides, writes the
    verified file into --cache-dir, reuses it, and reports a tampered one as a one-line error."""
    from s4mc.cli import main

    seen = []

    def fake_train(spec, progress=False):  # a real encoder state, without the minute of training
        seen.append(spec)
        torch.manual_seed(0)
        enc = BACKBONES[spec.backbone](width=spec.width, deep_stem=spec.deep_stem, output_stride=16)
        return enc.state_dict(), {"train_accuracy": 0.5, "heldout_accuracy": 0.25, "seconds": 0.0,
                                  "pretrain_scans": 7, "heldout_scans": 1}

    monkeypatch.setattr(pretrain, "train_encoder", fake_train)
    monkeypatch.chdir(ROOT)  # the default --config is relative to the repository root
    argv = ["pretrain", "--cache-dir", str(tmp_path), "model.width=0.5", "data.embedded.seed=2"]
    assert main(argv) == 0
    spec = PretrainSpec(width=0.5, data_seed=2)  # the rest from _base.yaml: resnet18, standard stem
    path = tmp_path / spec.filename()
    assert seen == [spec] and path.is_file()
    out = capsys.readouterr().out
    assert str(path) in out and f"sha256 {sha256_file(path)}" in out and "accuracy 0.250" in out
    assert "7 pretraining scans" in out
    assert main(argv) == 0 and len(seen) == 1  # cached: verified, not retrained
    path.write_bytes(path.read_bytes() + b"\0")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: sha256") and "\n" not in err


# --------------------------------------------------------------------------------- end to end
def test_training_starts_from_the_default_cached_encoder(tmp_path):
    """The real default: `model.pretrained: embedded` of _base.yaml, pretrained once per machine into
    the default cache (~65 s) and reused by every later run."""
    from s4mc.train import run_training
    from s4mc.train.build import build_run

    cfg = load_config(EMBEDDED / "cutmix_seg_s4mc.yaml", [
        "data.embedded.image_size=32", "data.embedded.num_train=48", "data.embedded.num_val=6",
        "data.crop_size=32", "data.split=20", "data.batch_size=2", "data.unlabeled_batch_size=2",
        "model.head_channels=32", "train.steps=4", "train.sup_only_steps=2", "train.eval_every=2",
        "train.log_every=1", "train.progress=false", "eval.batch_size=6", f"run.dir={tmp_path / 'run'}"])
    assert cfg.model.pretrained == "embedded" and (cfg.model.backbone, cfg.model.width) == ("resnet18", 0.25)
    run = build_run(cfg, torch.device("cpu"))
    path = default_cache_dir() / PretrainSpec().filename()  # the default spec: nothing in cfg changes it
    assert run.pretrained_path == str(path)
    meta = verify_encoder(path)
    saved = _load(path)
    assert _equal_state(run.student.backbone.state_dict(), saved)  # step 0 = the cached encoder
    assert _equal_state(run.teacher.backbone.state_dict(), saved)
    summary = run_training(cfg)
    assert summary["steps"] == 4 and 0.0 <= summary["best/eval/mIoU"] <= 100.0
    versions = json.loads((tmp_path / "run" / "versions.json").read_text())
    assert versions["pretrained"] == {"path": str(path), "sha256": meta["sha256"]}
