"""Plain-torch ResNet encoders (ResNet-18/34/50/101) for the DeepLabV3+ segmentation model.

The layout follows torchvision's ResNet v1.5 (He et al. 2016, "Deep Residual Learning"; the
Bottleneck stride sits on the 3x3 conv) with the module names of torchvision, so an ImageNet state
dict from torchvision loads as it is (its ``fc.*`` keys are ignored by ``s4mc.models.weights``). On
top of that: the deep stem of the semi-supervised segmentation code bases (UniMatch / U2PL / CPS:
three 3x3 convs 64-64-128, the stem of the published ResNet-101 runs, docs/method.md §7), output stride 8
or 16 by replacing strides with dilation (torchvision's ``replace_stride_with_dilation``), DeepLabV3
multi-grid in layer4 and a ``width`` multiplier that gives the small models of the CPU runs. The
encoder returns the four stage outputs ``[c1, c2, c3, c4]``; ``c1`` feeds the decoder's low-level
branch and ``c4`` the ASPP head.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "scaled_width", "resnet18", "resnet34", "resnet50",
           "resnet101"]

# DeepLabV3 multi-grid (Chen et al. 2017, "Rethinking Atrous Convolution", Sec. 4.1): the three
# blocks of layer4 use the layer's unit rate times (1, 2, 4).
MULTI_GRID = (1, 2, 4)


def scaled_width(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8 (at least 8), so that small CPU models keep
    channel counts that vectorise well; ``width=1`` returns ``channels`` unchanged."""
    return max(8, int(round(channels * width / 8.0)) * 8)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size for stride 1 at any dilation
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Unlike torchvision, dilation > 1 is allowed (needed for OS 8/16
    with the small backbones); both 3x3 convs take the block's dilation."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck (ResNet-50/101), stride and dilation on the 3x3 conv (v1.5)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet encoder returning ``[c1, c2, c3, c4]`` (strides 4, 8, 8|16, 8|16).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``(3, 4, 23, 3)`` for ResNet-101.
        name: architecture name used in error messages (``"resnet101"``).
        width: channel multiplier; base width ``scaled_width(64, width)``, stages double it.
        deep_stem: three 3x3 convs instead of the 7x7 conv (UniMatch / U2PL / CPS layout).
        output_stride: 16 dilates layer4, 8 dilates layer3 and layer4.
        multi_grid: layer4's blocks use dilation ``unit_rate * (1, 2, 4)``.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int], *,
                 name: str = "resnet", width: float = 1.0, deep_stem: bool = False,
                 output_stride: int = 16, multi_grid: bool = False) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride={output_stride!r} is not supported; allowed: 8, 16")
        if not width > 0:
            raise ValueError(f"width={width!r} must be > 0")
        self.name = name
        self.deep_stem = deep_stem
        self.output_stride = output_stride
        self.multi_grid = multi_grid
        base = scaled_width(64, width)
        self.dilation = 1
        if deep_stem:
            # UniMatch / U2PL / CPS: conv3x3(3,64,s2)-BN-ReLU-conv3x3(64,64)-BN-ReLU-conv3x3(64,128),
            # then bn1 on 128 channels; Sequential indices 0/1/3/4/6 are their checkpoint keys.
            self.inplanes = 2 * base
            self.conv1 = nn.Sequential(
                conv3x3(3, base, stride=2), nn.BatchNorm2d(base), nn.ReLU(inplace=True),
                conv3x3(base, base), nn.BatchNorm2d(base), nn.ReLU(inplace=True),
                conv3x3(base, self.inplanes),
            )
        else:
            self.inplanes = base
            self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # torchvision's replace_stride_with_dilation for (layer2, layer3, layer4)
        dilate = (False, output_stride == 8, True)
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, 2 * base, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, 4 * base, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, 8 * base, layers[3], stride=2, dilate=dilate[2],
                                       multi_grid=multi_grid)
        self.channels = [base * block.expansion * m for m in (1, 2, 4, 8)]

        # torchvision's initialisation (He et al. 2015 fan-out for convs, BN at identity)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1, dilate: bool = False, multi_grid: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        if multi_grid:
            # every block, the first included, runs at unit rate x grid (DeepLabV3 Sec. 4.1); the
            # reference code's grids (2, 2, 4) on top of previous_dilation give the same rates.
            # ResNet-18's two-block layer4 takes the grid's first two entries.
            dilations = [self.dilation * MULTI_GRID[i % len(MULTI_GRID)] for i in range(blocks)]
        else:
            # torchvision: the first block keeps the previous dilation, the rest use the new one
            dilations = [previous_dilation] + [self.dilation] * (blocks - 1)
        layers = [block(self.inplanes, planes, stride, downsample, dilations[0])]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=d) for d in dilations[1:]]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


# Stage depths from He et al. 2016, Table 1.
def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), name="resnet18", **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), name="resnet34", **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), name="resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), name="resnet101", **kwargs)
