"""One path policy for every file a manifest reads, and images admitted by their content, injected for real on disk.

- A ReasonSeg annotation JSON symlinked to a file outside the data root is skipped ("path escapes data_root"), as a
  symlinked image is; an explanatory JSON, a refCOCO ``instances.json`` / refs pickle and a PASCAL-Part JSON linked
  outside are refused, naming the file.
- ``a.JPG`` is an image (its bytes say JPEG), not "image missing".
- A float TIFF saved as ``.jpg`` is refused by its content ("image format not read", naming the file and the format)
  instead of decoding to an all-white picture; stage 1 and 2's ``load_rgb`` refuse it the same way.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.registry import build_manifest
from shared.images import ImageFormatError, load_rgb, read_image_size
from shared.paths import PathEscapeError

from fixtures_datasets import (
    make_ref,
    rectangle_polygon,
    reasonseg_shape,
    write_coco_json,
    write_jpeg,
    write_reasonseg_explanatory,
    write_reasonseg_item,
    write_refer_dataset,
)

TARGET = reasonseg_shape("target", [[10, 5], [29, 5], [29, 19], [10, 19]])
VAL = ("reason_seg", "ReasonSeg", "val")


def _build(root, tmp_path, dataset="reasonseg", split="val"):
    result = build_manifest(dataset, root, split, tmp_path / f"{dataset}-{split}.parquet")
    return result, pq.read_table(result.path).to_pylist()


def _float_tiff(path):
    """A 32-bit float TIFF (mode F, values in 0..1, as scientific tools write them) under ``path``'s name."""
    values = np.linspace(0.0, 1.0, 40 * 60, dtype=np.float32).reshape(40, 60)
    Image.fromarray(values, mode="F").save(path, format="TIFF")
    return path


def test_annotation_json_symlinked_outside_the_root_is_skipped(tmp_path):
    root = tmp_path / "data"
    outside = write_reasonseg_item(tmp_path / "elsewhere", "val", "linked", ["a query from outside"], False, [TARGET])
    write_reasonseg_item(root, "val", "kept", ["the other thing"], False, [TARGET])
    split_dir = root.joinpath(*VAL)
    write_jpeg(split_dir / "linked.jpg", 40, 60)  # the image is inside; only its annotation points out
    (split_dir / "linked.json").symlink_to(outside)
    result, rows = _build(root, tmp_path)
    assert [r["sample_id"] for r in rows] == ["reasonseg/val/kept/0"]
    assert result.skipped == {"path escapes data_root": 1}
    assert "linked.json" in result.examples["path escapes data_root"][0]


def test_explanatory_json_symlinked_outside_the_root_is_not_read(tmp_path, caplog):
    root = tmp_path / "data"
    write_reasonseg_item(root, "val", "v1", ["Which thing holds soup?"], True, [TARGET])
    outside = write_reasonseg_explanatory(tmp_path / "elsewhere", "val", [
        {"image": "v1.jpg", "query": "Which thing holds soup?", "outputs": "read from outside the data root"},
    ])  # fmt: skip
    link = root.joinpath("reason_seg", "ReasonSeg", "explanatory", "val.json")
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    _, rows = _build(root, tmp_path)
    assert [r["reference_answer"] for r in rows] == [None]
    assert "outside" in caplog.text and "reference answers not loaded" in caplog.text


def _refcoco(root):
    images = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40}]
    write_jpeg(root / "refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg", 30, 40)
    annotations = [{"id": 101, "image_id": 1, "category_id": 1, "segmentation": [rectangle_polygon(1, 1, 9, 9)]}]
    return write_refer_dataset(root, "refcoco", [make_ref(1, 101, 1, "train", ["the dog"])], images, annotations)


