"""``llavaseg infer --input``: the user's own images and queries, end to end.

1. ``manifests.table`` turns the input (a CSV/JSONL/Parquet table or a folder of images with one query) into an inference
   manifest, ``<work_dir>/manifests/<name>-inference.parquet``; rejected rows (empty query, missing image, ...) are
   kept with their messages.
2. Stage 1 runs for its rows, reusing the done shards of the same run key.
3. Stage 2's Ray Data inference (``--replicas`` actors) writes ``<out>/<name>-inference/NNNNN.parquet``: sample id, image
   path, query, step-1 answer, target, attributes, COCO RLE mask at the original size, score, status, error. The
   rejected rows go to ``rejected.parquet`` in the same folder as error rows, so every input row is answered exactly once.
4. ``--png DIR``: a mask PNG and an overlay PNG per ok row.
5. The sample viewer of every row (image with the prediction outlined, query, answers, status) in
   ``<out>/<name>-inference-viewer/index.html`` (``llavaseg.report.viewer``).

Each step writes atomically and skips finished work, so a rerun of the same command does nothing new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from PIL import Image

from shared.config import PipelineConfig

log = logging.getLogger(__name__)

REJECTED_SHARD = "rejected.parquet"


def with_data_root(config: PipelineConfig, root: Path) -> PipelineConfig:
    """The config with ``paths.data_root`` at ``root`` (absolute), so both stages read the user's images there."""
    return dataclasses.replace(config, paths=dataclasses.replace(config.paths, data_root=str(Path(root).resolve())))


def _rejected_table(rejected: list[Any]) -> pa.Table:
    from stage2_segment.infer import PREDICTION_SCHEMA

    count = len(rejected)
    columns = {name: pa.nulls(count, field.type) for name, field in zip(PREDICTION_SCHEMA.names, PREDICTION_SCHEMA)}
    columns.update(
        sample_id=pa.array([r.sample_id for r in rejected], pa.string()),
        image_path=pa.array([r.image_path for r in rejected], pa.string()),
        query=pa.array([r.query for r in rejected], pa.string()),
        status=pa.array(["error"] * count, pa.string()),
        error=pa.array([r.message for r in rejected], pa.string()),
    )
    return pa.table(columns, schema=PREDICTION_SCHEMA).sort_by("sample_id")


def write_rejected_predictions(folder: Path, rejected: list[Any]) -> bool:
    """``rejected.parquet`` (+ done file) for the rows the manifest refused; False when that exact file is done."""
    from shared.shards import is_done, write_shard

    path = folder / REJECTED_SHARD
    ids = sorted(r.sample_id for r in rejected)
    if is_done(path, ids):
        return False
    if not rejected:
        path.unlink(missing_ok=True)
        return False
    write_shard(_rejected_table(rejected), path, {"errors": len(rejected), "ok": 0, "rejected": True})
    return True


