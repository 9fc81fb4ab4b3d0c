"""Segmentation models: plain-torch encoders (ResNet-18/34/50/101, Xception-65), DeepLabV3+ with
UniMatch's feature-perturbation stream, and pretrained-weight loading.

``build_model`` is the one entry point the trainer uses; it validates every field of the model
config (``s4mc.config.ModelConfig``) and raises a one-line ``ValueError`` naming the bad value and
what is allowed. ``BACKBONES`` maps backbone names to encoder constructors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from s4mc.models.deeplabv3plus import ASPP, DeepLabV3Plus
from s4mc.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101
from s4mc.models.weights import LAYOUTS, PretrainedWeightsError, load_pretrained
from s4mc.models.xception import Xception65, xception65

__all__ = ["ASPP", "BACKBONES", "DeepLabV3Plus", "PretrainedWeightsError", "ResNet", "Xception65",
           "build_model", "load_pretrained"]

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "xception65": xception65,
}


def build_model(*, backbone: str, num_classes: int, width: float = 1.0, deep_stem: bool = False,
                output_stride: int = 16, multi_grid: bool = False,
                aspp_rates: Sequence[int] = (6, 12, 18), head_channels: int = 256,
                fp_dropout: float = 0.5, pretrained: str | Path | None = None,
                pretrained_layout: str = "torchvision") -> DeepLabV3Plus:
    """DeepLabV3+ on the named encoder; ``pretrained`` (a local file) is loaded into the encoder.

    ``deep_stem`` and ``multi_grid`` apply to the ResNets only; asking for them with Xception-65 is
    an error rather than silently ignored."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not known; allowed: {', '.join(BACKBONES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")
    if not isinstance(width, int | float) or not width > 0:
        raise ValueError(f"width={width!r} must be a number > 0")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride={output_stride!r} is not supported; allowed: 8, 16")
    rates = tuple(aspp_rates)
    if len(rates) != 3 or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates):
        raise ValueError(f"aspp_rates={list(rates)!r} must be three integers >= 1, e.g. [6, 12, 18]")
    if isinstance(head_channels, bool) or not isinstance(head_channels, int) or head_channels < 8:
        raise ValueError(f"head_channels={head_channels!r} must be an integer >= 8")
    if not isinstance(fp_dropout, int | float) or not 0.0 <= fp_dropout < 1.0:
        raise ValueError(f"fp_dropout={fp_dropout!r} must lie in [0, 1)")
    if pretrained_layout not in LAYOUTS:
        raise ValueError(f"pretrained_layout={pretrained_layout!r} is not known; "
                         f"allowed: {', '.join(LAYOUTS)}")

    kwargs: dict = {"width": float(width), "output_stride": output_stride}
    if backbone.startswith("resnet"):
        kwargs.update(deep_stem=bool(deep_stem), multi_grid=bool(multi_grid))
    else:
        for field, value in (("deep_stem", deep_stem), ("multi_grid", multi_grid)):
            if value:
                raise ValueError(f"{field}=True applies to the ResNet backbones only, "
                                 f"not backbone={backbone!r}")
    encoder = BACKBONES[backbone](**kwargs)
    if pretrained is not None:
        load_pretrained(encoder, pretrained, pretrained_layout)
    return DeepLabV3Plus(encoder, num_classes, aspp_rates=rates, head_channels=head_channels,
                         fp_dropout=float(fp_dropout))
