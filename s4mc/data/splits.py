"""Resolve a published label split into (image, mask) relpath lists for one real data set.

The vendored lists in ``experiments/splits`` (README.md there: provenance, MIT, the S4MC authors)
come in two families with different line formats: ``unimatch`` lines are ``IMAGE_RELPATH
MASK_RELPATH``; ``u2pl`` lines are VOC image ids or Cityscapes image relpaths. ``resolve_split``
normalises both into ``(image relpath, mask relpath)`` pairs relative to the data root, so the readers
(``s4mc.data.voc`` / ``cityscapes`` / ``coco``) see one format. Where a split has no unlabeled list
(the COCO release), unlabeled = the training pool minus the labeled images. The split folder is
found relative to the repository root (the parent of the ``s4mc`` package: ``<repo>/experiments/
splits``), which holds for a source checkout and an editable install; pass ``splits_dir`` otherwise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

Entry = tuple[str, str | None]  # (image relpath, mask relpath or None), relative to the data root

# <repo>/s4mc/data/splits.py -> <repo>/experiments/splits
DEFAULT_SPLITS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "splits"
DATASETS = ("pascal", "cityscapes", "coco")
FAMILIES = ("unimatch", "u2pl")
# The training pool per data set, used only where a split lacks unlabeled.txt (splits/README.md).
# VOC: train_aug.txt (10,582, SBD-augmented train set); the u2pl family has no pool file of its own
# and uses the unimatch one (the two families' VOC lists are the same 10,582 ids, checked in tests).
_POOL_FILES = {"pascal": "unimatch/pascal/train_aug.txt", "coco": "{family}/coco/train.txt"}
COCO_TRAIN_DIR = "train2017"


@dataclass(frozen=True)
class SplitLists:
    """Resolved lists. ``unlabeled`` is None only for COCO without a pool (no ``root``, no train.txt).

    ``sha256`` maps each list file used (relative to the splits folder, as in ``SHA256SUMS``) to its
    digest; a COCO pool taken from a folder listing appears as ``<root>/train2017/ (listing)`` with the
    digest of the sorted newline-joined file names.
    """

    labeled: tuple[Entry, ...]
    unlabeled: tuple[Entry, ...] | None
    val: tuple[Entry, ...]
    sha256: dict[str, str] = field(default_factory=dict)


def available_splits(dataset: str, family: str, splits_dir: str | Path | None = None) -> list[str]:
    """Split names (folder names) published for ``dataset`` in ``family``, sorted by labeled count."""
    base = _base_dir(splits_dir) / family / dataset
    if not base.is_dir():
        return []
    names = [p.name for p in base.iterdir() if p.is_dir() and (p / "labeled.txt").is_file()]
    return sorted(names, key=_split_sort_key)


def resolve_split(dataset: str, family: str, split: str, splits_dir: str | Path | None = None, *,
                  root: str | Path | None = None) -> SplitLists:
    """Labeled / unlabeled / val lists of ``split`` ("92", "1_16", "186", "1_512", ...).

    ``root`` (a local data root) is needed only to build the COCO unlabeled pool from
    ``root/train2017/*.jpg`` when no ``<family>/coco/train.txt`` list is vendored. A split written
    with a slash ("1/16") is accepted as its folder name ("1_16").
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r}: allowed {', '.join(DATASETS)}")
    if family not in FAMILIES:
        raise ValueError(f"split family={family!r}: allowed {', '.join(FAMILIES)}")
    base = _base_dir(splits_dir)
    split = str(split).replace("/", "_")
    names = available_splits(dataset, family, base)
    if split not in names:
        other = [f for f in FAMILIES if f != family and available_splits(dataset, f, base)]
        hint = f"; the {', '.join(other)} family has {dataset} splits" if other and not names else ""
        raise ValueError(f"split={split!r} for dataset={dataset!r}, family={family!r}: available "
                         f"{', '.join(names) if names else 'none'}{hint}")
    sha: dict[str, str] = {}
    labeled = _read_list(base, f"{family}/{dataset}/{split}/labeled.txt", dataset, sha)
    val = _read_list(base, f"{family}/{dataset}/val.txt", dataset, sha)
    unlabeled_rel = f"{family}/{dataset}/{split}/unlabeled.txt"
    if (base / unlabeled_rel).is_file():
        unlabeled: tuple[Entry, ...] | None = _read_list(base, unlabeled_rel, dataset, sha)
    else:
        pool = _pool(base, dataset, family, root, sha)
        if pool is None:
            unlabeled = None
        else:
            taken = {image for image, _ in labeled}
            unlabeled = tuple(e for e in pool if e[0] not in taken)
    return SplitLists(labeled=labeled, unlabeled=unlabeled, val=val, sha256=sha)


def parse_line(line: str, dataset: str) -> Entry:
    """One list line -> (image, mask); two fields pass through, one field is mapped per data set."""
    parts = line.split()
    if len(parts) == 2:
        return parts[0], parts[1]
    if len(parts) != 1:
        raise ValueError(f"split line {line!r}: expected 'IMAGE MASK' or one image id / path")
    item = parts[0]
    if dataset == "pascal":
        # U2PL's VOC lists hold ids; its data root keeps the SBD-augmented single-channel class masks
        # in SegmentationClassAug (U2PL data/pascal layout). The VOC reader also accepts the sibling
        # SegmentationClass folder, which is where UniMatch keeps the same masks.
        return f"JPEGImages/{item}.jpg", f"SegmentationClassAug/{item}.png"
    if dataset == "cityscapes":
        return item, cityscapes_mask_path(item)
    if dataset == "coco":
        stem = Path(item).stem
        image = item if "/" in item else f"{COCO_TRAIN_DIR}/{stem}.jpg"
        return image, f"masks/{stem}.png"
    raise ValueError(f"dataset={dataset!r}: allowed {', '.join(DATASETS)}")


def cityscapes_mask_path(image_relpath: str) -> str:
    """``leftImg8bit/<set>/<city>/<name>_leftImg8bit.png`` -> the ``gtFine`` labelTrainIds path.

    This is the official Cityscapes naming (cityscapesScripts README, "Dataset Structure").
    """
    parts = image_relpath.split("/")
    suffix = "_leftImg8bit.png"
    if len(parts) < 4 or parts[-4] != "leftImg8bit" or not parts[-1].endswith(suffix):
        raise ValueError(f"Cityscapes image path {image_relpath!r}: expected "
                         f"'leftImg8bit/<set>/<city>/<name>{suffix}'")
    parts[-4] = "gtFine"
    parts[-1] = parts[-1][: -len(suffix)] + "_gtFine_labelTrainIds.png"
    return "/".join(parts)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _base_dir(splits_dir: str | Path | None) -> Path:
    base = Path(splits_dir) if splits_dir is not None else DEFAULT_SPLITS_DIR
    if not base.is_dir():
        raise FileNotFoundError(f"splits folder {str(base)!r} does not exist: pass splits_dir= (the "
                                "default is <repo>/experiments/splits, found beside the s4mc package)")
    return base


def _read_list(base: Path, rel: str, dataset: str, sha: dict[str, str]) -> tuple[Entry, ...]:
    path = base / rel
    if not path.is_file():
        raise FileNotFoundError(f"split list {str(path)!r} does not exist")
    sha[rel] = file_sha256(path)
    # splitlines() + strip: files may lack a final newline (splits/README.md) and blank lines are noise.
    lines = [line.strip() for line in path.read_text().splitlines()]
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            entries.append(parse_line(line, dataset))
        except ValueError as err:
            raise ValueError(f"{path}:{number}: {err}") from None
    return tuple(entries)


def _pool(base: Path, dataset: str, family: str, root: str | Path | None,
          sha: dict[str, str]) -> tuple[Entry, ...] | None:
    pool_rel = _POOL_FILES.get(dataset, "").format(family=family)
    if pool_rel and (base / pool_rel).is_file():
        return _read_list(base, pool_rel, dataset, sha)
    if dataset == "cityscapes":
        # No pool file: the union of the family's labeled + unlabeled lists is the 2,975 train images.
        seen: dict[str, Entry] = {}
        for name in available_splits(dataset, family, base):
            for kind in ("labeled", "unlabeled"):
                rel = f"{family}/{dataset}/{name}/{kind}.txt"
                if (base / rel).is_file():
                    seen.update((e[0], e) for e in _read_list(base, rel, dataset, sha))
        return tuple(sorted(seen.values()))
    if dataset == "coco":
        if root is None:
            return None
        folder = Path(root) / COCO_TRAIN_DIR
        if not folder.is_dir():
            raise FileNotFoundError(f"COCO training pool {str(folder)!r} does not exist (needed for the "
                                    "unlabeled list, which the release does not publish)")
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".jpg")
        sha[f"{folder}/ (listing)"] = hashlib.sha256("\n".join(names).encode()).hexdigest()
        return tuple((f"{COCO_TRAIN_DIR}/{n}", f"masks/{Path(n).stem}.png") for n in names)
    raise FileNotFoundError(f"no training pool for dataset={dataset!r}: {base / pool_rel} is missing")


def _split_sort_key(name: str) -> tuple[int, float, str]:
    # Counts first ("92" < "183"), then fractions ("1_16" < "1_8"); unknown names last.
    try:
        if "_" in name:
            num, den = name.split("_", 1)
            return 1, float(num) / float(den), name
        return 0, float(name), name
    except ValueError:
        return 2, 0.0, name
