"""Aligned Xception-65 encoder for DeepLabV3+ (the COCO backbone of docs/method.md §7).

Architecture of Chen et al. 2018 ("Encoder-Decoder with Atrous Separable Convolution", Sec. 3.3, the
TF DeepLab ``xception_65``): a two-conv stem, an entry flow of three residual blocks (128, 256, 728
channels, each ending in a stride-2 separable conv), a middle flow of 16 residual blocks at 728
channels and an exit flow (728-1024-1024 block, then separable convs 1536-1536-2048 with ReLU inside).
Every separable conv is depthwise 3x3 - BN - pointwise 1x1 - BN. Module names follow the
UniMatch / CPS port (``block1.sepconv1.depthwise`` ...), so its converted ImageNet checkpoint
(``xception.pth``) loads through ``s4mc.models.weights`` with the default layout.

Where that port and the TF reference differ, this module follows TF: (1) output stride 16 / 8 is
obtained the way TF's ``stack_blocks_dense`` converts strides into atrous rates, so the exit flow's
last separable convs run at rate 2 (OS16) / 4 (OS8), the rates the stride-32 ImageNet network
effectively saw, where the port keeps rate 1 at OS16; (2) the residual adds the block's input before
its ReLU (the port's in-place ReLU adds the rectified input in the middle flow).

The encoder returns ``[c1, c2, c3, c4]`` like the ResNets: ``c1`` is the DeepLabV3+ low-level feature
(stride 4, 256·w channels, output of entry block 2's second separable conv, before its strided third
conv, TF's ``entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise`` and the port's
``hook_layer``), ``c2`` entry block 2's output (stride 8), ``c3`` the middle flow's output and ``c4`` the
exit flow's output (2048·w channels).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from s4mc.models.resnet import scaled_width

__all__ = ["SeparableConv2d", "XceptionBlock", "Xception65", "xception65"]

# TF DeepLab trains Xception with batch_norm_decay 0.9997 (PyTorch momentum 1 - 0.9997); the
# UniMatch port keeps it (bn_mom = 0.0003).
XCEPTION_BN_MOMENTUM = 3e-4
MIDDLE_BLOCKS = 16  # Xception-65 middle flow (Chen et al. 2018, Fig. 4)


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 - BN - pointwise 1x1 - BN.

    ``activate_first=True`` (entry and middle flow): ReLU on the input, no ReLU inside.
    ``activate_first=False`` (exit flow convs): ReLU after each BN (TF's
    ``activation_fn_in_separable_conv``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 activate_first: bool = True, bn_momentum: float = XCEPTION_BN_MOMENTUM) -> None:
        super().__init__()
        # padding = dilation: same size at stride 1; symmetric padding at stride 2 as TF's fixed_padding
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride, padding=dilation, dilation=dilation,
                                   groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.activate_first = activate_first

    def forward(self, x: Tensor) -> Tensor:
        if self.activate_first:
            # not in place: the block's residual needs the input before the ReLU
            x = F.relu(x)
            return self.bn2(self.pointwise(self.bn1(self.depthwise(x))))
        x = F.relu(self.bn1(self.depthwise(x)), inplace=True)
        return F.relu(self.bn2(self.pointwise(x)), inplace=True)


class XceptionBlock(nn.Module):
    """Three separable convs (stride on the third) plus a residual (1x1 conv + BN when the shape
    changes). ``forward`` returns ``(output, hook)`` where ``hook`` is the second conv's output."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 grow_first: bool = True, bn_momentum: float = XCEPTION_BN_MOMENTUM) -> None:
        super().__init__()
        if out_channels != in_channels or stride != 1:
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        else:
            self.skip = None
        # grow_first: the first conv changes the width (entry, middle); else the second (exit block)
        mid = out_channels if grow_first else in_channels
        self.sepconv1 = SeparableConv2d(in_channels, mid, 1, dilation, bn_momentum=bn_momentum)
        self.sepconv2 = SeparableConv2d(mid, out_channels, 1, dilation, bn_momentum=bn_momentum)
        self.sepconv3 = SeparableConv2d(out_channels, out_channels, stride, dilation, bn_momentum=bn_momentum)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skip = x if self.skip is None else self.skipbn(self.skip(x))
        hook = self.sepconv2(self.sepconv1(x))
        return self.sepconv3(hook) + skip, hook


class Xception65(nn.Module):
    """Aligned Xception-65 encoder returning ``[c1, c2, c3, c4]`` (see the module docstring).

    Args:
        width: channel multiplier (each width ``scaled_width(c, width)``; 1.0 is the published model).
        output_stride: 16 or 8.
        bn_momentum: BatchNorm momentum of every layer (TF DeepLab / UniMatch: 3e-4).
    """

    def __init__(self, *, width: float = 1.0, output_stride: int = 16,
                 bn_momentum: float = XCEPTION_BN_MOMENTUM) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride={output_stride!r} is not supported; allowed: 8, 16")
        if not width > 0:
            raise ValueError(f"width={width!r} must be > 0")
        self.name = "xception65"
        self.output_stride = output_stride
        w = {c: scaled_width(c, width) for c in (32, 64, 128, 256, 728, 1024, 1536, 2048)}
        bn = {"bn_momentum": bn_momentum}
        # TF stack_blocks_dense: once the target stride is reached, strides become atrous rates.
        # OS16: entry block3 keeps stride 2, the exit block's (dropped) stride 2 doubles the rate of
        # the last convs. OS8: entry block3's stride turns into rate 2 for the middle flow and the
        # exit block, which doubles it again for the last convs.
        block3_stride, middle_rate, exit_rate = (2, 1, 2) if output_stride == 16 else (1, 2, 4)
        self.conv1 = nn.Conv2d(3, w[32], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[32], momentum=bn_momentum)
        self.conv2 = nn.Conv2d(w[32], w[64], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w[64], momentum=bn_momentum)
        # entry flow
        self.block1 = XceptionBlock(w[64], w[128], stride=2, **bn)
        self.block2 = XceptionBlock(w[128], w[256], stride=2, **bn)
        self.block3 = XceptionBlock(w[256], w[728], stride=block3_stride, **bn)
        # middle flow: attributes block4 .. block19, the names of the reference checkpoints
        self.middle_names = [f"block{i}" for i in range(4, 4 + MIDDLE_BLOCKS)]
        for name in self.middle_names:
            setattr(self, name, XceptionBlock(w[728], w[728], dilation=middle_rate, **bn))
        # exit flow
        self.block20 = XceptionBlock(w[728], w[1024], dilation=middle_rate, grow_first=False, **bn)
        self.conv3 = SeparableConv2d(w[1024], w[1536], dilation=exit_rate, activate_first=False, **bn)
        self.conv4 = SeparableConv2d(w[1536], w[1536], dilation=exit_rate, activate_first=False, **bn)
        self.conv5 = SeparableConv2d(w[1536], w[2048], dilation=exit_rate, activate_first=False, **bn)
        self.channels = [w[256], w[256], w[728], w[2048]]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # the reference's normal(0, sqrt(2 / (k*k*out))) is He fan-out
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x, _ = self.block1(x)
        c2, c1 = self.block2(x)
        x, _ = self.block3(c2)
        for name in self.middle_names:
            x, _ = getattr(self, name)(x)
        c3 = x
        x, _ = self.block20(x)
        c4 = self.conv5(self.conv4(self.conv3(x)))
        return [c1, c2, c3, c4]


def xception65(**kwargs) -> Xception65:
    return Xception65(**kwargs)
