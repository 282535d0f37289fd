"""Demo dataset generator: deterministic bytes, idempotent reruns, and a round trip through the ReasonSeg adapter."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.demo import MARKER_NAME, generate_demo_dataset
from manifests.registry import build_manifest
from shared.masks import rasterize


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_write_identical_bytes(tmp_path):
    first = generate_demo_dataset(tmp_path / "a", n_train=4, n_val=3, seed=5)
    second = generate_demo_dataset(tmp_path / "b", n_train=4, n_val=3, seed=5)
    assert first == tmp_path / "a" / "reason_seg" / "ReasonSeg"
    files_a, files_b = _tree(first), _tree(second)
    assert sorted(files_a) == sorted(files_b)
    assert len([name for name in files_a if name.endswith(".jpg")]) == 7
    assert files_a == files_b
    other_seed = _tree(generate_demo_dataset(tmp_path / "c", n_train=4, n_val=3, seed=6))
    assert other_seed["train/demo_train_0000.jpg"] != files_a["train/demo_train_0000.jpg"]


def test_rerun_is_idempotent_and_new_parameters_regenerate(tmp_path):
    root = generate_demo_dataset(tmp_path, n_train=3, n_val=2)
    image = root / "train" / "demo_train_0000.jpg"
    stamp = image.stat().st_mtime_ns
    assert generate_demo_dataset(tmp_path, n_train=3, n_val=2) == root
    assert image.stat().st_mtime_ns == stamp
    generate_demo_dataset(tmp_path, n_train=2, n_val=1)
    assert sorted(p.name for p in (root / "train").iterdir()) == [
        "demo_train_0000.jpg", "demo_train_0000.json", "demo_train_0001.jpg", "demo_train_0001.json",
    ]  # fmt: skip
    assert json.loads((root / MARKER_NAME).read_text()) == {"version": 1, "n_train": 2, "n_val": 1, "seed": 0}
    assert len(json.loads((root / "explanatory" / "val.json").read_text())) in (1, 2)


def test_refuses_to_mix_with_a_real_dataset(tmp_path):
    real = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    real.mkdir(parents=True)
    (real / "abc123.json").write_text("{}")
    with pytest.raises(FileExistsError, match="abc123.json"):
        generate_demo_dataset(tmp_path, n_train=1, n_val=1)
    assert sorted(p.name for p in real.iterdir()) == ["abc123.json"]


def test_files_follow_reasonseg_format(tmp_path):
    root = generate_demo_dataset(tmp_path, n_train=4, n_val=4)
    annotation = json.loads((root / "train" / "demo_train_0000.json").read_text())
    assert set(annotation) == {"text", "is_sentence", "shapes"}
    assert len(annotation["text"]) == 2 and annotation["is_sentence"] is True
    assert annotation["shapes"][0]["label"] == "target" and len(annotation["shapes"][0]["points"]) >= 3
    assert json.loads((root / "train" / "demo_train_0001.json").read_text())["is_sentence"] is False
    with Image.open(root / "train" / "demo_train_0000.jpg") as image:
        assert image.format == "JPEG" and 160 <= image.width <= 256 and 160 <= image.height <= 256
    explanations = json.loads((root / "explanatory" / "train.json").read_text())
    assert len(explanations) == 8 and set(explanations[0]) == {"image", "query", "outputs"}
    assert explanations[0]["image"] == "demo_train_0000.jpg" and explanations[0]["query"] == annotation["text"][0]


def test_default_demo_round_trips_through_the_reasonseg_adapter(tmp_path):
    data_root = tmp_path / "demo"
    generate_demo_dataset(data_root)  # the pipeline's default: 48 train, 16 val
    train = build_manifest("reasonseg", data_root, "train", tmp_path / "reasonseg-train.parquet")
    val = build_manifest("reasonseg", data_root, "val", tmp_path / "reasonseg-val.parquet")
    assert (train.rows, train.skipped) == (96, {})
    assert (val.rows, val.skipped) == (16, {})
    rows = pq.read_table(train.path).to_pylist() + pq.read_table(val.path).to_pylist()
    assert {r["query_kind"] for r in rows} == {"sentence", "phrase"}
    assert sum(r["query_kind"] == "sentence" for r in rows) == 24 * 2 + 8
    assert all(r["reference_answer"] for r in rows)
    assert any(r["query"] == "Which object in this picture could roll off a table?" for r in rows)
    assert any(r["query"].startswith("the object ") for r in rows)
    with_ignore = 0
    for row in rows:
        mask = rasterize(row["mask"], row["height"], row["width"], data_root)
        assert mask.shape == (row["height"], row["width"])
        assert set(np.unique(mask).tolist()) <= {0, 1, 255}
        assert (mask == 1).sum() > 100  # the target is at least ~0.09 * 160 px in radius
        with_ignore += bool((mask == 255).any())
    assert 0.2 * len(rows) < with_ignore < 0.6 * len(rows)
