"""Label-map adapters: ADE20K and COCO-Stuff -> one manifest row per (image, class present in its label PNG).

ADE20K: ``ade20k/images/{training,validation}/<id>.jpg`` + ``ade20k/annotations/<same>/<id>.png``; raw value 0 is
"other" (ignored), value v in 1..150 is ``ADE20K_CLASSES[v - 1]``.
COCO-Stuff: label maps ``cocostuff/{train2017,val2017}/<id>.png`` with images ``coco/<same>/<id>.jpg``; raw value i is
``COCO_STUFF_CLASSES[i]``, 255 is unlabeled, and every class whose name contains "-" is ignored, as in LISA.

The mask reference points at the label PNG (``label_png`` kind): the queried class's raw value -> 1, ignored raw values
-> 255. Values outside the class list are counted as skipped ("unknown label value") and treated as ignore. Skip counts
are per (image, class) sample; when the label map itself cannot be read, per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from shared.console import progress as tqdm  # tqdm on a terminal, plain lines in a log

from manifests.class_names import ADE20K_CLASSES, COCO_STUFF_CLASSES
from manifests.common import ManifestBuilder, SkipSample, image_files_by_stem
from shared.masks import LABEL_PNG_MODES, mask_ref_json
from shared.paths import PathEscapeError, resolve_inside

FAMILY = "semantic"
SPLITS = ("train", "val")
ADE20K_SPLIT_DIRS = {"train": "training", "val": "validation"}
COCO_STUFF_SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
COCO_STUFF_UNLABELED = 255
ADE20K_OTHER = 0


@dataclass(frozen=True)
class LabelSample:
    """One label map and its image, both relative to the data root."""

    image_id: str
    image_path: str
    label_path: str


def read_label_map(data_root: Path, label_path: str, where: str) -> np.ndarray:
    """Raw values of a single-channel label PNG, HxW.

    Raises:
        SkipSample: "path escapes data_root", "label missing" or "label unreadable".
    """
    try:
        absolute = resolve_inside(data_root, label_path)
    except PathEscapeError as error:
        raise SkipSample("path escapes data_root", f"{where}: {error}") from error
    if not absolute.is_file():
        raise SkipSample("label missing", f"{where}: {label_path} not found")
    try:
        with Image.open(absolute) as label_image:
            if label_image.mode not in LABEL_PNG_MODES:
                detail = f"{where}: {label_path} has mode {label_image.mode}, expected one channel"
                raise SkipSample("label unreadable", detail)
            label = np.asarray(label_image)
    except SkipSample:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise SkipSample("label unreadable", f"{where}: {label_path}: {error}") from error
    if label.ndim != 2 or label.min(initial=0) < 0:
        raise SkipSample("label unreadable", f"{where}: {label_path} is not a 2-D map of non-negative values")
    return label.astype(np.uint8) if label.dtype == bool else label


def _values_present(label: np.ndarray) -> list[int]:
    """Distinct raw values of ``label``, ascending (bincount for 8/16-bit maps: much faster than np.unique)."""
    if label.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(label.ravel())).tolist()
    return [int(value) for value in np.unique(label)]


@dataclass(frozen=True)
class LabelScheme:
    """How raw label values read: queryable classes, and values that mark ignore regions."""

    class_of_value: dict[int, str]
    unlabeled: int  # listed in every mask reference's ignore_values
    ignored_classes: frozenset[int] = frozenset()  # listed when present in the image


ADE20K_SCHEME = LabelScheme({value + 1: name for value, name in enumerate(ADE20K_CLASSES)}, unlabeled=ADE20K_OTHER)
COCO_STUFF_SCHEME = LabelScheme(
    {value: name for value, name in enumerate(COCO_STUFF_CLASSES) if "-" not in name},
    unlabeled=COCO_STUFF_UNLABELED,
    ignored_classes=frozenset(value for value, name in enumerate(COCO_STUFF_CLASSES) if "-" in name),
)


def _add_label_samples(builder: ManifestBuilder, sample: LabelSample, scheme: LabelScheme) -> None:
    """Rows for every queryable class present in ``sample``'s label map; ``query_index`` is the raw label value."""
    where = sample.label_path
    label = read_label_map(builder.data_root, sample.label_path, where)
    present = _values_present(label)
    known_ignores = scheme.ignored_classes | {scheme.unlabeled}
    unknown = [value for value in present if value not in scheme.class_of_value and value not in known_ignores]
    if unknown:
        builder.skip("unknown label value", f"{where}: values {unknown} are outside the class list", len(unknown))
    queried = [value for value in present if value in scheme.class_of_value]
    if not queried:
        raise SkipSample("no labelled class", f"{where}: only ignored values {present}")
    try:
        height, width = builder.image_size(sample.image_path, where)
    except SkipSample as skip:
        raise skip.times(len(queried)) from None
    if label.shape != (height, width):
        raise SkipSample(
            "label size differs from image",
            f"{where}: label {label.shape[0]}x{label.shape[1]}, image {height}x{width}",
            len(queried),
        )
    ignore_values = sorted({scheme.unlabeled, *unknown, *(v for v in present if v in scheme.ignored_classes)})
    for value in queried:
        mask = {"type": "label_png", "path": sample.label_path, "class_values": [value], "ignore_values": ignore_values}
        builder.add_unless_duplicate(
            image_id=sample.image_id,
            query_index=value,
            family=FAMILY,
            image_path=sample.image_path,
            query=scheme.class_of_value[value],
            query_kind="class",
            mask=mask_ref_json(mask),
            height=height,
            width=width,
            source=f"{where} value {value}",
        )


