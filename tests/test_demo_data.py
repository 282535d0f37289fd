"""Demo dataset generator: deterministic bytes, idempotent reruns, and a round trip through the ReasonSeg adapter."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.demo import DEMO_VERSION, MARKER_NAME, generate_demo_dataset
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
    assert json.loads((root / MARKER_NAME).read_text()) == {
        "version": DEMO_VERSION, "n_train": 2, "n_val": 1, "n_test": 0, "seed": 0,
    }  # fmt: skip
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
    assert 1 <= len(annotation["text"]) <= 2 and isinstance(annotation["is_sentence"], bool)
    assert annotation["shapes"][0]["label"] == "target" and len(annotation["shapes"][0]["points"]) >= 3
    assert json.loads((root / "train" / "demo_train_0001.json").read_text())["is_sentence"] is False
    n_queries = sum(len(json.loads(p.read_text())["text"]) for p in (root / "train").glob("*.json"))
    with Image.open(root / "train" / "demo_train_0000.jpg") as image:
        assert image.format == "JPEG" and 160 <= image.width <= 256 and 160 <= image.height <= 256
    explanations = json.loads((root / "explanatory" / "train.json").read_text())
    assert len(explanations) == n_queries >= 6 and set(explanations[0]) == {"image", "query", "outputs"}
    assert explanations[0]["image"] == "demo_train_0000.jpg" and explanations[0]["query"] == annotation["text"][0]


def test_default_demo_round_trips_through_the_reasonseg_adapter(tmp_path):
    data_root = tmp_path / "demo"
    generate_demo_dataset(data_root)  # the pipeline's default: 48 train, 16 val
    root = data_root / "reason_seg" / "ReasonSeg"
    train_queries = json.loads((root / "explanatory" / "train.json").read_text())
    train = build_manifest("reasonseg", data_root, "train", tmp_path / "reasonseg-train.parquet")
    val = build_manifest("reasonseg", data_root, "val", tmp_path / "reasonseg-val.parquet")
    assert (train.rows, train.skipped) == (len(train_queries), {}) and 80 <= train.rows <= 96
    assert (val.rows, val.skipped) == (16, {})
    rows = pq.read_table(train.path).to_pylist() + pq.read_table(val.path).to_pylist()
    assert {r["query_kind"] for r in rows} == {"sentence", "phrase"}
    assert 0.3 * len(rows) < sum(r["query_kind"] == "sentence" for r in rows) < 0.7 * len(rows)
    assert all(r["reference_answer"] for r in rows)
    assert any(r["query"].startswith(("Which object", "What")) for r in rows)
    assert any(r["query"].startswith("the object ") for r in rows)
    assert any(r["query"].startswith("Of the two ") or " of the two " in r["query"] for r in rows)
    with_ignore = 0
    for row in rows:
        mask = rasterize(row["mask"], row["height"], row["width"], data_root)
        assert mask.shape == (row["height"], row["width"])
        assert set(np.unique(mask).tolist()) <= {0, 1, 255}
        assert (mask == 1).sum() > 100  # the target is at least ~0.09 * 160 px in radius
        with_ignore += bool((mask == 255).any())
    assert 0.1 * len(rows) < with_ignore < 0.6 * len(rows)


def test_test_split_and_seed_give_fresh_scenes(tmp_path):
    root = generate_demo_dataset(tmp_path, n_train=0, n_val=2, n_test=3, seed=11)
    assert sorted(p.name for p in (root / "test").glob("*.jpg")) == [f"demo_test_{i:04d}.jpg" for i in range(3)]
    test = build_manifest("reasonseg", tmp_path, "test", tmp_path / "reasonseg-test.parquet")
    assert (test.rows, test.skipped) == (3, {})
    assert all(r["reference_answer"] for r in pq.read_table(test.path).to_pylist())
