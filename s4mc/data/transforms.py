"""Seeded data augmentation in plain torch: weak geometry, strong photometry and batch-level CutMix.

Every function takes an explicit ``torch.Generator`` and never touches the global RNG, so a sample's
augmentation is a pure function of its seed (exact resume, see ``s4mc.data.sampler``). Images travel
as float32 ``3 x H x W`` in [0, 1] until ``normalize``; masks as int64 ``H x W`` with ignore 255.
Recipes and constants follow UniMatch (Yang et al., CVPR 2023, ``dataset/transform.py`` and
``dataset/semi.py``), which is also what docs/method.md §5 prescribes for the strong views; the colour
operations reproduce torchvision's tensor implementations (``ColorJitter``, ``Grayscale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from s4mc.vocab import IGNORE_INDEX  # noqa: F401 (masks use it: docs/architecture.md)

# ImageNet statistics (torchvision.models docs); every pretrained backbone in docs/method.md §7 expects them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, the weights torchvision.transforms.functional.rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class GeometricAug:
    """Weak (geometric) augmentation: random scale, pad-and-crop, horizontal flip (UniMatch order).

    ``pad_fill``: "mean" pads the image with the normalisation mean (so padding is 0 after
    ``normalize``); "zero" pads with black as UniMatch does. Masks are always padded with 255.
    """

    crop_size: int | tuple[int, int]
    scale_range: tuple[float, float] = (0.5, 2.0)  # UniMatch configs, ratio_range [0.5, 2.0]
    hflip: bool = True
    hflip_p: float = 0.5  # UniMatch transform.hflip
    pad_fill: Literal["mean", "zero"] = "mean"

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range={self.scale_range!r}: need 0 < low <= high")
        if min(_pair(self.crop_size)) < 1:
            raise ValueError(f"crop_size={self.crop_size!r}: need positive sizes")
        if self.pad_fill not in ("mean", "zero"):
            raise ValueError(f"pad_fill={self.pad_fill!r}: allowed 'mean', 'zero'")


@dataclass(frozen=True)
class StrongAug:
    """Strong (photometric) augmentation of a weak view; defaults are docs/method.md §5 / UniMatch semi.py."""

    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.25
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # UniMatch transform.blur


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _bernoulli(generator: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=generator).item() < p


def to_float(image: Tensor) -> Tensor:
    """uint8 ``3 x H x W`` -> float32 in [0, 1]."""
    return image.to(torch.float32).div_(255.0)


def normalize(image: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    m = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image - m) / s


# --------------------------------------------------------------------------- geometry
def random_scale(image: Tensor, mask: Tensor | None, generator: torch.Generator,
                 scale_range: tuple[float, float] = (0.5, 2.0)) -> tuple[Tensor, Tensor | None]:
    """Resize by one ratio drawn uniformly from ``scale_range``: image bilinear, mask nearest."""
    r = _uniform(generator, *scale_range)
    h, w = image.shape[-2:]
    size = (max(1, round(h * r)), max(1, round(w * r)))
    # antialias=True matches PIL's bilinear resize (UniMatch) when shrinking; "nearest-exact" uses the
    # same half-pixel centres as bilinear with align_corners=False, so image and mask stay aligned.
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp_(0.0, 1.0)
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, mask


def random_crop(image: Tensor, mask: Tensor | None, crop_size: int | tuple[int, int],
                generator: torch.Generator, fill: Tensor | float = 0.0
                ) -> tuple[Tensor, Tensor | None, Tensor]:
    """Pad bottom/right up to ``crop_size`` (image with ``fill``, mask with 255), then crop at random.

    Returns the crop and a bool ``valid`` map, False on padding (UniMatch pads the same way).
    """
    ch, cw = _pair(crop_size)
    _, h, w = image.shape
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    valid = torch.ones(h, w, dtype=torch.bool)
    if ph or pw:
        fill_t = torch.as_tensor(fill, dtype=image.dtype).reshape(-1, 1, 1).expand(3, 1, 1)
        padded = fill_t.expand(3, h + ph, w + pw).clone()
        padded[:, :h, :w] = image
        image = padded
        valid = F.pad(valid, (0, pw, 0, ph), value=False)
        if mask is not None:
            mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
    H, W = image.shape[-2:]
    y = int(torch.randint(0, H - ch + 1, (), generator=generator))
    x = int(torch.randint(0, W - cw + 1, (), generator=generator))
    image = image[:, y:y + ch, x:x + cw]
    valid = valid[y:y + ch, x:x + cw]
    if mask is not None:
        mask = mask[y:y + ch, x:x + cw]
    return image, mask, valid


def random_hflip(image: Tensor, mask: Tensor | None, valid: Tensor, generator: torch.Generator,
                 p: float = 0.5) -> tuple[Tensor, Tensor | None, Tensor]:
    if _bernoulli(generator, p):
        image, valid = image.flip(-1), valid.flip(-1)
        mask = None if mask is None else mask.flip(-1)
    return image, mask, valid


def pad_fill_value(aug: GeometricAug, mean=IMAGENET_MEAN) -> Tensor:
    return torch.tensor(mean if aug.pad_fill == "mean" else (0.0, 0.0, 0.0), dtype=torch.float32)


def geometric_augment(image: Tensor, mask: Tensor | None, aug: GeometricAug, generator: torch.Generator,
                      mean=IMAGENET_MEAN) -> tuple[Tensor, Tensor | None, Tensor]:
    """Scale -> pad/crop -> flip on a float image and its mask; returns (image, mask, valid)."""
    image, mask = random_scale(image, mask, generator, aug.scale_range)
    image, mask, valid = random_crop(image, mask, aug.crop_size, generator, pad_fill_value(aug, mean))
    if aug.hflip:
        image, mask, valid = random_hflip(image, mask, valid, generator, aug.hflip_p)
    # Crops are views of the padded image; make them independent, contiguous tensors for collation.
    return image.contiguous(), None if mask is None else mask.contiguous(), valid.contiguous()


# --------------------------------------------------------------------------- photometry
def rgb_to_grayscale(image: Tensor) -> Tensor:
    r, g, b = image.unbind(-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def _blend(a: Tensor, b: Tensor | float, ratio: float) -> Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp_(0.0, 1.0)


def adjust_brightness(image: Tensor, factor: float) -> Tensor:
    return _blend(image, 0.0, factor)


def adjust_contrast(image: Tensor, factor: float) -> Tensor:
    return _blend(image, rgb_to_grayscale(image).mean(), factor)


def adjust_saturation(image: Tensor, factor: float) -> Tensor:
    return _blend(image, rgb_to_grayscale(image), factor)


def adjust_hue(image: Tensor, shift: float) -> Tensor:
    """Rotate hue by ``shift`` in [-0.5, 0.5] turns (RGB -> HSV -> RGB as in torchvision)."""
    r, g, b = image.unbind(0)
    maxc, _ = image.max(0)
    minc, _ = image.min(0)
    cr = maxc - minc
    eqc = cr == 0
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    cr_div = torch.where(eqc, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift, 1.0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    v = maxc
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    table = torch.stack([torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p),
                                                  (p, p, t, v, v, q))])  # 3 x 6 x H x W
    return table.gather(1, i[None, None].expand(3, 1, *i.shape)).squeeze(1)


def color_jitter(image: Tensor, generator: torch.Generator, brightness: float = 0.5,
                 contrast: float = 0.5, saturation: float = 0.5, hue: float = 0.25) -> Tensor:
    """torchvision ``ColorJitter``: the four factors are drawn, then applied in a random order."""
    order = torch.randperm(4, generator=generator).tolist()
    b = _uniform(generator, max(0.0, 1 - brightness), 1 + brightness)
    c = _uniform(generator, max(0.0, 1 - contrast), 1 + contrast)
    s = _uniform(generator, max(0.0, 1 - saturation), 1 + saturation)
    h = _uniform(generator, -hue, hue)
    for op in order:
        if op == 0:
            image = adjust_brightness(image, b)
        elif op == 1:
            image = adjust_contrast(image, c)
        elif op == 2:
            image = adjust_saturation(image, s)
        else:
            image = adjust_hue(image, h)
    return image


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with edge replication, the border rule of PIL's GaussianBlur.

    UniMatch calls PIL ``GaussianBlur(radius=sigma)``, whose radius is the standard deviation; the
    kernel is truncated at 3 sigma, which keeps > 99.7% of the mass.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def strong_augment(image: Tensor, aug: StrongAug, generator: torch.Generator) -> Tensor:
    """UniMatch's strong view: jitter (p=0.8) -> random grayscale (p=0.2) -> blur (p=0.5)."""
    if _bernoulli(generator, aug.jitter_p):
        image = color_jitter(image, generator, aug.brightness, aug.contrast, aug.saturation, aug.hue)
    if _bernoulli(generator, aug.grayscale_p):
        image = rgb_to_grayscale(image).expand(3, -1, -1).contiguous()
    if _bernoulli(generator, aug.blur_p):
        image = gaussian_blur(image, _uniform(generator, *aug.blur_sigma))
    return image


