"""Stage-2 evaluation (LISA's gIoU/cIoU, by dataset and query length) and Ray Data inference (RLE masks per sample,
resumable)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from shared.masks import rasterize
from shared.metrics import per_sample_intersection_union
from shared.shards import done_path, list_shards
from stage2_fixtures import RUN_KEY, killed_and_resumed_run, stage2_world, write_synthetic_shards
from stage2_segment.data import Stage2Source
from stage2_segment.evaluate import evaluate, metrics_markdown, scores_from_predictions
from stage2_segment.infer import PREDICTION_SCHEMA, infer
from stage2_segment.rle import decode_mask, encode_mask


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Evaluation runs in this process: one thread, like a Ray worker (spinning OpenMP threads on a busy 2-core
    machine make a tiny model's forward many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return stage2_world(tmp_path_factory.getbasetemp() / "stage2")


@pytest.fixture(scope="module")
def run(world, ray_cluster):
    return killed_and_resumed_run(world)


def _mask(shape: tuple[int, int], *boxes: tuple[int, int, int, int], value: int = 1, base: np.ndarray | None = None):
    out = np.zeros(shape, np.uint8) if base is None else base.copy()
    for top, left, bottom, right in boxes:
        out[top:bottom, left:right] = value
    return out


def test_scores_from_constructed_predictions_match_hand_computation():
    # reasonseg/val, sentence: GT 4x4 box (16 px); prediction covers 8 of them + 4 outside -> I 8, U 20.
    gt_long = _mask((10, 10), (0, 0, 4, 4))
    pred_long = _mask((10, 10), (0, 0, 2, 4), (5, 5, 7, 7)).astype(bool)
    # reasonseg/val, phrase: GT 2x5 target + an ignore band; prediction = target + the whole ignore band -> I 10, U 10.
    gt_short = _mask((8, 6), (0, 0, 2, 5))
    gt_short = _mask((8, 6), (4, 0, 6, 6), value=255, base=gt_short)
    pred_short = _mask((8, 6), (0, 0, 2, 5), (4, 0, 6, 6)).astype(bool)
    # reasonseg/val, phrase: empty GT, empty prediction -> I 0, U 0, IoU 1.
    gt_empty = np.zeros((5, 5), np.uint8)
    pred_empty = np.zeros((5, 5), bool)
    # refcoco/val: GT 3 px, prediction misses -> I 0, U 4.
    gt_ref = _mask((4, 4), (0, 0, 1, 3))
    pred_ref = _mask((4, 4), (3, 3, 4, 4)).astype(bool)

    results = scores_from_predictions(
        [pred_long, pred_short, pred_empty, pred_ref],
        [gt_long, gt_short, gt_empty, gt_ref],
        ["reasonseg/val", "reasonseg/val", "reasonseg/val", "refcoco/val"],
        ["sentence", "phrase", "phrase", "phrase"],
    )
    reason = results["reasonseg/val"]
    assert reason["count"] == 3 and (reason["intersection"], reason["union"]) == (18, 30)
    assert reason["gIoU"] == pytest.approx((8 / 20 + 10 / 10 + 1.0) / 3, abs=1e-5)
    assert reason["cIoU"] == pytest.approx(18 / 30)
    assert reason["by_query_length"]["long"]["gIoU"] == pytest.approx(0.4, abs=1e-5)
    assert reason["by_query_length"]["long"]["cIoU"] == pytest.approx(0.4)
    assert reason["by_query_length"]["short"]["gIoU"] == pytest.approx(1.0, abs=1e-5)
    assert reason["by_query_length"]["short"]["cIoU"] == pytest.approx(1.0)
    assert results["refcoco/val"] == {"gIoU": 0.0, "cIoU": 0.0, "count": 1, "intersection": 0, "union": 4, "failed": 0}

    table = metrics_markdown({"name": "n", "checkpoint": "c", "train_name": "t", "step": 1, "results": results,
                              "failures": {}})  # fmt: skip
    assert "| reasonseg/val | all | 3 | 80.0 | 60.0 | 0 |" in table
    assert "| reasonseg/val | long | 1 | 40.0 | 40.0 | 0 |" in table
    assert "| refcoco/val | all | 1 | 0.0 | 0.0 | 0 |" in table
    assert "Failures by kind: none." in table


def test_rle_round_trip_at_original_size():
    mask = np.zeros((37, 53), bool)
    mask[3:20, 10:41] = True
    mask[30, 52] = True
    rle = encode_mask(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_mask(json.dumps(rle)).astype(bool), mask)


def test_evaluate_the_trained_checkpoint(world, run):
    metrics = evaluate(run.config, world.val_sources + world.train_sources, run.result.checkpoint_dir, name="tiny-eval")
    out = run.config.work_dir / "eval" / "tiny-eval"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    sources = world.val_sources + world.train_sources
    rows = {source.spec: pq.read_metadata(source.manifest).num_rows for source in sources}
    assert rows["reasonseg/val"] == 4  # the demo's val images, one query each
    for spec, count in rows.items():  # every manifest row is scored
        result = metrics["results"][spec]
        assert result["count"] == count
        assert 0.0 <= result["gIoU"] <= 1.0 and 0.0 <= result["cIoU"] <= 1.0
        lengths = result["by_query_length"]
        assert sum(scores["count"] for scores in lengths.values()) == count and set(lengths) <= {"long", "short"}
    assert metrics["step"] == 30 and all(result["failed"] == 0 for result in metrics["results"].values())
    assert metrics["failures"] == {spec: {"stage1_error": 0, "no_stage1_row": 0, "no_prediction": 0}
                                   for spec in ("reasonseg/val", "reasonseg/train")}  # fmt: skip
    markdown = (out / "metrics.md").read_text()
    val = metrics["results"]["reasonseg/val"]
    assert f"| reasonseg/val | all | 4 | {100 * val['gIoU']:.1f} | {100 * val['cIoU']:.1f} | 0 |" in markdown
    per_sample = [json.loads(line) for line in (out / "per_sample.jsonl").read_text().splitlines()]
    assert len(per_sample) == sum(rows.values())
    val_iou = [row["iou"] for row in per_sample if row["spec"] == "reasonseg/val"]
    assert np.mean(val_iou) == pytest.approx(val["gIoU"])
    overlays = sorted((out / "overlays").glob("*.png"))
    assert [path.name for path in overlays] == sorted(metrics["overlays"]) and len(overlays) == 4 + 6
    with Image.open(overlays[0]) as picture:
        assert picture.height > 256 and picture.width >= 3 * 64
    assert json.loads((out / "resolved_config.json").read_text())["stage2"]["sam_variant"] == "tiny"


def test_infer_writes_one_rle_per_sample_and_resumes(world, run, tmp_path):
    val = world.val_sources[0]
    ids = sorted(pq.read_table(val.manifest, columns=["sample_id"])["sample_id"].to_pylist())
    errors_folder = write_synthetic_shards(val.manifest, tmp_path / "run", "reasonseg/val", shard_size=2,
                                           error_ids=(ids[1],))  # fmt: skip
    sources = [Stage2Source("reasonseg/val", val.manifest, errors_folder, RUN_KEY), world.train_sources[0]]
    out_dir = tmp_path / "predictions"
    summary = infer(run.config, sources, run.result.checkpoint_dir, out_dir)
    assert (summary["shards"], summary["shards_written"], summary["shards_skipped"]) == (4, 4, 0)
    total = pq.read_metadata(val.manifest).num_rows + pq.read_metadata(world.train_sources[0].manifest).num_rows
    assert (summary["rows_written"], summary["ok"], summary["errors"]) == (total, total - 1, 1)

    manifest = pq.read_table(val.manifest).to_pylist() + pq.read_table(world.train_sources[0].manifest).to_pylist()
    sizes = {row["sample_id"]: (row["height"], row["width"]) for row in manifest}
    masks_by_id = {row["sample_id"]: row["mask"] for row in manifest}
    outputs = list_shards(out_dir / "reasonseg-val") + list_shards(out_dir / "reasonseg-train")
    assert len(outputs) == 4 and all(done_path(path).is_file() for path in outputs)
    rows = [row for path in outputs for row in pq.read_table(path).to_pylist()]
    assert pq.read_schema(outputs[0]).remove_metadata() == PREDICTION_SCHEMA
    assert sorted(row["sample_id"] for row in rows) == sorted(sizes)
    evaluated = evaluate(run.config, sources[:1], run.result.checkpoint_dir, name="infer-check")
    per_sample = {
        record["sample_id"]: record
        for record in map(json.loads, (run.config.work_dir / "eval" / "infer-check" / "per_sample.jsonl").open())
    }
    assert evaluated["results"]["reasonseg/val"]["count"] == len(per_sample) == 4  # the error row too, scored empty
    assert evaluated["results"]["reasonseg/val"]["failed"] == 1 and per_sample[ids[1]]["status"] == "stage1_error"
    for row in rows:
        if row["sample_id"] == ids[1]:
            assert (row["status"], row["rle"]) == ("error", None) and "synthetic failure" in row["error"]
            continue
        assert row["status"] == "ok" and row["error"] is None
        mask = decode_mask(row["rle"])
        assert mask.shape == sizes[row["sample_id"]] == (row["height"], row["width"])
        assert 0.0 <= row["score"] <= 1.0
        if row["sample_id"] in per_sample:  # the very prediction evaluate scored
            gt = rasterize(masks_by_id[row["sample_id"]], *sizes[row["sample_id"]], world.data_root)
            intersection, union = per_sample_intersection_union([mask.astype(bool)], [gt])
            expected = per_sample[row["sample_id"]]
            assert (int(intersection[0]), int(union[0])) == (expected["intersection"], expected["union"])

    stamps = {path: path.stat().st_mtime_ns for path in outputs}
    again = infer(run.config, sources, run.result.checkpoint_dir, out_dir)
    assert (again["shards_skipped"], again["shards_written"], again["rows_written"]) == (4, 0, 0)
    assert {path: path.stat().st_mtime_ns for path in outputs} == stamps

    # A lost done file (a killed writer) means that shard alone is redone.
    done_path(outputs[0]).unlink()
    third = infer(run.config, sources, run.result.checkpoint_dir, out_dir)
    assert (third["shards_skipped"], third["shards_written"]) == (3, 1)
