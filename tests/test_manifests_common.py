"""Paths inside the data root, the manifest builder (validation, skips, duplicates, atomic write) and the registry."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from manifests.common import DuplicateSampleIdError, ManifestBuilder, ManifestResult, ManifestRowError, SkipSample
from manifests.registry import ADAPTERS, SPLITS, build_manifest, manifest_filename
from shared.paths import PathEscapeError, relative_posix, resolve_inside
from shared.schema import MANIFEST_SCHEMA

from fixtures_datasets import write_jpeg


# --- shared.paths -------------------------------------------------------------------------------------------------


def test_resolve_inside_accepts_relative_paths(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    assert resolve_inside(root, "a/b.jpg") == (root / "a" / "b.jpg").resolve()
    assert resolve_inside(root, "a/../a/b.jpg") == (root / "a" / "b.jpg").resolve()


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.jpg", "a/../../x.jpg", "C:\\x.jpg", "", ".", "a\0b"])
def test_resolve_inside_rejects_escapes(tmp_path, bad):
    with pytest.raises(PathEscapeError) as error:
        resolve_inside(tmp_path, bad)
    assert repr(bad) in str(error.value) or "empty path" in str(error.value)


def test_resolve_inside_rejects_symlinks_out_and_keeps_symlinks_in(tmp_path):
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    (root / "images" / "real.jpg").write_bytes(b"x")
    os.symlink(outside, root / "linked_dir")
    os.symlink(outside / "secret.jpg", root / "images" / "linked.jpg")
    os.symlink(root / "images" / "real.jpg", root / "images" / "alias.jpg")
    for escaping in ("linked_dir/secret.jpg", "images/linked.jpg"):
        with pytest.raises(PathEscapeError, match="outside"):
            resolve_inside(root, escaping)
    assert resolve_inside(root, "images/alias.jpg") == (root / "images" / "real.jpg").resolve()


def test_relative_posix(tmp_path):
    root = tmp_path / "data"
    (root / "x").mkdir(parents=True)
    assert relative_posix(root, root / "x" / "y.png") == "x/y.png"
    with pytest.raises(PathEscapeError):
        relative_posix(root, tmp_path / "elsewhere.png")
    with pytest.raises(PathEscapeError):
        relative_posix(root, root)


# --- manifests.common ---------------------------------------------------------------------------------------------


def _row(**overrides):
    row = dict(
        image_id="img",
        query_index=0,
        family="reasoning",
        image_path="reason_seg/ReasonSeg/val/img.jpg",
        query="the cup",
        query_kind="phrase",
        mask='{"type": "reasonseg", "shapes": []}',
        height=10,
        width=20,
        source="img.json text[0]",
    )
    row.update(overrides)
    return row


def test_builder_writes_sorted_rows_with_the_schema(tmp_path):
    builder = ManifestBuilder("reasonseg", "val", tmp_path)
    assert builder.add(**_row(image_id="b")) == "reasonseg/val/b/0"
    builder.add(**_row(image_id="a", query_index=1, reference_answer="because"))
    builder.add(**_row(image_id="a", query_index=0, query_kind="sentence", query="Which one holds tea?"))
    out = tmp_path / "out" / "reasonseg-val.parquet"
    result = builder.write(out)

    assert result == ManifestResult("reasonseg", "val", out, 3, {}, {})
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA.remove_metadata()
    assert table.schema.metadata[b"llavaseg.manifest_version"] == b"1"
    assert table.schema.metadata[b"llavaseg.dataset"] == b"reasonseg"
    rows = table.to_pylist()
    assert [r["sample_id"] for r in rows] == ["reasonseg/val/a/0", "reasonseg/val/a/1", "reasonseg/val/b/0"]
    assert rows[0]["query_kind"] == "sentence" and rows[0]["reference_answer"] is None
    assert rows[1]["reference_answer"] == "because"
    assert rows[2] == {
        "sample_id": "reasonseg/val/b/0",
        "dataset": "reasonseg",
        "family": "reasoning",
        "split": "val",
        "image_path": "reason_seg/ReasonSeg/val/img.jpg",
        "image_id": "b",
        "query": "the cup",
        "query_kind": "phrase",
        "mask": '{"type": "reasonseg", "shapes": []}',
        "height": 10,
        "width": 20,
        "reference_answer": None,
    }
    assert sorted(p.name for p in out.parent.iterdir()) == ["reasonseg-val.parquet"]


def test_builder_rewrite_replaces_file(tmp_path):
    out = tmp_path / "m.parquet"
    first = ManifestBuilder("reasonseg", "val", tmp_path)
    first.add(**_row(image_id="old"))
    first.write(out)
    second = ManifestBuilder("reasonseg", "val", tmp_path)
    second.add(**_row(image_id="new"))
    second.add(**_row(image_id="newer"))
    second.write(out)
    assert pq.read_table(out).column("image_id").to_pylist() == ["new", "newer"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"query_kind": "question"}, "query_kind 'question'"),
        ({"family": "other"}, "family 'other'"),
        ({"query": "   "}, "query must be a non-empty string"),
        ({"height": 0}, "height must be a positive int32"),
        ({"width": -3}, "width must be a positive int32"),
        ({"mask": ""}, "mask must be a non-empty string"),
    ],
)
def test_builder_rejects_invalid_rows(tmp_path, overrides, message):
    builder = ManifestBuilder("reasonseg", "val", tmp_path)
    with pytest.raises(ManifestRowError) as error:
        builder.add(**_row(**overrides))
    assert message in str(error.value)
    assert "reasonseg/val/img/0" in str(error.value) and "img.json text[0]" in str(error.value)
    assert len(builder) == 0


def test_builder_duplicate_sample_id_names_both_sources(tmp_path):
    builder = ManifestBuilder("reasonseg", "val", tmp_path)
    builder.add(**_row(source="first.json"))
    with pytest.raises(DuplicateSampleIdError) as error:
        builder.add(**_row(source="second.json"))
    message = str(error.value)
    assert "'reasonseg/val/img/0'" in message and "first.json" in message and "second.json" in message


def test_builder_counts_skips_with_first_examples(tmp_path):
    builder = ManifestBuilder("ade20k", "train", tmp_path)
    builder.add(**_row(family="semantic", query_kind="class", query="wall"))
    for index in range(5):
        builder.skip("image missing", f"a{index}.jpg")
    builder.skip("unreadable json", "b.json", count=2)
    result = builder.write(tmp_path / "m.parquet")
    assert result.skipped == {"image missing": 5, "unreadable json": 2}
    assert result.examples == {"image missing": ["a0.jpg", "a1.jpg", "a2.jpg"], "unreadable json": ["b.json"]}
    assert result.total_skipped == 7
    assert result.summary() == "ade20k/train: 1 rows, 7 skipped (image missing: 5, unreadable json: 2)"
    assert ManifestResult("x", "val", tmp_path, 4).summary() == "x/val: 4 rows, 0 skipped"


def test_builder_image_size_reasons(tmp_path):
    builder = ManifestBuilder("reasonseg", "val", tmp_path)
    write_jpeg(tmp_path / "ok.jpg", 12, 34)
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert builder.image_size("ok.jpg", "here") == (12, 34)
    cases = {"missing.jpg": "image missing", "empty.jpg": "image unreadable", "../x.jpg": "path escapes data_root"}
    for path, reason in cases.items():
        with pytest.raises(SkipSample) as skip:
            builder.image_size(path, "row 3")
        assert skip.value.reason == reason and "row 3" in skip.value.detail


# --- manifests.registry -------------------------------------------------------------------------------------------


def test_registry_names_and_filenames():
    expected = {
        "reasonseg", "refcoco", "refcoco+", "refcocog", "refclef", "ade20k", "cocostuff", "paco_lvis", "pascal_part",
    }  # fmt: skip
    assert set(ADAPTERS) == expected and set(SPLITS) == expected
    assert manifest_filename("reasonseg", "val") == "reasonseg-val.parquet"
    assert manifest_filename("refcoco+", "testA") == "refcoco+-testA.parquet"
    assert SPLITS["refcocog"] == ("train", "val", "test")


def test_registry_rejects_unknown_dataset_and_split(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'coco'; valid: reasonseg, refcoco, refcoco\+"):
        build_manifest("coco", tmp_path, "train", tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="has no split 'testA'; valid: train, val, test"):
        build_manifest("reasonseg", tmp_path, "testA", tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="valid: train, val$"):
        manifest_filename("ade20k", "test")


def test_registry_missing_dataset_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root is not a folder"):
        build_manifest("reasonseg", tmp_path / "nope", "val", tmp_path / "m.parquet")
    with pytest.raises(FileNotFoundError, match="ReasonSeg split folder not found"):
        build_manifest("reasonseg", tmp_path, "val", tmp_path / "m.parquet")
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*refs\(umd\)\.p"):
        build_manifest("refcocog", tmp_path, "val", tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()
