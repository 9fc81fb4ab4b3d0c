"""Tests of s4mc.models: encoder shapes and strides, dilation layouts, DeepLabV3+ outputs, the
feature-perturbation stream, optimizer groups and pretrained-weight loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s4mc.models import BACKBONES, DeepLabV3Plus, PretrainedWeightsError, build_model, load_pretrained

TINY = {"width": 0.125, "head_channels": 32}  # base width 8: cheap on CPU, every code path present


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # measured: on these tiny models intra-op thread synchronisation costs more than it gains,
    # several-fold on a busy 2-core machine; restored for the other test modules
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(backbone: str, **kw) -> DeepLabV3Plus:
    return build_model(backbone=backbone, num_classes=kw.pop("num_classes", 5), width=TINY["width"],
                       head_channels=TINY["head_channels"], **kw)


# ---------------------------------------------------------------- shapes and strides


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("size", [(33, 33), (64, 48)])
def test_logits_at_input_size_and_feature_channels(backbone, size):
    model = _tiny(backbone).train()
    x = torch.randn(2, 3, *size)
    feats = model.backbone(x)
    assert len(feats) == 4
    assert [f.shape[1] for f in feats] == model.backbone.channels
    out = model(x)
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "xception65"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_feature_strides(backbone, output_stride):
    model = _tiny(backbone, output_stride=output_stride).eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 32, 32))
    strides = [32 // f.shape[-1] for f in feats]
    assert strides == [4, 8, output_stride, output_stride]


def _conv2_dilations(layer: nn.Sequential) -> list[int]:
    return [blk.conv2.dilation[0] for blk in layer]


def test_dilation_layout_follows_torchvision():
    os16 = BACKBONES["resnet50"](width=0.125, output_stride=16)
    assert _conv2_dilations(os16.layer3) == [1] * 6
    assert _conv2_dilations(os16.layer4) == [1, 2, 2]
    assert os16.layer4[0].conv2.stride == (1, 1) and os16.layer3[0].conv2.stride == (2, 2)
    os8 = BACKBONES["resnet50"](width=0.125, output_stride=8)
    assert _conv2_dilations(os8.layer3) == [1, 2, 2, 2, 2, 2]
    assert _conv2_dilations(os8.layer4) == [2, 4, 4]
    # v1.5: the stride of a Bottleneck is on the 3x3 conv, not on the first 1x1
    assert os8.layer2[0].conv2.stride == (2, 2) and os8.layer2[0].conv1.stride == (1, 1)


@pytest.mark.parametrize(("output_stride", "expected"), [(16, [2, 4, 8]), (8, [4, 8, 16])])
def test_multi_grid_dilations(output_stride, expected):
    # DeepLabV3 multi-grid: unit rate (2 at OS16, 4 at OS8) x (1, 2, 4)
    enc = BACKBONES["resnet101"](width=0.125, output_stride=output_stride, multi_grid=True)
    assert _conv2_dilations(enc.layer4) == expected
    assert [blk.conv2.padding[0] for blk in enc.layer4] == expected  # keeps the spatial size
    small = BACKBONES["resnet18"](width=0.25, output_stride=output_stride, multi_grid=True)
    assert [blk.conv1.dilation[0] for blk in small.layer4][:2] == expected[:2]


def test_multi_grid_with_xception_is_rejected():
    with pytest.raises(ValueError, match="multi_grid"):
        build_model(backbone="xception65", num_classes=3, width=0.125, multi_grid=True)


# ---------------------------------------------------------------- key layouts and parameter counts


def test_standard_and_deep_stem_key_layout():
    std = BACKBONES["resnet50"](width=0.25).state_dict()
    assert std["conv1.weight"].shape == (16, 3, 7, 7)
    for key in ("bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked"):
        assert key in std
    deep = BACKBONES["resnet101"](width=1.0, deep_stem=True).state_dict()
    stem = {k: tuple(v.shape) for k, v in deep.items() if k.startswith(("conv1.", "bn1."))}
    assert stem["conv1.0.weight"] == (64, 3, 3, 3)
    assert stem["conv1.1.weight"] == (64,)
    assert stem["conv1.3.weight"] == (64, 64, 3, 3)
    assert stem["conv1.4.weight"] == (64,)
    assert stem["conv1.6.weight"] == (128, 64, 3, 3)
    assert stem["bn1.weight"] == (128,)
    assert {k.split(".")[1] for k in stem if k.startswith("conv1.")} == {"0", "1", "3", "4", "6"}
    # layer1 starts from 128 channels, as in UniMatch / U2PL
    assert deep["layer1.0.conv1.weight"].shape == (64, 128, 1, 1)
    assert deep["layer1.0.downsample.0.weight"].shape == (256, 128, 1, 1)


@pytest.mark.parametrize(("name", "expected"), [("resnet18", 11_176_512), ("resnet50", 23_508_032),
                                                 ("resnet101", 42_500_160)])
def test_full_width_parameter_counts_match_torchvision(name, expected):
    # torchvision's parameter counts minus the ImageNet fc layer
    enc = BACKBONES[name]()
    assert sum(p.numel() for p in enc.parameters()) == expected
    assert enc.channels == ([64, 128, 256, 512] if name == "resnet18" else [256, 512, 1024, 2048])


# ---------------------------------------------------------------- DeepLabV3+ behaviour


def test_feature_perturbation_two_outputs_one_backbone_pass():
    model = _tiny("resnet18").train()
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 40, 40)
    logits, logits_fp = model(x, feature_perturbation=True)
    assert len(calls) == 1
    assert logits.shape == logits_fp.shape == (2, 5, 40, 40)
    assert not torch.allclose(logits, logits_fp)
    (logits.mean() + logits_fp.mean()).backward()


def test_feature_perturbation_clean_half_equals_plain_forward_in_eval():
    model = _tiny("resnet18").eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        logits, logits_fp = model(x, feature_perturbation=True)
        plain = model(x)
    torch.testing.assert_close(logits, plain)
    assert not torch.allclose(logits, logits_fp)  # the perturbation is applied whenever asked for


def test_batch_one_train_forward_and_backward():
    model = _tiny("resnet18").train()
    x = torch.randn(1, 3, 48, 48)
    out = model(x)
    out.mean().backward()
    logits, logits_fp = model(x, feature_perturbation=True)
    assert logits.shape == logits_fp.shape == (1, 5, 48, 48)


def test_param_groups_cover_every_parameter_once():
    model = _tiny("resnet18")
    groups = model.param_groups(0.01, head_lr_mult=10.0, weight_decay=1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert by_name["backbone"]["lr"] == pytest.approx(0.01)
    assert by_name["head"]["lr"] == pytest.approx(0.1)
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])
    with pytest.raises(ValueError, match="head_lr_mult"):
        model.param_groups(0.01, head_lr_mult=0.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"backbone": "resnet152"}, "backbone='resnet152'.*resnet18"),
    ({"output_stride": 32}, "output_stride=32.*8, 16"),
    ({"num_classes": 0}, "num_classes=0"),
    ({"width": 0.0}, "width=0.0"),
    ({"aspp_rates": (6, 12)}, "aspp_rates"),
    ({"fp_dropout": 1.0}, "fp_dropout=1.0"),
    ({"pretrained_layout": "timm"}, "pretrained_layout='timm'.*deep_stem"),
])
def test_build_model_rejects_bad_values(kwargs, match):
    args = {"backbone": "resnet18", "num_classes": 3, "width": 0.25} | kwargs
    with pytest.raises(ValueError, match=match):
        build_model(**args)


# ---------------------------------------------------------------- pretrained weights


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        for fa, fb in zip(a(x), b(x), strict=True):
            torch.testing.assert_close(fa, fb, rtol=0, atol=0)


def _randomise_bn(module: nn.Module) -> None:
    # fresh BNs are identities; random statistics make the round trip test meaningful
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize(("backbone", "layout"), [("resnet18", "torchvision"), ("resnet50", "deep_stem"),
                                                  ("xception65", "torchvision")])
def test_load_pretrained_round_trip(tmp_path, backbone, layout):
    kw = {"deep_stem": True} if layout == "deep_stem" else {}
    width = 0.125
    src = BACKBONES[backbone](width=width, **kw)
    _randomise_bn(src)
    sd = dict(src.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.randn(10, 4), torch.randn(10)  # ImageNet head: ignored
    path = tmp_path / f"{backbone}.pth"
    torch.save(sd, path)
    dst = BACKBONES[backbone](width=width, **kw)
    assert load_pretrained(dst, str(path), layout) == len(src.state_dict())
    _same_outputs(src, dst, torch.randn(2, 3, 35, 41))


def test_load_pretrained_unwraps_and_strips_prefixes(tmp_path):
    model = _tiny("resnet18")
    _randomise_bn(model.backbone)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    # num_batches_tracked is absent from old torchvision checkpoints
    wrapped["state_dict"] = {k: v for k, v in wrapped["state_dict"].items() if "num_batches" not in k}
    path = tmp_path / "whole_model.pth"
    torch.save(wrapped, path)
    fresh = _tiny("resnet18")
    load_pretrained(fresh.backbone, path, "torchvision")
    _same_outputs(model.backbone, fresh.backbone, torch.randn(1, 3, 32, 32))
    torch.save({"model": {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}}, path)
    load_pretrained(_tiny("resnet18").backbone, path, "torchvision")


def test_pretrained_via_build_model(tmp_path):
    src = BACKBONES["resnet18"](width=0.25)
    _randomise_bn(src)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    model = build_model(backbone="resnet18", num_classes=3, width=0.25, pretrained=path)
    _same_outputs(src, model.backbone, torch.randn(1, 3, 32, 32))


def test_mismatched_weights_name_file_and_keys(tmp_path):
    sd = BACKBONES["resnet18"](width=0.25).state_dict()
    del sd["layer4.1.bn2.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["conv1.weight"] = torch.zeros(32, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(BACKBONES["resnet18"](width=0.25), path, "torchvision")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg and "resnet18" in msg
    assert "1 missing (layer4.1.bn2.weight)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "1 shape mismatch (conv1.weight: file (32,3,3,3) vs model (16,3,7,7))" in msg
    assert isinstance(info.value, ValueError)


def test_layout_that_does_not_fit_the_stem(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(BACKBONES["resnet18"](width=0.25).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="deep_stem"):
        load_pretrained(BACKBONES["resnet18"](width=0.25), path, "deep_stem")
    with pytest.raises(PretrainedWeightsError, match=r"\d+ missing \(conv1\.0\.weight"):
        load_pretrained(BACKBONES["resnet18"](width=0.25, deep_stem=True), path, "deep_stem")


def test_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "nope" / "r101.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_pretrained(BACKBONES["resnet18"](width=0.25), missing, "torchvision")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsError, match="garbage.pth"):
        load_pretrained(BACKBONES["resnet18"](width=0.25), garbage, "torchvision")
