"""Your own images and queries as an inference manifest: CSV, JSONL, Parquet and a folder, bad rows named one by one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llavaseg import cli
from manifests.table import (
    InputTableError,
    build_table_manifest,
    hashed_sample_id,
    read_rejected,
)
from shared.masks import NO_GROUND_TRUTH, NoGroundTruthError, rasterize
from shared.schema import MANIFEST_SCHEMA

SIZES = {"a.jpg": (30, 40), "b.png": (24, 32), "sub/c.jpg": (50, 20)}  # (H, W)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for name, (height, width) in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / name)
    (tmp_path / "outside.jpg").write_bytes((root / "a.jpg").read_bytes())
    return root


GOOD = [
    {"image": "a.jpg", "query": "where should the piano player sit?", "id": "first"},
    {"image": "b.png", "query": "the red ball", "id": "second", "query_kind": "phrase"},
    {"image": "sub/c.jpg", "query": "the tall thing", "id": "third", "query_kind": "sentence"},
]


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_each_format_builds_the_same_manifest(tmp_path, root, suffix):
    table = write_table(tmp_path / f"queries{suffix}", GOOD)
    built = build_table_manifest(table, root, tmp_path / "m.parquet")
    manifest = pq.read_table(built.result.path)
    assert manifest.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    rows = {row["sample_id"]: row for row in manifest.to_pylist()}
    assert sorted(rows) == ["first", "second", "third"]
    assert (rows["first"]["height"], rows["first"]["width"]) == (30, 40)
    assert (rows["third"]["height"], rows["third"]["width"]) == (50, 20)
    assert rows["third"]["image_path"] == "sub/c.jpg"
    assert [rows[k]["query_kind"] for k in ("first", "second", "third")] == ["sentence", "phrase", "sentence"]
    assert {row["split"] for row in rows.values()} == {"inference"}
    assert {row["dataset"] for row in rows.values()} == {"queries"}
    assert {row["mask"] for row in rows.values()} == {NO_GROUND_TRUTH}
    assert built.rejected == [] and built.result.rows == 3


def test_sample_id_is_a_hash_of_image_and_query_without_id(tmp_path, root):
    rows = [{"image": "a.jpg", "query": "the cup"}, {"image": "./b.png", "query": "the cup"}]
    built = build_table_manifest(write_table(tmp_path / "t.csv", rows), root, tmp_path / "m.parquet")
    ids = pq.read_table(built.result.path)["sample_id"].to_pylist()
    assert sorted(ids) == sorted([hashed_sample_id("a.jpg", "the cup"), hashed_sample_id("./b.png", "the cup")])
    assert hashed_sample_id("a.jpg", "the cup") == hashed_sample_id("a.jpg", "the cup")
    assert len(hashed_sample_id("a.jpg", "the cup")) == 18 and ids[0].startswith("h-")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_bad_rows_are_named_and_the_rest_is_built(tmp_path, root, suffix):
    rows = GOOD + [
        {"image": "b.png", "query": "again", "id": "first"},  # row 4: duplicate id
        {"image": "a.jpg", "query": "   ", "id": "blank"},  # row 5: empty query
        {"image": "../outside.jpg", "query": "the cup", "id": "escape"},  # row 6: outside the root
        {"image": "gone.jpg", "query": "the cup", "id": "gone"},  # row 7: missing image
        {"image": None, "query": "the cup", "id": "noimage"},  # row 8: missing value
    ]
    if suffix == ".jsonl":
        rows[-1] = {"query": "the cup", "id": "noimage"}
    built = build_table_manifest(write_table(tmp_path / f"t{suffix}", rows), root, tmp_path / "m.parquet")
    assert sorted(pq.read_table(built.result.path)["sample_id"].to_pylist()) == ["first", "second", "third"]
    by_row = {r.row: r for r in built.rejected}
    assert sorted(by_row) == [4, 5, 6, 7, 8]
    assert by_row[4].message == f"t{suffix} row 4 (b.png): duplicate id: sample id 'first' already used by row 1"
    assert by_row[4].sample_id == "first#row4"
    assert by_row[5].message == f"t{suffix} row 5 (a.jpg): empty query: the query is empty"
    assert by_row[6].reason == "path outside the root" and "outside" in by_row[6].message
    assert by_row[7].message == f"t{suffix} row 7 (gone.jpg): image missing: gone.jpg not found under {root}"
    assert by_row[8].message == f"t{suffix} row 8: missing value: no image"
    assert built.result.skipped == {
        "duplicate id": 1, "empty query": 1, "path outside the root": 1, "image missing": 1, "missing value": 1,
    }  # fmt: skip
    assert [r.row for r in read_rejected(built.result.path)] == [4, 5, 6, 7, 8]


def test_a_column_missing_everywhere_names_the_file_and_column(tmp_path, root):
    table = write_table(tmp_path / "t.csv", [{"image": "a.jpg", "question": "the cup"}])
    with pytest.raises(InputTableError, match=r"t.csv: missing column\(s\) \['query'\]"):
        build_table_manifest(table, root, tmp_path / "m.parquet")
    with pytest.raises(InputTableError, match="unknown table format '.tsv'"):
        build_table_manifest(write_table(tmp_path / "t.tsv", []), root, tmp_path / "m.parquet")


def test_a_folder_of_images_with_one_query(tmp_path, root):
    built = build_table_manifest(root, root, tmp_path / "m.parquet", query="the odd one out")
    manifest = pq.read_table(built.result.path).to_pylist()
    assert sorted(row["image_path"] for row in manifest) == sorted(SIZES)
    assert {row["query"] for row in manifest} == {"the odd one out"}
    with pytest.raises(InputTableError, match="give the query for them with --query"):
        build_table_manifest(root, root, tmp_path / "m.parquet")


def test_an_inference_manifest_refuses_evaluation(tmp_path, root):
    with pytest.raises(NoGroundTruthError, match="no ground-truth mask .* cannot be evaluated"):
        rasterize(NO_GROUND_TRUTH, 30, 40, root)


def test_cli_manifest_table(tmp_path, root, capfd):
    table = write_table(tmp_path / "mine.jsonl", GOOD + [{"image": "a.jpg", "query": "", "id": "x"}])
    out = tmp_path / "out.parquet"
    code = cli.main(["manifest", "table", "--input", str(table), "--root", str(root), "--out", str(out),
                     f"paths.work_dir={tmp_path / 'work'}"])  # fmt: skip
    captured = capfd.readouterr()
    assert code == 0
    assert "rejected: mine.jsonl row 4 (a.jpg): empty query: the query is empty" in captured.err
    assert "mine/inference: 3 rows, 1 skipped (empty query: 1)" in captured.out
    assert pq.read_table(out).num_rows == 3
    assert cli.main(["manifest", "table", "--root", str(root), f"paths.work_dir={tmp_path / 'work'}"]) == 2