def _build(builder: ManifestBuilder, samples: list[LabelSample], scheme: LabelScheme) -> None:
    for sample in tqdm(samples, desc=f"{builder.dataset}/{builder.split}", unit="image"):
        try:
            _add_label_samples(builder, sample, scheme)
        except SkipSample as skip:
            builder.skip(skip.reason, skip.detail, skip.count)


def _check_split(dataset: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{dataset} has no split {split!r}; valid: {', '.join(SPLITS)}")


def build_ade20k(data_root: Path, split: str) -> ManifestBuilder:
    """ADE20K ``split`` (train -> training, val -> validation) into a filled builder."""
    _check_split("ade20k", split)
    data_root = Path(data_root)
    folder = ADE20K_SPLIT_DIRS[split]
    image_dir = data_root / "ade20k" / "images" / folder
    label_dir = data_root / "ade20k" / "annotations" / folder
    if not image_dir.is_dir() and not label_dir.is_dir():
        raise FileNotFoundError(f"ADE20K {split} folders not found: {image_dir}, {label_dir}")
    builder = ManifestBuilder("ade20k", split, data_root)
    images = image_files_by_stem(image_dir)  # ADE_x.jpg or ADE_x.JPG ...: the bytes decide if it is one we read
    stems = sorted(set(images) | {p.stem for p in label_dir.glob("*.png")})
    samples = [
        LabelSample(stem, f"ade20k/images/{folder}/{images.get(stem, stem + '.jpg')}",
                    f"ade20k/annotations/{folder}/{stem}.png")
        for stem in stems
    ]  # fmt: skip
    _build(builder, samples, ADE20K_SCHEME)
    return builder


def build_cocostuff(data_root: Path, split: str) -> ManifestBuilder:
    """COCO-Stuff ``split`` (label maps in cocostuff/<split>2017, images in coco/<split>2017) into a filled builder."""
    _check_split("cocostuff", split)
    data_root = Path(data_root)
    folder = COCO_STUFF_SPLIT_DIRS[split]
    label_dir = data_root / "cocostuff" / folder
    if not label_dir.is_dir():
        raise FileNotFoundError(f"COCO-Stuff label folder not found: {label_dir}")
    builder = ManifestBuilder("cocostuff", split, data_root)
    samples = [
        LabelSample(path.stem, f"coco/{folder}/{path.stem}.jpg", f"cocostuff/{folder}/{path.name}")
        for path in sorted(label_dir.glob("*.png"))
    ]
    _build(builder, samples, COCO_STUFF_SCHEME)
    return builder
