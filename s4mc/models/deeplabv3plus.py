"""DeepLabV3+ segmentation head on a ResNet / Xception encoder, with UniMatch's feature-perturbation stream.

Chen et al. 2018 ("Encoder-Decoder with Atrous Separable Convolution"): ASPP on the encoder's last
feature (1x1 branch, three 3x3 atrous branches, image pooling; each conv-BN-ReLU; 1x1 projection,
dropout 0.5), a decoder that reduces the stride-4 low-level feature to 48 channels, concatenates the
upsampled ASPP output, refines with two 3x3 conv-BN-ReLU and classifies with a 1x1 conv; logits are
bilinearly upsampled to the input size. Submodule names follow UniMatch (``backbone``, ``head``,
``reduce``, ``fuse``, ``classifier``) so the structure maps one to one onto its checkpoints.

``forward(x, feature_perturbation=True)`` returns ``(logits, logits_fp)``: the encoder runs once, the
perturbed stream applies channel dropout (``Dropout2d(fp_dropout)``) to both the low-level and the
high-level encoder feature, and one decoder call on the batch-concatenated clean and perturbed
features produces both outputs (UniMatch, docs/method.md §5), so the decoder's BatchNorm sees both halves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ASPP", "DeepLabV3Plus", "PoolingBatchNorm2d"]

# Chen et al. 2018, Sec. 3.1: the decoder reduces the low-level feature to 48 channels next to the
# 256-channel ASPP output; the ratio is kept when head_channels changes.
LOW_LEVEL_CHANNELS = 48
REFERENCE_HEAD_CHANNELS = 256
ASPP_DROPOUT = 0.5  # torchvision DeepLabV3 ASPP projection / the DeepLab TF head


class PoolingBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm for the ASPP image-pooling branch that never fails at batch size 1.

    After global pooling the branch is ``B x C x 1 x 1``; in train mode torch's BatchNorm refuses a
    single value per channel (batch 1). UniMatch keeps BN here and never trains with batch 1; to keep
    its parameters and behaviour for batch >= 2 while never crashing, a batch of a single pixel is
    normalised with the running statistics (which it does not update) instead of raising."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        return super().forward(x)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1,
                  dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level feature: global average pool, 1x1 conv-BN-ReLU, broadcast back to the map size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                 PoolingBatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        # a 1x1 map upsampled bilinearly is a constant: expand is exact and cheaper
        return self.gap(x).expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017, DeepLabV3, Sec. 3.3)."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        r1, r2, r3 = rates
        self.b0 = _conv_bn_relu(in_channels, out_channels)
        self.b1 = _conv_bn_relu(in_channels, out_channels, 3, r1)
        self.b2 = _conv_bn_relu(in_channels, out_channels, 3, r2)
        self.b3 = _conv_bn_relu(in_channels, out_channels, 3, r3)
        self.b4 = ASPPPooling(in_channels, out_channels)
        self.project = nn.Sequential(nn.Conv2d(5 * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
                                     nn.Dropout(ASPP_DROPOUT))

    def forward(self, x: Tensor) -> Tensor:
        feats = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(feats, dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on ``backbone`` (a module returning ``[c1, c2, c3, c4]`` with a ``channels`` list).

    Args:
        backbone: encoder; ``c1`` (stride 4) feeds the decoder, ``c4`` the ASPP.
        num_classes: output channels of the classifier.
        aspp_rates: the three atrous rates (docs/method.md §7: 6/12/18 at OS16, 12/24/36 at OS8).
        head_channels: ASPP and decoder width (256 in the paper).
        fp_dropout: channel-dropout probability of the feature-perturbation stream (docs/method.md §5).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *,
                 aspp_rates: tuple[int, int, int] = (6, 12, 18), head_channels: int = 256,
                 fp_dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.fp_dropout = fp_dropout
        low_channels, high_channels = backbone.channels[0], backbone.channels[-1]
        reduced = max(8, round(LOW_LEVEL_CHANNELS * head_channels / REFERENCE_HEAD_CHANNELS))
        self.head = ASPP(high_channels, head_channels, tuple(aspp_rates))
        self.reduce = _conv_bn_relu(low_channels, reduced)
        self.fuse = nn.Sequential(_conv_bn_relu(reduced + head_channels, head_channels, 3),
                                  _conv_bn_relu(head_channels, head_channels, 3))
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def _decode(self, c1: Tensor, c4: Tensor) -> Tensor:
        c4 = F.interpolate(self.head(c4), size=c1.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([self.reduce(c1), c4], dim=1)))

    def forward(self, x: Tensor, feature_perturbation: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``B x num_classes x H x W`` at the input size; with ``feature_perturbation`` the pair
        ``(logits, logits_fp)``. The perturbation is applied whenever it is asked for, in train and
        eval mode alike (UniMatch builds a fresh, training-mode ``Dropout2d`` in its forward)."""
        size = x.shape[-2:]
        feats = self.backbone(x)
        c1, c4 = feats[0], feats[-1]
        if not feature_perturbation:
            out = self._decode(c1, c4)
            return F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        c1 = torch.cat([c1, F.dropout2d(c1, self.fp_dropout, training=True)])
        c4 = torch.cat([c4, F.dropout2d(c4, self.fp_dropout, training=True)])
        out = F.interpolate(self._decode(c1, c4), size=size, mode="bilinear", align_corners=False)
        logits, logits_fp = out.chunk(2)
        return logits, logits_fp

    def param_groups(self, lr: float, head_lr_mult: float = 1.0, weight_decay: float = 1e-4) -> list[dict]:
        """Optimizer parameter groups: the encoder at ``lr``, everything else (ASPP, decoder,
        classifier) at ``lr * head_lr_mult`` (docs/method.md §7: x10 for VOC / COCO, x1 for Cityscapes).
        ``weight_decay`` (default 1e-4, docs/method.md §7) applies to both groups, BN included, as in the
        reference code. Each group carries ``name`` and ``lr_mult`` so a schedule can rescale it."""
        if not lr > 0:
            raise ValueError(f"lr={lr!r} must be > 0")
        if not head_lr_mult > 0:
            raise ValueError(f"head_lr_mult={head_lr_mult!r} must be > 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if id(p) not in backbone_ids]
        return [
            {"params": list(self.backbone.parameters()), "lr": lr, "weight_decay": weight_decay,
             "name": "backbone", "lr_mult": 1.0},
            {"params": head, "lr": lr * head_lr_mult, "weight_decay": weight_decay,
             "name": "head", "lr_mult": head_lr_mult},
        ]
