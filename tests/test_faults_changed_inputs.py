"""Edited inputs are noticed, injected for real on disk (stage 1 with the transformers backend, in this process).

- A query edited in the ReasonSeg JSON, and the manifest rebuilt: the sample ids are the same, but stage 2 refuses the
  shard that holds the old answer (naming it and ``llavaseg reason``), and ``reason`` redoes exactly that shard, says
  so, and its row carries the new query; the other shards are reused.
- An image file rewritten under its name (other bytes, other size/mtime): its shard is redone.
- A done marker without the input digest (an older writer): stage 2 reads it with a warning, stage 1 redoes it.
- ``paths.data_root`` changed to a copy with an edited query: ``prepare`` rebuilds the manifests from the new root
  instead of reusing those of the old one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from shared import shards
from shared.config import load_config
from shared.shards import ShardError

from test_faults_stage1 import demo, write_config  # noqa: F401  (demo: the module fixture, shared)

EDITED = "Which shape here would a painter pick first?"


def own_config(demo, name: str, tiny_llava_dir: Path | None = None, data_name: str = "data"):
    """A work dir (with the session's tiny LLaVA linked in) over a private copy of the demo data."""
    root, demo_data, _ = demo
    data_root = root / f"{name}-{data_name}"
    if not data_root.exists():
        shutil.copytree(demo_data, data_root)
    work = root / name
    if tiny_llava_dir is not None and not (work / "models" / "tiny-llava").exists():
        (work / "models").mkdir(parents=True, exist_ok=True)
        (work / "models" / "tiny-llava").symlink_to(tiny_llava_dir, target_is_directory=True)
    return load_config(write_config(root / f"{name}-{data_name}-config", data_root, work))


def edit_first_query(data_root: Path, split: str = "val") -> str:
    """Rewrite the first query of the first image of ``split`` in its JSON; returns the image's name."""
    path = sorted((data_root / "reason_seg" / "ReasonSeg" / split).glob("*.json"))[0]
    annotation = json.loads(path.read_text())
    assert annotation["text"][0] != EDITED
    annotation["text"][0] = EDITED
    path.write_text(json.dumps(annotation))
    return path.stem


def rebuild_manifest(config, spec: str) -> Path:
    from manifests.registry import build_manifest, manifest_filename

    dataset, split = spec.split("/")
    path = config.work_dir / "manifests" / manifest_filename(dataset, split)
    build_manifest(dataset, config.data_root, split, path)  # as `llavaseg manifest reasonseg --split val` does
    return path


def stage2_view(config, manifests, specs):
    from llavaseg.pipeline import stage2_sources
    from stage2_segment.data import build_index

    return build_index(stage2_sources(config, manifests, specs))


def shard_of(run_dir: Path, spec: str, sample_id: str) -> tuple[Path, dict]:
    for path in shards.list_shards(run_dir / spec.replace("/", "-")):
        table = pq.read_table(path)
        ids = table.column("sample_id").to_pylist()
        if sample_id in ids:
            return path, table.to_pylist()[ids.index(sample_id)]
    raise AssertionError(f"{sample_id} in no shard")


def test_edited_query_image_and_old_marker_redo_their_shard_and_stage2_refuses_stale_ones(demo, tiny_llava_dir, caplog):
    from llavaseg.pipeline import prepare, reason

    config = own_config(demo, "work-changed-inputs", tiny_llava_dir)
    manifests = prepare(config, build_models=False)
    first = reason(config, manifests)
    assert first.new_rows == 15 and first.changed_input_shards == 0
    stage2_view(config, manifests, ["reasonseg/val"])  # as written: accepted

    name = edit_first_query(config.data_root)
    rebuild_manifest(config, "reasonseg/val")
    from llavaseg.status import collect_status

    val = next(m for m in collect_status(config).manifests if m.spec == "reasonseg/val")
    assert (val.shards_stale, val.shards_done) == (1, val.shards_total - 1)  # as stage 1 will count them
    assert "1 more marked done but their inputs changed" in val.describe()
    sample_id = f"reasonseg/val/{name}/0"
    stale_path, stale_row = shard_of(first.run_dir, "reasonseg/val", sample_id)
    assert stale_row["query"] != EDITED
    with pytest.raises(ShardError, match=r"refused, 1 of its rows .* rerun `llavaseg reason`") as refused:
        stage2_view(config, manifests, ["reasonseg/val"])
    assert str(stale_path) in str(refused.value) and sample_id in str(refused.value)

    second = reason(config, prepare(config, build_models=False))
    assert second.changed_input_shards == 1 and second.new_rows == 2 and second.reused_rows == 13
    assert "1 done shard(s) redone because their inputs changed" in second.describe()
    assert shard_of(first.run_dir, "reasonseg/val", sample_id)[1]["query"] == EDITED
    stage2_view(config, manifests, ["reasonseg/val"])

    train_image = sorted((config.data_root / "reason_seg" / "ReasonSeg" / "train").glob("*.jpg"))[0]
    Image.new("RGB", (64, 48), (250, 10, 10)).save(train_image, format="JPEG", quality=70)  # other bytes, same name
    third = reason(config, prepare(config, build_models=False))
    assert third.changed_input_shards == 1 and third.new_rows in (1, 2)

    path, _ = shard_of(first.run_dir, "reasonseg/val", sample_id)
    marker = shards.read_done(path)
    old = {k: v for k, v in marker.items() if k not in ("input_digest", "row_input_digests")}
    shards.write_json_atomic(shards.done_path(path), old)  # as an older writer left it
    with caplog.at_level(logging.WARNING):
        stage2_view(config, manifests, ["reasonseg/val"])
    assert "1 done shard(s) record no input digests" in caplog.text
    fourth = reason(config, prepare(config, build_models=False))
    assert fourth.changed_input_shards == 1 and fourth.new_rows == 2
    assert "input_digest" in shards.read_done(path)


def test_a_changed_data_root_rebuilds_the_manifests(demo):
    from llavaseg.pipeline import prepare

    before = own_config(demo, "work-moved-root", data_name="data-a")
    entries = prepare(before, build_models=False)
    val = {e.spec: e.path for e in entries}["reasonseg/val"]
    queries_before = pq.read_table(val).column("query").to_pylist()
    assert EDITED not in queries_before

    after = own_config(demo, "work-moved-root", data_name="data-b")
    edit_first_query(after.data_root)
    assert after.work_dir == before.work_dir and after.data_root != before.data_root
    entries = prepare(after, build_models=False)
    val = {e.spec: e.path for e in entries}["reasonseg/val"]
    assert EDITED in pq.read_table(val).column("query").to_pylist()  # built from the new root, not reused
    assert pq.read_schema(val).metadata[b"llavaseg.data_root"].decode() == str(after.data_root.resolve())
    mtime = val.stat().st_mtime_ns
    prepare(after, build_models=False)
    assert val.stat().st_mtime_ns == mtime  # the same root again: reused
