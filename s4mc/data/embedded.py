"""The embedded data set: cluttered RGB scenes of real handwritten digits, generated in seconds on CPU.

Digits come from scikit-learn's ``load_digits`` (1,797 real 8 x 8 scans, UCI "Optical Recognition of
Handwritten Digits"), shipped with scikit-learn, so no download is needed. Each scene has a smooth
colour gradient, colour blotches, rectangles, ellipses, lines and digit-like curved strokes (all
labelled background, so colour and stroke shape alone do not solve the task), then one digit
(``DIGITS_PER_SCENE``) pasted at random size, position and colour. Labels: 0 background, digit d -> d + 1.
The 1,797 scans are partitioned three ways, stratified by class: a *pretraining* share that is never
pasted into any scene (the encoder's offline ImageNet analogue, ``s4mc.pretrain``), the training-scene
share (labeled and unlabeled pools) and the validation share. Generation is a pure function of its
arguments (per-scene ``numpy`` PCG64 streams), bit-identical across runs. Within one process the
last two data sets are kept (``make_embedded``), so a Ray actor that runs trial after trial renders
them once; nothing is cached on disk.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .base import TensorReader

# Bump when the generator changes; run records cite it. 2: muted clutter, vivid digits, 1-2 larger digits.
# 3: a reserved pretraining share of the scans (docs/embedded.md).
EMBEDDED_VERSION = 3
CLASS_NAMES = ["background"] + [str(d) for d in range(10)]
# Labeled-image counts, like the published VOC splits; the default is chosen by its measured
# supervised-only score (docs/embedded.md), not by a count.
SPLITS = ("10", "20", "30", "50", "100", "200", "all")
# Shares of each digit class's scans (docs/embedded.md): ~45 val scans per class keep val digits varied;
# the pretraining share is the encoder's whole "ImageNet", the rest is pasted into training scenes.
VAL_FRACTION = 0.25
# One digit per scene (docs/embedded.md): with two, the decoder's image-level context mixed both
# identities and full supervision stalled near 60 mIoU at a CPU budget (digit accuracy on digit pixels
# 74% against 94% with one).
DIGITS_PER_SCENE = 1
DIGIT_HEIGHT = (0.45, 0.70)  # of the scene side: 29-45 px at 64 px (ours; legible 8 x 8 scans)
PRETRAIN_FRACTION = 0.35
DIGIT_THRESHOLD = 0.4  # ours: upscaled intensity (0..1) above which a pixel is "digit"; legible strokes
_SPLIT_CODE = {"train": 0, "val": 1}


def digits_file() -> Path:
    """scikit-learn's copy of the digit scans (``load_digits`` reads the same file).

    Located without importing scikit-learn, whose import took 2.0 s of every trial's start-up
    (docs/performance.md); ``tests/test_data.py`` checks that the values equal ``load_digits``'."""
    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None or not spec.submodule_search_locations else (
        Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz")
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the embedded data set needs scikit-learn's digits.csv.gz (looked at {path}); "
                                "install the project (make setup), which brings scikit-learn")
    return path


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(digits_file(), "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    # Scans are 0..16; a one-pixel zero border makes upscaled strokes fade out at the patch edge.
    images = np.pad(data[:, :-1].reshape(-1, 8, 8) / 16.0, ((0, 0), (1, 1), (1, 1))).astype(np.float32)
    return images, data[:, -1].astype(np.int64)


def digit_partition(seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint ``pretrain`` / ``train`` / ``val`` index arrays into ``load_digits``, stratified by class.

    The pretraining share never reaches a scene, labeled, unlabeled or val (tests/test_pretrain.py)."""
    _, target = _digits()
    rng = np.random.default_rng([seed, 7919])
    parts: dict[str, list[np.ndarray]] = {"pretrain": [], "train": [], "val": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(target == c))
        k_val = round(len(idx) * VAL_FRACTION)
        k_pre = round(len(idx) * PRETRAIN_FRACTION)
        parts["val"].append(idx[:k_val])
        parts["pretrain"].append(idx[k_val:k_val + k_pre])
        parts["train"].append(idx[k_val + k_pre:])
    return {name: np.sort(np.concatenate(v)) for name, v in parts.items()}


def digit_pools(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, val) index arrays into ``load_digits`` (the scene shares of ``digit_partition``)."""
    parts = digit_partition(seed)
    return parts["train"], parts["val"]


@lru_cache(maxsize=64)
def _interp(n_out: int, n_in: int) -> np.ndarray:
    """``n_out x n_in`` bilinear resampling matrix (half-pixel centres, edge clamp)."""
    x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    x0 = np.clip(np.floor(x), 0, n_in - 1).astype(int)
    x1 = np.clip(x0 + 1, 0, n_in - 1)
    w1 = np.clip(x - x0, 0.0, 1.0)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), x0] += 1 - w1
    m[np.arange(n_out), x1] += w1
    return m