@pytest.mark.parametrize("linked", ["instances.json", "refs(unc).p"])
def test_refer_files_symlinked_outside_the_root_are_refused(tmp_path, linked):
    root = tmp_path / "data"
    folder = _refcoco(root)
    _, rows = _build(root, tmp_path / "before", "refcoco", "train")
    assert len(rows) == 1  # the dataset is fine as it is
    outside = tmp_path / "elsewhere" / linked
    outside.parent.mkdir()
    (folder / linked).rename(outside)
    (folder / linked).symlink_to(outside)
    with pytest.raises(PathEscapeError, match=r"refs\(unc\)\.p|instances\.json") as caught:
        build_manifest("refcoco", root, "train", tmp_path / "refcoco-train.parquet")
    assert str(root.resolve()) in str(caught.value) and linked in str(caught.value)


def test_part_annotation_json_symlinked_outside_the_root_is_refused(tmp_path):
    root = tmp_path / "data"
    write_jpeg(root / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/1.jpg", 30, 40)
    outside = write_coco_json(
        tmp_path / "elsewhere" / "train.json", [{"id": 1, "file_name": "1.jpg", "height": 30, "width": 40}],
        [{"id": 5, "image_id": 1, "category_id": 1, "segmentation": [rectangle_polygon(1, 1, 9, 9)]}],
        [{"id": 1, "name": "dog:leg"}],
    )  # fmt: skip
    (root / "vlpart/pascal_part/train.json").symlink_to(outside)
    with pytest.raises(PathEscapeError, match="train.json"):
        build_manifest("pascal_part", root, "train", tmp_path / "pascal_part-train.parquet")


def test_an_upper_case_jpg_is_an_image(tmp_path):
    root = tmp_path / "data"
    json_path = write_reasonseg_item(root, "val", "shouting", ["the bowl"], False, [TARGET], with_image=False)
    write_jpeg(json_path.with_name("shouting.JPG"), 40, 60)
    write_reasonseg_item(root, "val", "quiet", ["the cup"], False, [TARGET])
    result, rows = _build(root, tmp_path)
    assert result.skipped == {}
    assert [r["image_path"] for r in rows] == ["reason_seg/ReasonSeg/val/quiet.jpg", "reason_seg/ReasonSeg/val/shouting.JPG"]
    assert load_rgb(root / rows[1]["image_path"]).shape == (40, 60, 3)


def test_a_float_tiff_named_jpg_is_refused_by_its_content(tmp_path):
    root = tmp_path / "data"
    json_path = write_reasonseg_item(root, "val", "float", ["the gradient"], False, [TARGET], with_image=False)
    tiff = _float_tiff(json_path.with_name("float.jpg"))
    write_reasonseg_item(root, "val", "kept", ["the cup"], False, [TARGET])
    result, rows = _build(root, tmp_path)
    assert [r["sample_id"] for r in rows] == ["reasonseg/val/kept/0"]
    assert result.skipped == {"image format not read": 1}
    example = result.examples["image format not read"][0]
    assert "float.jpg" in example and "TIFF" in example and "JPEG, PNG, BMP, WEBP" in example
    for read in (load_rgb, read_image_size):  # stage 1 and 2 decode with load_rgb: the same refusal there
        with pytest.raises(ImageFormatError, match=r"float\.jpg: a TIFF image"):
            read(tiff)


def test_allowed_formats_are_read_whatever_their_name(tmp_path):
    picture = Image.new("RGB", (6, 4), (10, 200, 30))
    for image_format, name in (("PNG", "a.jpg"), ("BMP", "b.BMP"), ("WEBP", "c.webp"), ("JPEG", "d.jpeg")):
        picture.save(tmp_path / name, format=image_format, **({"lossless": True} if image_format == "WEBP" else {}))
        assert load_rgb(tmp_path / name).shape == (4, 6, 3), name
    picture.save(tmp_path / "e.gif", format="GIF")
    with pytest.raises(ImageFormatError, match="e.gif: a GIF image"):
        load_rgb(tmp_path / "e.gif")
