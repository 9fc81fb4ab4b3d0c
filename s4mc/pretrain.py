"""The embedded benchmark's offline analogue of ImageNet pretraining: a digit-classification encoder.

Every published S4MC result starts from an ImageNet-pretrained encoder; nothing can be downloaded
here, so the embedded benchmark pretrains its own. The source is the *pretraining share* of the
scikit-learn digit scans (``s4mc.data.embedded.digit_partition``), which no scene, labeled, unlabeled
or val image ever contains: single-digit crops on the scenes' clutter, classified 0-9 by the encoder
followed by global average pooling and a linear layer (the way ImageNet classifiers are trained).
Only the encoder is kept, saved in its own key layout, so it loads through the same
``s4mc.models.load_pretrained`` path as real ImageNet weights.

Training is a pure function of the ``PretrainSpec``: one thread, seeded data, seeded batches and
initialisation, so the same torch build gives the same bytes (tests/test_pretrain.py). The file is
cached under ``cache_dir`` with a JSON sidecar holding the spec, the file's sha256 and the measured
held-out accuracy; a cached file whose sha256 no longer matches its sidecar is an error, never
silently reused. Choices and their measurements: docs/embedded.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s4mc.data.embedded import EMBEDDED_VERSION, digit_partition, render_digit_crops
from s4mc.data.transforms import normalize

# The value of ``model.pretrained`` that asks for this encoder (s4mc/train/build.py resolves it).
EMBEDDED_WEIGHTS = "embedded"
HOLDOUT_FRACTION = 0.1  # ours: reserved scans kept out of pretraining to measure its accuracy


class PretrainError(ValueError):
    """A cached encoder that cannot be trusted (sha256 mismatch, unreadable sidecar)."""


@dataclass(frozen=True)
class PretrainSpec:
    """Everything the encoder's bytes depend on; defaults measured in docs/embedded.md."""

    backbone: str = "resnet18"
    width: float = 0.25
    deep_stem: bool = False
    crop_size: int = 48  # holds one scene-sized digit (29-45 px)
    num_images: int = 6000  # ~10 renderings of each pretraining scan
    steps: int = 1200
    batch_size: int = 64
    lr: float = 0.003
    weight_decay: float = 1e-4
    seed: int = 0
    data_seed: int = 0  # data.embedded.seed: whose partition's pretraining share is used

    def key(self) -> str:
        payload = {**dataclasses.asdict(self), "embedded_version": EMBEDDED_VERSION,
                   "torch": torch.__version__.split("+")[0]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def filename(self) -> str:
        return f"embedded_encoder-{self.backbone}-w{self.width:g}-{self.key()}.pt"


def default_cache_dir() -> Path:
    return Path(os.environ.get("S4MC_CACHE_DIR", "~/.cache/s4mc")).expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int = 10):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(encoder.channels[-1], num_classes)

    def forward(self, x):
        return self.fc(self.encoder(x)[-1].mean((2, 3)))


def _split_pool(pool: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from s4mc.data.embedded import _digits

    _, target = _digits()
    rng = np.random.default_rng([seed, 31337])
    train, held = [], []
    for c in range(10):
        idx = rng.permutation(pool[target[pool] == c])
        k = max(1, round(len(idx) * HOLDOUT_FRACTION))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = normalize(images[i:i + 256].float() / 255.0)
            correct += int((model(x).argmax(1) == labels[i:i + 256]).sum())
    return correct / len(images)


def train_encoder(spec: PretrainSpec, progress: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Pretrain the encoder; returns its state dict and a report (accuracy, seconds)."""
    from s4mc.models import BACKBONES

    t0 = time.perf_counter()
    pool = digit_partition(spec.data_seed)["pretrain"]
    train_pool, held_pool = _split_pool(pool, spec.seed)
    images, labels, _ = render_digit_crops(spec.num_images, spec.crop_size, spec.seed, train_pool)
    held_images, held_labels, _ = render_digit_crops(1000, spec.crop_size, spec.seed + 1, held_pool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the bytes then do not depend on the machine's core count
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            kwargs = {"width": spec.width, "output_stride": 16}
            if spec.backbone.startswith("resnet"):
                kwargs["deep_stem"] = spec.deep_stem
            model = _Classifier(BACKBONES[spec.backbone](**kwargs))
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        g = torch.Generator().manual_seed(spec.seed)
        model.train()
        iterator = range(spec.steps)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="pretrain encoder", dynamic_ncols=True)
        for step in iterator:
            for group in opt.param_groups:  # cosine decay: no schedule constant to tune
                group["lr"] = spec.lr * 0.5 * (1 + np.cos(np.pi * step / spec.steps))
            idx = torch.randint(0, len(images), (spec.batch_size,), generator=g)
            x = normalize(images[idx].float() / 255.0)
            # Random 1-2 px shifts: cheap translation augmentation on top of the varied renderings.
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(x, (dy, dx), (2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_acc = _accuracy(model, images[:1000], labels[:1000])
        held_acc = _accuracy(model, held_images, held_labels)
    finally:
        torch.set_num_threads(threads)
    report = {"train_accuracy": train_acc, "heldout_accuracy": held_acc,
              "seconds": time.perf_counter() - t0, "pretrain_scans": len(train_pool),
              "heldout_scans": len(held_pool)}
    return model.encoder.state_dict(), report


def ensure_encoder(spec: PretrainSpec, cache_dir: str | Path | None = None, progress: bool = False,
                   log=print) -> Path:
    """The cached encoder file for ``spec``, pretrained first if absent; verified by sha256.

    A lock file keeps parallel trials from pretraining the same encoder twice."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / spec.filename()
    sidecar = path.with_suffix(".json")
    lock = path.with_suffix(".lock")
    import fcntl

    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        if not path.exists():
            log(f"pretraining the embedded encoder ({spec.backbone} x{spec.width:g}, {spec.steps} steps, "
                f"one thread) into {path}")
            state, report = train_encoder(spec, progress=progress)
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            digest = sha256_file(tmp)
            meta = {"spec": dataclasses.asdict(spec), "key": spec.key(), "sha256": digest,
                    "embedded_version": EMBEDDED_VERSION, "torch": torch.__version__, **report}
            sidecar.write_text(json.dumps(meta, indent=2))
            os.replace(tmp, path)
            log(f"encoder sha256 {digest}, held-out digit accuracy {report['heldout_accuracy']:.3f} "
                f"({report['seconds']:.0f} s)")
    verify_encoder(path)
    return path


def verify_encoder(path: str | Path) -> dict:
    """The sidecar of a cached encoder, after checking the file's sha256 against it."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise PretrainError(f"{sidecar}: cannot read the encoder's sidecar ({exc}); delete {path} "
                            "to pretrain it again") from None
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise PretrainError(f"{path}: sha256 {digest} differs from {meta.get('sha256')} in {sidecar}; "
                            "the cached encoder was modified: delete both files to pretrain it again")
    return meta