def _png_stem(sample_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", sample_id).strip("-")[:48] or "sample"
    return f"{slug}-{hashlib.sha256(sample_id.encode()).hexdigest()[:8]}"


def write_pngs(predictions: pa.Table, data_root: Path, png_dir: Path) -> int:
    """``<stem>-mask.png`` (255 = target) and ``<stem>-overlay.png`` per ok row not yet written; returns how many."""
    from shared.images import load_rgb
    from shared.paths import resolve_inside
    from stage2_segment.overlay import PRED_COLOUR, tint
    from stage2_segment.rle import decode_mask

    png_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for row in predictions.filter(pa.compute.equal(predictions["status"], "ok")).to_pylist():
        stem = _png_stem(row["sample_id"])
        mask_path, overlay_path = png_dir / f"{stem}-mask.png", png_dir / f"{stem}-overlay.png"
        if mask_path.is_file() and overlay_path.is_file():
            continue
        mask = decode_mask(row["rle"]).astype(bool)
        image = load_rgb(resolve_inside(data_root, row["image_path"]))
        for path, picture in ((overlay_path, tint(image, mask, PRED_COLOUR)), (mask_path, mask.astype(np.uint8) * 255)):
            temporary = path.with_name(f".{path.name}.tmp")
            Image.fromarray(picture).save(temporary, format="PNG")
            temporary.replace(path)
        written += 1
    return written


def read_predictions(folder: Path) -> pa.Table:
    """Every final predictions shard of ``folder`` (the numbered ones and ``rejected.parquet``), sorted by sample id."""
    from shared.shards import list_shards

    paths = list_shards(folder) + ([folder / REJECTED_SHARD] if (folder / REJECTED_SHARD).is_file() else [])
    return pa.concat_tables([pq.read_table(path) for path in paths]).sort_by("sample_id")


def infer_input(
    config: PipelineConfig,
    source: Path,
    checkpoint_dir: Path,
    out_dir: Path | None = None,
    root: Path | None = None,
    query: str | None = None,
    png_dir: Path | None = None,
    name: str | None = None,
    backend: Any = None,
    embedder: Any = None,
) -> dict[str, Any]:
    """Manifest -> stage 1 -> stage 2 for ``source``; returns a summary (counts per step, where the rows are).

    ``backend``/``embedder``: stage-1 engines already running (passed through to ``run_stage1``).

    Raises:
        FileNotFoundError, ValueError: a missing input, root or checkpoint; an input with no usable row.
    """
    from llavaseg.report.samples import inferred_samples
    from llavaseg.report.viewer import write_viewer
    from manifests.table import INFERENCE_SPLIT, build_table_manifest, dataset_name, default_root
    from stage1_reason.run import manifest_folder, run_stage1
    from stage2_segment.data import Stage2Source
    from stage2_segment.infer import infer

    started = time.perf_counter()
    source = Path(source)
    root = Path(root) if root else default_root(source)
    config = with_data_root(config, root)
    name = name or dataset_name(source)
    spec = f"{name}/{INFERENCE_SPLIT}"
    manifest_path = config.work_dir / "manifests" / f"{name}-{INFERENCE_SPLIT}.parquet"
    built = build_table_manifest(source, root, manifest_path, query, name)
    stage1 = run_stage1(config, [(spec, manifest_path)], backend=backend, embedder=embedder)
    stage2_source = Stage2Source(spec, manifest_path, manifest_folder(stage1.run_dir, spec), stage1.run_key)
    out_dir = Path(out_dir) if out_dir else config.work_dir / "predictions"
    stage2 = infer(config, [stage2_source], checkpoint_dir, out_dir)
    folder = out_dir / spec.replace("/", "-")
    rejected_written = write_rejected_predictions(folder, built.rejected)
    predictions = read_predictions(folder)
    pngs = write_pngs(predictions, config.data_root, Path(png_dir)) if png_dir else 0
    viewer = write_viewer(out_dir / f"{folder.name}-viewer", inferred_samples(predictions, spec, config.data_root),
                          f"Inference: {spec}")  # fmt: skip
    ok = int(pa.compute.sum(pa.compute.equal(predictions["status"], "ok").cast(pa.int64())).as_py() or 0)
    summary = {
        "input": str(source), "root": str(root.resolve()), "manifest": str(manifest_path),
        "predictions": str(folder), "rows": predictions.num_rows, "ok": ok, "errors": predictions.num_rows - ok,
        "rejected_rows": len(built.rejected), "rejected_written": rejected_written,
        "stage1_new_rows": stage1.new_rows, "stage1_reused_rows": stage1.reused_rows,
        "stage1_generated_samples": stage1.generated_samples, "stage1_run_key": stage1.run_key,
        "stage2_shards_written": stage2["shards_written"], "stage2_shards_skipped": stage2["shards_skipped"],
        "stage2_rows_written": stage2["rows_written"], "pngs_written": pngs,
        "png_dir": str(png_dir) if png_dir else None, "viewer": str(viewer["index"]),
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    log.info("infer --input: %d rows (%d ok, %d errors) -> %s", summary["rows"], ok, summary["errors"], folder)
    return summary
