"""Loading ImageNet-pretrained encoder weights from a local file, with a one-line diagnosis on mismatch.

Two key layouts are understood, both being the encoder's own module names: ``"torchvision"`` (the
standard 7x7 stem: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` ...; torchvision's ResNet
checkpoints as they are, and the Xception-65 checkpoint of UniMatch / CPS) and ``"deep_stem"`` (the
ResNets of UniMatch / U2PL / CPS: ``conv1.0/1/3/4/6.*`` for the three stem convs and their BNs, then
``bn1.*`` and the same stages). The file is read with ``torch.load(weights_only=True)``.

Normalisation before matching, in this order: a checkpoint wrapped as ``{"state_dict": ...}`` or
``{"model": ...}`` is unwrapped (repeatedly); every leading ``module.`` (DataParallel / DDP) is
stripped; if any key starts with ``backbone.`` (a whole segmentation model's checkpoint), only those
keys are kept, without the prefix, and the rest (the decoder) is dropped; ``fc.*`` (the ImageNet
classifier) is ignored. A key ``*.num_batches_tracked`` missing from the file is not an error (older
torchvision checkpoints predate it; the model keeps its own counter). Anything else missing,
unexpected or of another shape raises ``PretrainedWeightsError``. Downloading ``s3://`` URIs is the
orchestration layer's job; ``path`` here is a local file.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["LAYOUTS", "PretrainedWeightsError", "load_pretrained", "normalise_state_dict"]

LAYOUTS = ("torchvision", "deep_stem")
_WRAPPERS = ("state_dict", "model")
_SHOW = 3  # keys quoted per category in the error line


class PretrainedWeightsError(ValueError):
    """A pretrained-weights file that cannot be loaded into the encoder (one-line message)."""


def normalise_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Unwrap, strip prefixes and drop ``fc.*`` as described in the module docstring."""
    while isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in _WRAPPERS):
        obj = next(obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping))
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (mapping of tensors), got {type(obj).__name__}")
    sd = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module."):]
        sd[key] = value
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items()
            if not (k == "fc" or k.startswith("fc.")) and isinstance(v, torch.Tensor)}


def _shape(t: torch.Tensor) -> str:
    return "(" + ",".join(str(s) for s in t.shape) + ")"


def _quote(keys: list[str]) -> str:
    if not keys:
        return ""
    more = ", ..." if len(keys) > _SHOW else ""
    return " (" + ", ".join(keys[:_SHOW]) + more + ")"


def load_pretrained(backbone: nn.Module, path: str | Path, layout: str = "torchvision") -> int:
    """Load the encoder weights in ``path`` into ``backbone`` (in place); return how many tensors
    were loaded. Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for an unknown
    layout and ``PretrainedWeightsError`` when the file's keys or shapes do not fit."""
    if layout not in LAYOUTS:
        raise ValueError(f"pretrained_layout={layout!r} is not known; allowed: {', '.join(LAYOUTS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    name = getattr(backbone, "name", type(backbone).__name__)
    head = f"weights {path} (layout {layout})"
    deep_stem = getattr(backbone, "deep_stem", None)
    if deep_stem is not None and deep_stem != (layout == "deep_stem"):
        built = "deep_stem=True" if deep_stem else "the standard stem"
        raise PretrainedWeightsError(f"{head} do not fit {name} built with {built}; use layout "
                                     f"{'deep_stem' if deep_stem else 'torchvision'} or rebuild the model")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainedWeightsError(f"{head} cannot be read as a weights-only torch file: {first}") from exc
    try:
        sd = normalise_state_dict(obj)
    except TypeError as exc:
        raise PretrainedWeightsError(f"{head}: {exc}") from exc

    own = backbone.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        detail = ", ".join(f"{k}: file {_shape(sd[k])} vs model {_shape(own[k])}" for k in mismatched[:_SHOW])
        if len(mismatched) > _SHOW:
            detail += ", ..."
        raise PretrainedWeightsError(
            f"{head} do not match {name}: {len(missing)} missing{_quote(missing)}, "
            f"{len(unexpected)} unexpected{_quote(unexpected)}, "
            f"{len(mismatched)} shape mismatch" + (f" ({detail})" if detail else ""))
    loaded = len(sd)
    for key in own:
        if key not in sd:  # only num_batches_tracked can get here
            sd[key] = own[key]
    backbone.load_state_dict(sd, strict=True)
    return loaded
