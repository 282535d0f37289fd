"""Held-out COCO images: the images of evaluated refCOCO-family splits never enter a COCO-based training manifest.

The paper (Sec. 4.1) excludes the COCO images of refCOCO(+/g) val and test from training. refCOCO, refCOCO+ and
refCOCOg draw on COCO train2014; COCO-Stuff and PACO-LVIS on COCO 2017, which keeps the 2014 image ids. So an image of
an evaluated refCOCO-family split can sit in the training data of another dataset (refCOCOg train holds refCOCO val
images) or of the same family under another split scheme.

``held_out_coco_ids`` collects the COCO ids of the evaluated refCOCO-family manifests (refclef is not COCO);
``training_view`` writes a copy of a COCO-based training manifest without the rows of those images, in a folder beside
the full manifests (``training/<dataset>-<split>.heldout-<digest>.parquet``, the digest over the manifest's bytes and
the held-out ids, so it is rebuilt when either changes), and a ``.json`` beside it with what was excluded. Datasets
that are not COCO-based are returned unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

REFER_COCO_DATASETS = ("refcoco", "refcoco+", "refcocog")  # refclef uses SAIAPR TC-12 images
COCO_BASED_DATASETS = (*REFER_COCO_DATASETS, "cocostuff", "paco_lvis")
TRAINING_VIEWS_DIR = "training"  # beside the full manifests


@dataclass(frozen=True)
class Exclusion:
    """A training manifest after leaving out held-out COCO images."""

    spec: str
    manifest: Path  # the manifest to train on (the full one when nothing was excluded)
    excluded_rows: int
    excluded_images: int

    def describe(self) -> str:
        return (f"{self.spec}: excluded {self.excluded_rows} rows of {self.excluded_images} COCO images that appear "
                "in an evaluated refCOCO-family split")  # fmt: skip


def coco_id(image_id: str) -> int | None:
    """The COCO image id of a COCO-based manifest's ``image_id`` (``"139"`` or COCO-Stuff's ``"000000000139"``)."""
    return int(image_id) if image_id.isdigit() else None


def held_out_coco_ids(eval_manifests: Iterable[tuple[str, Path]]) -> set[int]:
    """COCO ids of the images of every evaluated refCOCO-family split (``(spec, manifest path)`` pairs; other
    datasets and train splits are ignored)."""
    held_out: set[int] = set()
    for spec, path in eval_manifests:
        dataset, split = spec.split("/")
        if dataset in REFER_COCO_DATASETS and split != "train":
            ids = pq.read_table(path, columns=["image_id"])["image_id"].to_pylist()
            held_out.update(i for i in map(coco_id, ids) if i is not None)
    return held_out


def training_view(spec: str, manifest: Path, held_out: set[int]) -> Exclusion:
    """``manifest`` without the rows whose COCO image is in ``held_out`` (written once, reused while the manifest
    and the held-out ids are the same); the full manifest when ``spec``'s dataset is not COCO-based or nothing
    matches."""
    manifest = Path(manifest)
    dataset = spec.split("/")[0]
    if dataset not in COCO_BASED_DATASETS or not held_out:
        return Exclusion(spec, manifest, 0, 0)
    table = pq.read_table(manifest)
    ids = [coco_id(i) for i in table["image_id"].to_pylist()]
    leaked = [i is not None and i in held_out for i in ids]
    excluded_images = len({i for i, bad in zip(ids, leaked) if bad})
    if not any(leaked):
        return Exclusion(spec, manifest, 0, 0)
    digest = hashlib.sha256(manifest.read_bytes())
    digest.update(json.dumps(sorted(held_out)).encode())
    view = manifest.parent / TRAINING_VIEWS_DIR / f"{manifest.stem}.heldout-{digest.hexdigest()[:12]}.parquet"
    exclusion = Exclusion(spec, view, sum(leaked), excluded_images)
    if not view.is_file():
        view.parent.mkdir(parents=True, exist_ok=True)
        kept = table.filter(pc.invert(pa.array(leaked)))
        temporary = view.with_name(f"{view.name}.{os.getpid()}.tmp")
        pq.write_table(kept, temporary)
        os.replace(temporary, view)
        record = {"spec": spec, "source_manifest": str(manifest), "excluded_rows": exclusion.excluded_rows,
                  "excluded_images": excluded_images, "held_out_images": len(held_out)}  # fmt: skip
        view.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("%s", exclusion.describe())
    return exclusion