def _shape(s: int, kind: str, coords: list[float], width: int = 1) -> np.ndarray:
    """Bool ``s x s`` mask of a polyline ("line", coords x0, y0, x1, y1, ...) or filled "ellipse".

    Pillow rasterises in C; numpy distance maps per shape made generation several times slower.
    """
    canvas = Image.new("L", (s, s))
    draw = ImageDraw.Draw(canvas)
    if kind == "line":
        draw.line(coords, fill=255, width=width, joint="curve")
    else:
        draw.ellipse(coords, fill=255)
    return np.asarray(canvas) > 0


def _polyline(points: np.ndarray) -> list[float]:
    return points[:, ::-1].astype(float).ravel().tolist()  # (y, x) rows -> x0, y0, x1, y1, ...


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    img[mask] = colour  # boolean indexing touches only the shape's pixels


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    a = alpha[..., None]
    img *= 1 - a
    img += a * colour


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour for background and clutter (ours: saturation <= 0.3)."""
    grey = rng.uniform(0.25, 0.75)
    return (grey + 0.3 * (rng.random(3) - 0.5)).astype(np.float32)


def _vivid(rng: np.random.Generator) -> np.ndarray:
    """A fully saturated, bright colour of random hue for digits.

    Ours: objects differ from clutter by saturation, so a from-scratch CPU model finds *where* the
    digits are within minutes and the data budget goes into *which* digit: the part that labels and
    pseudo-labels decide.
    """
    hue = rng.uniform(0, 6)
    x = 1 - abs(hue % 2 - 1)
    rgb = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(hue) % 6]
    return np.array(rgb, np.float32) * rng.uniform(0.85, 1.0)


def _curve(rng: np.random.Generator, s: int, scale: float) -> np.ndarray:
    """A digit-sized cubic Bezier or elliptic arc: stroke clutter that is not a digit."""
    t = np.linspace(0, 1, 32)[:, None]
    c = rng.uniform(0, s, 2)
    if rng.random() < 0.5:
        p = c + rng.uniform(-scale, scale, (4, 2))
        return ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t ** 2 * p[2]
                + t ** 3 * p[3])
    a0 = rng.uniform(0, 2 * np.pi)
    ang = a0 + t[:, 0] * rng.uniform(0.6, 1.7) * np.pi  # an open arc: a closed ring looks like "0"
    r = rng.uniform(0.25, 0.5, 2) * scale
    return np.stack([c[0] + r[0] * np.sin(ang), c[1] + r[1] * np.cos(ang)], 1)


def _background(rng: np.random.Generator, s: int, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A ``s x s x 3`` float32 clutter background: every pixel of it is labelled background."""
    yy, xx = grid
    # Smooth gradient between two random colours in a random direction.
    c0, c1 = _muted(rng), _muted(rng)
    th = rng.uniform(0, 2 * np.pi)
    # Python floats keep the arithmetic in float32 (a numpy float64 scalar would promote it).
    u = float(np.cos(th)) * xx + float(np.sin(th)) * yy
    u = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    img = c0 + (c1 - c0) * u[..., None]
    # Low-frequency colour blotches: a coarse 4 x 4 field upsampled bilinearly.
    m = _interp(s, 4)
    coarse = rng.uniform(-0.25, 0.25, (3, 4, 4)).astype(np.float32)
    img += (m @ coarse @ m.T).transpose(1, 2, 0)
    for _ in range(rng.integers(1, 4)):  # rectangles, sometimes translucent
        h, w = rng.integers(3, s // 2, 2)
        y, x = rng.integers(0, s - h), rng.integers(0, s - w)
        colour = _muted(rng)
        _blend(img[y:y + h, x:x + w], np.full((h, w), rng.uniform(0.5, 1.0), np.float32), colour)
    for _ in range(rng.integers(0, 3)):  # ellipses
        cy, cx = rng.uniform(0, s, 2)
        ry, rx = rng.uniform(2, s / 5, 2)
        _paint(img, _shape(s, "ellipse", [cx - rx, cy - ry, cx + rx, cy + ry]),
               _muted(rng))
    for _ in range(rng.integers(0, 3)):  # straight lines
        p = np.stack([rng.uniform(0, s, 2), rng.uniform(0, s, 2)])
        _paint(img, _shape(s, "line", _polyline(p), int(rng.integers(1, 4))), _muted(rng))
    for _ in range(rng.integers(0, 2)):  # digit-like curved strokes, labelled background
        p = _curve(rng, s, rng.uniform(0.2, 0.45) * s)
        width = max(1, round(rng.uniform(1.6, 3.6) * s / 64))  # about a pasted digit's stroke width
        _paint(img, _shape(s, "line", _polyline(p), width), _muted(rng))
    return np.clip(img, 0, 1, out=img)


def _paste(rng: np.random.Generator, img: np.ndarray, label: np.ndarray, scan: np.ndarray, value: int,
           h: int) -> None:
    """Paste one upscaled digit ``scan`` of height ``h`` at a random place, in a vivid colour."""
    s = img.shape[0]
    w = max(4, round(h * rng.uniform(0.75, 1.0)))  # the scans are roughly square
    y, x = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
    v = _interp(h, 10) @ scan @ _interp(w, 10).T
    fg = v > DIGIT_THRESHOLD
    alpha = np.clip((v - DIGIT_THRESHOLD) / 0.2 + 0.5, 0, 1)  # anti-aliased edge, >= 0.5 on fg
    _blend(img[y:y + h, x:x + w], alpha.astype(np.float32), _vivid(rng))
    label[y:y + h, x:x + w][fg] = value


def _add_noise(rng: np.random.Generator, img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    # Sensor-like noise (ours: uniform, std ~0.03), a random window of a shared bank: drawing 12k
    # fresh normals per scene cost more than the rest of the scene.
    start = int(rng.integers(0, noise.size - img.size))
    img += noise[start:start + img.size].reshape(img.shape)
    return np.clip(img, 0, 1, out=img)


def _scene(rng: np.random.Generator, s: int, pool: np.ndarray, images: np.ndarray, target: np.ndarray,
           grid: tuple[np.ndarray, np.ndarray], noise: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    img = _background(rng, s, grid)
    label = np.zeros((s, s), np.uint8)
    used = []
    for _ in range(DIGITS_PER_SCENE):
        k = int(pool[rng.integers(len(pool))])
        used.append(k)
        h = int(rng.integers(round(DIGIT_HEIGHT[0] * s), round(DIGIT_HEIGHT[1] * s) + 1))
        _paste(rng, img, label, images[k], int(target[k]) + 1, h)
    return _add_noise(rng, img, noise), label, used


def render_digit_crops(n: int, size: int, seed: int, pool: np.ndarray, scene_size: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``n`` classification crops (uint8 ``n x 3 x size x size``, int64 digit labels 0..9): one scan of
    ``pool`` each, drawn in turn so every scan appears ~equally, on the scenes' clutter, at the
    scenes' digit height in pixels (29-45 px for ``scene_size`` 64, capped by ``size``). The
    pretraining source of ``s4mc.pretrain``; its own stream (split code 2) never meets a scene's."""
    images, target = _digits()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    noise = np.random.default_rng([seed, 104723]).uniform(-0.05, 0.05, 1 << 18).astype(np.float32)
    lo, hi = round(DIGIT_HEIGHT[0] * scene_size), min(round(DIGIT_HEIGHT[1] * scene_size), size)
    order = np.random.default_rng([seed, 2, 0]).permutation(np.resize(pool, n))
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i + 1])
        img = _background(rng, size, (yy, xx))
        _paste(rng, img, np.zeros((size, size), np.uint8), images[order[i]], 1, int(rng.integers(lo, hi + 1)))
        out[i] = _add_noise(rng, img, noise)
    img_t = torch.from_numpy(np.round(out * 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    return img_t, torch.from_numpy(target[order]), order


def _render(split: str, n: int, s: int, seed: int, pool: np.ndarray):
    images, target = _digits()
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    imgs = np.empty((n, s, s, 3), np.float32)
    labels = np.empty((n, s, s), np.uint8)
    used: set[int] = set()
    noise = np.random.default_rng([seed, 104729]).uniform(-0.05, 0.05, 1 << 20).astype(np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        imgs[i], labels[i], u = _scene(rng, s, pool, images, target, (yy, xx), noise)
        used.update(u)
    img_t = torch.from_numpy(np.round(imgs * 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    return TensorReader(img_t, torch.from_numpy(labels), name=f"embedded_{split}",
                        class_names=CLASS_NAMES), np.array(sorted(used))


@dataclass(frozen=True)
class EmbeddedData:
    """The embedded data set: ``train`` pool and ``val`` readers plus labeled-split resolution.

    ``train_digits`` / ``val_digits``: disjoint ``load_digits`` indices each side may use;
    ``used_digits``: the ones actually pasted, per side.
    """

    train: TensorReader
    val: TensorReader
    train_digits: np.ndarray
    val_digits: np.ndarray
    used_digits: dict[str, np.ndarray]
    seed: int

    def split_indices(self, num_labeled: int | str, seed: int = 0) -> tuple[list[int], list[int]]:
        """(labeled, unlabeled) train indices; ``num_labeled`` is a name in ``SPLITS`` or a count.

        Labeled sets are prefixes of one class-interleaved order drawn from ``seed``: each class's
        scenes in random order, dealt round-robin (in a random class order per round), so a split of
        10 k scenes holds k of every digit and splits are nested (the 10 are among the 20) like
        published splits. Stratified because a plain random 20 left out a digit class entirely
        (docs/embedded.md), which no host can then learn. Unlabeled is the rest of the pool.
        """
        n = len(self.train)
        if isinstance(num_labeled, str):
            if num_labeled not in SPLITS:
                raise ValueError(f"split {num_labeled!r}: allowed {', '.join(SPLITS)} or a count 1..{n}")
            k = n if num_labeled == "all" else int(num_labeled)
        else:
            k = int(num_labeled)
        if not 1 <= k <= n:
            raise ValueError(f"split {num_labeled!r}: allowed {', '.join(SPLITS)} or a count 1..{n}")
        order = self._stratified_order(seed)
        return sorted(order[:k]), sorted(order[k:])

    def _stratified_order(self, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        masks = self.train.masks
        # A scene's class: its most frequent digit label (0 for a scene without a visible digit).
        counts = torch.stack([torch.bincount(m.flatten().long(), minlength=len(CLASS_NAMES)) for m in masks])
        counts[:, 0] = 0
        scene_class = torch.where(counts.sum(1) > 0, counts.argmax(1), 0)
        queues = [[int(i) for i in torch.nonzero(scene_class == c).flatten()[
            torch.randperm(int((scene_class == c).sum()), generator=g)]] for c in range(len(CLASS_NAMES))]
        order: list[int] = []
        while any(queues[1:]):
            for c in (torch.randperm(len(CLASS_NAMES) - 1, generator=g) + 1).tolist():
                if queues[c]:
                    order.append(queues[c].pop(0))
        return order + queues[0]


def make_embedded(image_size: int = 64, num_train: int = 2000, num_val: int = 300,
                  seed: int = 0) -> EmbeddedData:
    """Generate the embedded data set (3.3 s for the defaults on one core, docs/performance.md).

    Scene i of a split depends only on (seed, split, i, image_size), not on ``num_train`` /
    ``num_val``: a smaller set is a prefix of a larger one. A repeated call with the same arguments
    returns the same object (its tensors are read-only by convention, as every reader's are): the
    trials a Ray actor runs one after another skip the rendering (docs/performance.md).
    """
    return _make_embedded(int(image_size), int(num_train), int(num_val), int(seed))


@lru_cache(maxsize=2)  # ~35 MB each at the defaults
def _make_embedded(image_size: int, num_train: int, num_val: int, seed: int) -> EmbeddedData:
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: need >= 32 so that digits stay legible")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train={num_train}, num_val={num_val}: need >= 1 each")
    train_pool, val_pool = digit_pools(seed)
    train, used_train = _render("train", num_train, image_size, seed, train_pool)
    val, used_val = _render("val", num_val, image_size, seed, val_pool)
    return EmbeddedData(train, val, train_pool, val_pool, {"train": used_train, "val": used_val}, seed)


# VOC colour map (Everingham et al.; the palette every segmentation repo renders masks with).
def _palette(n: int = 256) -> np.ndarray:
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[255] = (255, 255, 255)
    return pal


def save_preview(path, n: int = 16, data: EmbeddedData | None = None, split: str = "train",
                 zoom: int = 3, columns: int = 4) -> None:
    """Write a PNG grid of ``n`` scenes, each as image | colourised mask, with a class legend."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: allowed 'train', 'val'")
    data = data if data is not None else make_embedded(num_train=max(n, 1), num_val=max(n, 1))
    reader = data.train if split == "train" else data.val
    pal = _palette()
    s = reader.read(0)[0].shape[-1] * zoom
    gap, rows = 4, -(-n // columns)
    legend_h = 20
    sheet = Image.new("RGB", (columns * (2 * s + 3 * gap), rows * (s + gap) + gap + legend_h), "white")
    for i in range(min(n, len(reader))):
        img, mask = reader.read(i)
        a = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((s, s), Image.NEAREST)
        b = Image.fromarray(pal[mask.numpy()]).resize((s, s), Image.NEAREST)
        r, c = divmod(i, columns)
        x0, y0 = c * (2 * s + 3 * gap) + gap, r * (s + gap) + gap
        sheet.paste(a, (x0, y0))
        sheet.paste(b, (x0 + s + gap // 2, y0))
    draw = ImageDraw.Draw(sheet)
    x, y = gap, rows * (s + gap) + gap // 2
    for k, name in enumerate(reader.class_names):
        draw.rectangle([x, y + 3, x + 12, y + 15], fill=tuple(int(v) for v in pal[k]), outline="black")
        draw.text((x + 16, y + 3), name, fill="black")
        x += 16 + int(draw.textlength(name)) + 14
    sheet.save(path)