# --------------------------------------------------------------------------- CutMix
def cutmix_box(h: int, w: int, generator: torch.Generator, p: float = 0.5, size_min: float = 0.02,
               size_max: float = 0.4, ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> Tensor:
    """Bool ``h x w`` box, all False with probability 1 - p.

    UniMatch ``obtain_cutmix_box`` (dataset/transform.py): area ~ U(size_min, size_max) of the image,
    aspect ~ U(ratio), top-left uniform, redrawn until the box fits. Generalised to h != w.
    """
    box = torch.zeros(h, w, dtype=torch.bool)
    if not _bernoulli(generator, p):
        return box
    size = _uniform(generator, size_min, size_max) * h * w
    for _ in range(10_000):  # UniMatch loops forever; a cap keeps a pathological ratio from hanging
        r = _uniform(generator, *ratio)
        bw, bh = int(math.sqrt(size / r)), int(math.sqrt(size * r))
        x = int(torch.randint(0, w, (), generator=generator))
        y = int(torch.randint(0, h, (), generator=generator))
        if x + bw <= w and y + bh <= h:
            box[y:y + bh, x:x + bw] = True
            return box
    return box


def cutmix_boxes(batch_size: int, h: int, w: int, generator: torch.Generator, **kwargs) -> Tensor:
    """One independent ``cutmix_box`` per sample: bool ``B x h x w`` (UniMatch draws one per image)."""
    return torch.stack([cutmix_box(h, w, generator, **kwargs) for _ in range(batch_size)])


def random_derangement(n: int, generator: torch.Generator) -> Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed point, drawn from ``generator``.

    The CutMix partner of every sample is then another sample (docs/hosts.md). Rejection sampling:
    a uniform permutation is accepted when no index maps to itself, so the accepted one is uniform
    over derangements; acceptance tends to 1/e, about 2.7 draws on average (and 1/2 for n = 2).
    n = 1 has no derangement: a lone sample's only partner is itself, so ``[0]`` is returned.
    """
    if n < 1:
        raise ValueError(f"random_derangement n={n}: need n >= 1")
    if n == 1:
        return torch.zeros(1, dtype=torch.int64)
    identity = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == identity).any()):
            return perm


def apply_cutmix(images: Tensor, box: Tensor, partner_index: Tensor | int = 1) -> Tensor:
    """Paste ``images[partner_index[b]]`` into sample b inside ``box`` (``B x H x W`` or ``H x W``).

    ``images`` is any ``B x ... x H x W`` tensor: images, pseudo-labels, keep / valid maps. Mix all of
    a sample's maps with the same box and partners so labels stay aligned (docs/method.md §5).
    ``partner_index`` is a ``B`` index tensor (e.g. a permutation) or an int shift for ``torch.roll``.
    """
    b = images.shape[0]
    if isinstance(partner_index, int):
        partner = images.roll(partner_index, dims=0)
    else:
        partner_index = torch.as_tensor(partner_index, device=images.device)
        if partner_index.shape != (b,):
            raise ValueError(f"partner_index shape {tuple(partner_index.shape)}: expected ({b},)")
        partner = images[partner_index]
    box = box.to(device=images.device, dtype=torch.bool)
    if box.dim() == 2:
        box = box.expand(b, *box.shape)
    if box.dim() != 3 or box.shape[0] != b or box.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"box shape {tuple(box.shape)} does not match images shape {tuple(images.shape)}")
    box = box.reshape(b, *([1] * (images.dim() - 3)), *box.shape[-2:])
    return torch.where(box, partner, images)
