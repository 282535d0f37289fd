"""The samples the report and its viewer show, joined from the files a run leaves: the manifests (query, image, mask,
reference answer), the stage-1 shards (step-1 answer, target, attributes, parse status, error), the evaluation's
``per_sample.jsonl`` (IoU, status) and ``predictions.parquet`` (COCO RLE per sample), or an inference output folder.

Masks and images are read only when the viewer draws a sample (``gt``/``pred`` are callables), so thousands of samples
cost a few small dicts each until then.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.masks import rasterize
from shared.paths import resolve_inside
from shared.shards import ShardError, list_shards, read_shards

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"  # written by stage2_segment.evaluate beside per_sample.jsonl
MANIFEST_COLUMNS = ["sample_id", "dataset", "family", "split", "image_path", "query", "query_kind", "mask", "height",
                    "width", "reference_answer"]
SHARD_COLUMNS = ["sample_id", "reason_answer", "target", "attributes", "parse_status", "status", "error"]


def _by_id(table: Any) -> dict[str, dict[str, Any]]:
    return {row["sample_id"]: row for row in table.to_pylist()}


def _decode(rle: str) -> Any:
    from stage2_segment.rle import decode_mask

    return decode_mask(rle)


def _shard_rows(folder: Path, run_key: str | None, columns: list[str]) -> dict[str, dict[str, Any]]:
    try:
        return _by_id(read_shards(Path(folder), run_key, columns=columns))
    except (ShardError, OSError) as err:
        log.warning("report: stage-1 shards of %s not read (%s)", folder, err)
        return {}


def evaluated_samples(sources: Sequence[Any], eval_dir: Path, data_root: Path) -> list[dict[str, Any]]:
    """One viewer sample per ``per_sample.jsonl`` record of ``eval_dir``, in its order; ``sources`` are the evaluated
    ``Stage2Source``s (manifest, shard folder, run key)."""
    eval_dir, data_root = Path(eval_dir), Path(data_root)
    per_sample_path = eval_dir / "per_sample.jsonl"
    if not per_sample_path.is_file():
        return []
    manifest, stage1 = {}, {}
    for source in sources:
        manifest.update(_by_id(pq.read_table(source.manifest, columns=MANIFEST_COLUMNS)))
        stage1.update(_shard_rows(source.shard_dir, source.run_key, SHARD_COLUMNS))
    rles = {}
    if (eval_dir / PREDICTIONS_FILE).is_file():
        table = pq.read_table(eval_dir / PREDICTIONS_FILE, columns=["sample_id", "rle"])
        rles = dict(zip(table["sample_id"].to_pylist(), table["rle"].to_pylist()))
    else:
        log.warning("report: %s has no %s (an evaluation from before it was written); the viewer shows no "
                    "prediction outlines", eval_dir, PREDICTIONS_FILE)  # fmt: skip
    samples = []
    for line in per_sample_path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        row, answer = manifest.get(record["sample_id"], {}), stage1.get(record["sample_id"], {})
        samples.append(_sample(record, row, answer, rles.get(record["sample_id"]), data_root))
    return samples


def _sample(record: dict, row: dict, answer: dict, rle: str | None, data_root: Path) -> dict[str, Any]:
    def gt() -> Any:
        return rasterize(row["mask"], row["height"], row["width"], data_root)

    image = None
    if row.get("image_path"):
        try:
            image = resolve_inside(data_root, row["image_path"])
        except ValueError:
            image = None
    return {
        **{k: record.get(k) for k in ("sample_id", "spec", "query_kind", "intersection", "union", "iou", "status")},
        "error": record.get("error") or answer.get("error"),
        "dataset": row.get("dataset"), "family": row.get("family"), "query": row.get("query"),
        "reference_answer": row.get("reference_answer"), "reason_answer": answer.get("reason_answer"),
        "target": answer.get("target"), "attributes": answer.get("attributes"),
        "parse_status": answer.get("parse_status"), "stage1_status": answer.get("status"),
        "image": image, "gt": gt if row.get("mask") else None, "pred": (lambda: _decode(rle)) if rle else None,
    }  # fmt: skip


def stage1_errors(stage1_run_dir: Path) -> list[dict[str, Any]]:
    """``{"sample_id", "manifest", "error"}`` of every error row of every manifest folder of a stage-1 run."""
    errors = []
    for folder in sorted(p for p in Path(stage1_run_dir).iterdir() if p.is_dir() and list_shards(p)):
        try:
            table = read_shards(folder, columns=["sample_id", "status", "error"])
        except (ShardError, OSError) as err:
            log.warning("report: stage-1 shards of %s not read (%s)", folder, err)
            continue
        failed = table.filter(pc.equal(table["status"], "error"))
        errors += [{"manifest": folder.name, **row} for row in failed.select(["sample_id", "error"]).to_pylist()]
    return errors


def inferred_samples(predictions: Any, spec: str, data_root: Path | None) -> Iterator[dict[str, Any]]:
    """One viewer sample per row of an inference predictions table (``stage2_segment.infer``'s schema): no ground
    truth, no IoU; images resolved under ``data_root``."""
    for row in predictions.to_pylist():
        image = None
        if data_root is not None and row.get("image_path"):
            try:
                image = resolve_inside(Path(data_root), row["image_path"])
            except ValueError:
                image = None
        rle = row.get("rle")
        yield {**{k: row.get(k) for k in ("sample_id", "query", "reason_answer", "target", "attributes", "status",
                                          "error")},
               "spec": spec, "query_kind": row.get("query_kind") or "", "iou": None, "image": image,
               "pred": (lambda rle=rle: _decode(rle)) if rle else None}  # fmt: skip
