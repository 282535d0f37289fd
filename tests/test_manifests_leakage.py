"""No COCO image of an evaluated refCOCO-family split enters a COCO-based training manifest (paper Sec. 4.1), on
hand-made refCOCO / refCOCOg / COCO-Stuff / PACO-LVIS data in their real formats."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from manifests.leakage import held_out_coco_ids, training_view
from manifests.registry import build_manifest

from fixtures_datasets import (
    make_ref, rectangle_polygon, write_coco_json, write_jpeg, write_label_png, write_refer_dataset,
)  # fmt: skip

COCO_DIR = "refer_seg/images/mscoco/images/train2014"
H, W = 30, 40


def _coco_world(root):
    """refcoco: train on images 1, 2; val on 3; testA on 4. refcocog: train on 3 (a refcoco val image), 4 (testA) and
    5. COCO-Stuff train: images 3 and 6. PACO-LVIS train: images 4 and 7."""
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": H, "width": W} for i in range(1, 8)]
    for i in range(1, 8):
        write_jpeg(root / COCO_DIR / f"COCO_train2014_{i:012d}.jpg", H, W)
        write_jpeg(root / "coco" / "train2017" / f"{i:012d}.jpg", H, W)
    annotations = [{"id": 100 + i, "image_id": i, "category_id": 1, "segmentation": [rectangle_polygon(2, 2, 20, 20)]}
                   for i in range(1, 8)]  # fmt: skip
    write_refer_dataset(root, "refcoco", [
        make_ref(1, 101, 1, "train", ["left dog"]), make_ref(2, 102, 2, "train", ["red car", "car"]),
        make_ref(3, 103, 3, "val", ["the man"]), make_ref(4, 104, 4, "testA", ["a woman", "woman left"]),
    ], images, annotations)  # fmt: skip
    write_refer_dataset(root, "refcocog", [
        make_ref(5, 103, 3, "train", ["the man in a blue shirt", "a man standing"]),
        make_ref(6, 104, 4, "train", ["the woman holding a cup"]),
        make_ref(7, 105, 5, "train", ["a dog lying on grass"]), make_ref(8, 106, 6, "val", ["a chair"]),
    ], images, annotations, split_by="umd")  # fmt: skip
    label = np.full((H, W), 255, np.uint8)
    label[:5], label[5:10] = 156, 0  # sky, person: two samples per image
    for i in (3, 6):
        write_label_png(root / "cocostuff" / "train2017" / f"{i:012d}.png", label)
    paco_images = [{"id": i, "file_name": f"train2017/{i:012d}.jpg", "height": H, "width": W} for i in (4, 7)]
    paco_annotations = [
        {"id": 1, "image_id": 4, "category_id": 1, "segmentation": [rectangle_polygon(0, 0, 10, 10)]},
        {"id": 2, "image_id": 4, "category_id": 2, "segmentation": [rectangle_polygon(0, 0, 5, 5)]},
        {"id": 3, "image_id": 7, "category_id": 1, "segmentation": [rectangle_polygon(0, 0, 10, 10)]},
    ]
    write_coco_json(root / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json", paco_images,
                    paco_annotations, [{"id": 1, "name": "dog"}, {"id": 2, "name": "dog:leg"}])  # fmt: skip


def test_images_of_evaluated_refcoco_splits_leave_every_coco_based_training_manifest(tmp_path):
    root, out = tmp_path / "data", tmp_path / "manifests"
    _coco_world(root)
    specs = ["refcoco/train", "refcoco/val", "refcoco/testA", "refcocog/train", "refcocog/val", "cocostuff/train",
             "paco_lvis/train"]  # fmt: skip
    paths = {}
    for spec in specs:
        dataset, split = spec.split("/")
        paths[spec] = build_manifest(dataset, root, split, out / f"{dataset}-{split}.parquet").path
    assert pq.read_metadata(paths["refcocog/train"]).num_rows == 4
    assert pq.read_metadata(paths["cocostuff/train"]).num_rows == 4
    assert pq.read_metadata(paths["paco_lvis/train"]).num_rows == 3

    held_out = held_out_coco_ids([(spec, paths[spec]) for spec in ("refcoco/val", "refcoco/testA")])
    assert held_out == {3, 4}
    assert held_out_coco_ids([("refcoco/train", paths["refcoco/train"])]) == set()  # a train split holds nothing out

    expected = {  # spec: (rows excluded, images excluded, image ids kept)
        "refcoco/train": (0, 0, {"1", "2"}),
        "refcocog/train": (3, 2, {"5"}),  # 2 sentences on image 3, 1 on image 4
        "cocostuff/train": (2, 1, {"000000000006"}),  # sky and person of image 3
        "paco_lvis/train": (2, 1, {"7"}),  # dog and dog leg of image 4
    }
    for spec, (rows, images, kept) in expected.items():
        exclusion = training_view(spec, paths[spec], held_out)
        assert (exclusion.excluded_rows, exclusion.excluded_images) == (rows, images), spec
        table = pq.read_table(exclusion.manifest)
        assert set(table["image_id"].to_pylist()) == kept, spec
        assert table.num_rows == pq.read_metadata(paths[spec]).num_rows - rows
        if rows:
            assert exclusion.manifest.parent == out / "training" and exclusion.manifest != paths[spec]
            record = json.loads(exclusion.manifest.with_suffix(".json").read_text())
            assert (record["excluded_rows"], record["excluded_images"], record["held_out_images"]) == (rows, images, 2)
            assert f"{spec}: excluded {rows} rows of {images} COCO images" in exclusion.describe()
        else:
            assert exclusion.manifest == paths[spec]

    again = training_view("refcocog/train", paths["refcocog/train"], held_out)  # reused, same file
    stamp = again.manifest.stat().st_mtime_ns
    assert training_view("refcocog/train", paths["refcocog/train"], held_out).manifest.stat().st_mtime_ns == stamp
    only_val = training_view("refcocog/train", paths["refcocog/train"], {3})  # other held-out ids, another view
    assert only_val.manifest != again.manifest and only_val.excluded_rows == 2
    assert training_view("reasonseg/train", paths["refcoco/train"], held_out).excluded_rows == 0  # not COCO-based
    from shared.config import PipelineConfig
    from stage2_segment.data import Stage2Source
    from stage2_segment.train import train_name

    full = Stage2Source("refcocog/train", paths["refcocog/train"], tmp_path / "shards", "run")
    view = Stage2Source("refcocog/train", again.manifest, tmp_path / "shards", "run")
    assert train_name(PipelineConfig(), [full]) != train_name(PipelineConfig(), [view])  # new data, new training
