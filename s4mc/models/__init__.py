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


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_args(backbone, num_classes, width, output_stride, rates, head_channels, fp_dropout, layout) -> None:
    rules = [
        (backbone not in BACKBONES, f"backbone={backbone!r} is not known; allowed: {', '.join(BACKBONES)}"),
        (not _whole(num_classes, 1), f"num_classes={num_classes!r} must be an integer >= 1"),
        (not isinstance(width, int | float) or not width > 0, f"width={width!r} must be a number > 0"),
        (output_stride not in (8, 16), f"output_stride={output_stride!r} is not supported; allowed: 8, 16"),
        (len(rates) != 3 or not all(_whole(r, 1) for r in rates),
         f"aspp_rates={list(rates)!r} must be three integers >= 1, e.g. [6, 12, 18]"),
        (not _whole(head_channels, 8), f"head_channels={head_channels!r} must be an integer >= 8"),
        (not isinstance(fp_dropout, int | float) or not 0.0 <= fp_dropout < 1.0,
         f"fp_dropout={fp_dropout!r} must lie in [0, 1)"),
        (layout not in LAYOUTS, f"pretrained_layout={layout!r} is not known; allowed: {', '.join(LAYOUTS)}"),
    ]
    for broken, message in rules:
        if broken:
            raise ValueError(message)


def build_model(*, backbone: str, num_classes: int, width: float = 1.0, deep_stem: bool = False,
                output_stride: int = 16, multi_grid: bool = False,
                aspp_rates: Sequence[int] = (6, 12, 18), head_channels: int = 256,
                fp_dropout: float = 0.5, pretrained: str | Path | None = None,
                pretrained_layout: str = "torchvision") -> DeepLabV3Plus:
    """DeepLabV3+ on the named encoder; ``pretrained`` (a local file) is loaded into the encoder.

    ``deep_stem`` and ``multi_grid`` apply to the ResNets only; asking for them with Xception-65 is
    an error rather than silently ignored."""
    rates = tuple(aspp_rates)
    _check_args(backbone, num_classes, width, output_stride, rates, head_channels, fp_dropout, pretrained_layout)
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
