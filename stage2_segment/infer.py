"""Dataset-scale offline inference with Ray Data: one predictions shard per stage-1 shard, resumable.

``infer(config, sources, checkpoint_dir, out_dir)`` joins each manifest with its stage-1 shards, then streams the rows
of every input shard that has no finished output through ``map_batches`` with ``MaskPredictor`` (a callable class that
holds the trained model; a fixed pool of ``ray.num_workers`` actors, one GPU each when ``ray.use_gpu``). The driver
collects the predictions per input shard and writes ``<out_dir>/<dataset>-<split>/NNNNN.parquet``::

    sample_id      string
    image_path     string   relative to the data root, as in the manifest
    query          string
    reason_answer  string   the MLLM's step-1 answer (stage 1)
    target         string   the target and its attributes parsed from the second turn (stage 1)
    attributes     string
    rle        string   COCO RLE JSON {"size": [H, W], "counts": "..."} at the ORIGINAL image size (null on error)
    score      float32  mean sigmoid probability inside the predicted mask (0 for an empty mask)
    height     int32
    width      int32
    status     string   ok | error
    error      string   stage-1 error, or why the image or embedding could not be used

like stage 1: temporary name + rename, then a ``.done.json`` (rows digest, checkpoint id) written last; a rerun skips
shards whose done file matches the rows and the checkpoint, so a killed run loses at most the shards in flight.

Several jobs may write one output folder: each output shard is predicted only under its lease (``shared.leases``),
claimed before its rows enter the Ray pipeline and released once it is written; a job waits for the shards other jobs
hold and takes over those whose lease goes stale. ``job`` (``--num-tasks/--task-index``) limits a job to its static
share of the shards.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from shared.config import PipelineConfig
from shared.leases import JobSlice, ShardLeases, clean_temp_files
from shared.object_leases import ObjectLeases
from shared.object_store import ObjectStore, publish_shard, pull_inputs, refresh_shard
from shared.shards import is_done, read_done, write_shard
from stage2_segment.checkpoint import WEIGHTS_FILE, load_trained_model, read_meta, verify_sam_weights
from stage2_segment.data import (
    ExampleError,
    ShardRef,
    ShardStore,
    Stage2Dataset,
    Stage2Index,
    Stage2Source,
    build_index,
)
from stage2_segment.modeling import AdaptedSam, get_variant, sha256_of
from stage2_segment.rle import encode_mask_json

logger = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string()),
        pa.field("query", pa.string()),
        pa.field("reason_answer", pa.string()),
        pa.field("target", pa.string()),
        pa.field("attributes", pa.string()),
        pa.field("rle", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
)
ROW_COLUMNS = ["sample_id", "image_path", "height", "width", "shard", "shard_row"]
TEXT_COLUMNS = ["sample_id", "image_path", "query", "reason_answer", "target", "attributes"]  # joined in at the end


def inference_device(config: PipelineConfig) -> torch.device:
    return torch.device("cuda") if config.ray.use_gpu and torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def predict_masks(
    model: AdaptedSam, batch: dict[str, Any], device: torch.device, use_bf16: bool = False
) -> tuple[list[np.ndarray], list[float]]:
    """Masks of a collated batch: per row HxW bool (logits > 0, upsampled to the original size) and a score (mean
    sigmoid inside the mask, 0 for an empty mask)."""
    images = batch["images"].to(device)
    text = batch["text_embeds"].to(device)
    text_mask = batch["text_mask"].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        low_res = model(images, text, text_mask)
    masks, scores = [], []
    for row, (input_size, original_size) in enumerate(zip(batch["input_sizes"], batch["original_sizes"])):
        logits = model.postprocess_masks(low_res[row : row + 1].float(), input_size, original_size)[0, 0]
        mask = logits > 0
        scores.append(float(logits.sigmoid()[mask].mean()) if bool(mask.any()) else 0.0)
        masks.append(mask.cpu().numpy())
    return masks, scores


def load_batch_skipping_errors(
    dataset: Stage2Dataset, indices: list[int]
) -> tuple[dict[str, Any] | None, dict[int, str]]:
    """(collated batch of the usable ``indices`` or None; index -> error message of the unusable ones)."""
    remaining, errors = list(indices), {}
    while remaining:
        try:
            return dataset.load_batch(remaining, with_target=False), errors
        except ExampleError as error:
            errors[error.index] = str(error)
            remaining.remove(error.index)
    return None, errors


class MaskPredictor:
    """Ray Data callable class: the trained model, loaded once per actor; a pyarrow batch of rows (``ROW_COLUMNS``)
    in, their predictions (``PREDICTION_SCHEMA`` + ``shard``) out."""

    def __init__(
        self, config: PipelineConfig, checkpoint_dir: str, shards: list[ShardRef], llm_dim: int, shard_cache_dir: str
    ) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.device = inference_device(config)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, config.ray.cpus_per_worker))
        self.use_bf16 = config.stage2.precision == "bf16" and self.device.type == "cuda"
        self.model, meta = load_trained_model(Path(checkpoint_dir), self.device, verify_sam=False)
        self.image_size = get_variant(meta["model"]["variant"]).image_size
        self.shards, self.llm_dim, self.data_root = shards, llm_dim, config.data_root
        self.store = ShardStore(Path(shard_cache_dir))

    def __call__(self, batch: pa.Table) -> pa.Table:
        dataset = Stage2Dataset(Stage2Index(batch, self.shards, self.llm_dim, []), self.data_root, self.image_size,
                                self.store, image_cache_size=0)  # fmt: skip
        loaded, errors = load_batch_skipping_errors(dataset, list(range(len(dataset))))
        predicted: dict[int, tuple[str, float]] = {}
        if loaded is not None:
            masks, scores = predict_masks(self.model, loaded, self.device, self.use_bf16)
            for i, mask, score in zip(loaded["indices"], masks, scores):
                predicted[i] = (encode_mask_json(mask), score)
        rows = range(len(dataset))
        return pa.table(
            {
                "sample_id": batch["sample_id"],
                "rle": pa.array([predicted[i][0] if i in predicted else None for i in rows], pa.string()),
                "score": pa.array([predicted[i][1] if i in predicted else None for i in rows], pa.float32()),
                "height": pc.cast(batch["height"], pa.int32()),
                "width": pc.cast(batch["width"], pa.int32()),
                "status": pa.array(["ok" if i in predicted else "error" for i in rows], pa.string()),
                "error": pa.array([errors.get(i) for i in rows], pa.string()),
                "shard": batch["shard"],
            }
        )


def _output_path(out_dir: Path, ref: ShardRef) -> Path:
    return out_dir / Path(ref.path).parent.name / Path(ref.path).name


def _error_rows(rows: pa.Table) -> pa.Table:
    """Prediction rows for stage-1 error rows: no mask, the stage-1 error."""
    count = rows.num_rows
    return pa.table(
        {
            "sample_id": rows["sample_id"],
            "rle": pa.nulls(count, pa.string()),
            "score": pa.nulls(count, pa.float32()),
            "height": pc.cast(rows["height"], pa.int32()),
            "width": pc.cast(rows["width"], pa.int32()),
            "status": pa.array(["error"] * count, pa.string()),
            "error": pc.cast(rows["error"], pa.string()),
        }
    )


def infer(
    config: PipelineConfig, sources: list[Stage2Source], checkpoint_dir: Path, out_dir: Path, job: JobSlice | None = None
) -> dict[str, Any]:
    """Predict a mask for every sample of ``sources`` with the trained parts in ``checkpoint_dir``; returns a summary
    (shard and row counts, errors, seconds, samples/s; shards written by this job and by others). Finished output shards
    of the same checkpoint are skipped; ``job`` is a job array task's share of the shards."""
    started, job = time.perf_counter(), job or JobSlice()
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    store = pull_inputs(config, [checkpoint_dir, *{s.shard_dir.parent for s in sources}, out_dir])
    store = store if store is not None and store.contains(out_dir) else None  # predictions published there
    meta = read_meta(checkpoint_dir)
    verify_sam_weights(meta)  # once here; the actors skip it
    checkpoint_id = sha256_of(checkpoint_dir / WEIGHTS_FILE)[:16]
    index = build_index(sources, config.data.max_samples_per_manifest, keep_errors=True)
    table = index.table
    all_shards = sorted(set(table["shard"].to_pylist()))
    shard_numbers = [k for ordinal, k in enumerate(all_shards) if job.takes(ordinal)]
    rows_by_shard = {k: table.filter(pc.equal(table["shard"], k)) for k in shard_numbers}

    def finished(k: int) -> bool:
        path = _output_path(out_dir, index.shards[k])
        if store is not None:
            refresh_shard(store, path)
        return is_done(path, rows_by_shard[k]["sample_id"].to_pylist()) and (read_done(path) or {}).get(
            "checkpoint") == checkpoint_id  # fmt: skip

    pending = [k for k in shard_numbers if not finished(k)]
    config.write_resolved(out_dir)
    logger.info("inference (%s): %d of %d output shards to write under %s", job.describe(), len(pending),
                len(shard_numbers), out_dir)  # fmt: skip
    stats = {"checkpoint": checkpoint_id, "checkpoint_dir": str(checkpoint_dir), "train_name": meta["train_name"],
             "step": meta["step"]}  # fmt: skip
    written = {"shards": 0, "rows": 0, "ok": 0, "errors": 0, "predicted": 0}
    timeout = config.stage1.lease_timeout_s
    with ObjectLeases(store, timeout) if store is not None else ShardLeases(timeout) as leases:
        for stale in clean_temp_files(out_dir, config.stage1.lease_timeout_s):
            logger.warning("removed a temp file or lease left by a killed writer: %s", stale)
        remaining = pending
        while remaining:
            claimed = [k for k in remaining if _claim(leases, _output_path(out_dir, index.shards[k]), finished, k)]
            if claimed:
                _predict(config, index, claimed, rows_by_shard, checkpoint_dir, out_dir, stats, written, leases, store)
            remaining = [k for k in remaining if not finished(k)]
            if set(claimed) & set(remaining):
                raise RuntimeError(f"inference: output shards {sorted(set(claimed) & set(remaining))} were written but "
                                   "do not read back as done")  # fmt: skip
            if remaining and not claimed:  # all held by other live jobs: wait for them, or for their leases to go stale
                time.sleep(min(5.0, max(0.2, config.stage1.lease_timeout_s / 10)))
        taken_over = len(leases.taken_over)
    seconds = time.perf_counter() - started
    summary = {
        "out_dir": str(out_dir),
        "checkpoint": str(checkpoint_dir),
        "job": job.describe(),
        "shards": len(shard_numbers),
        "shards_skipped": len(shard_numbers) - len(pending),
        "shards_written": written["shards"],
        "shards_by_others": len(pending) - written["shards"],
        "other_task_shards": len(all_shards) - len(shard_numbers),
        "leases_taken_over": taken_over,
        "rows_written": written["rows"],
        "ok": written["ok"],
        "errors": written["errors"],
        "not_in_manifest": sum(report.not_in_manifest for report in index.reports),
        "seconds": seconds,
        "samples_per_s": written["predicted"] / seconds if written["predicted"] else 0.0,
    }
    logger.info("inference: wrote %d shards (%d rows, %d errors), skipped %d done, %d written by other jobs; %.1f "
                "samples/s", written["shards"], written["rows"], written["errors"], summary["shards_skipped"],
                summary["shards_by_others"], summary["samples_per_s"])  # fmt: skip
    return summary


def _claim(leases: ShardLeases, path: Path, finished: Any, k: int) -> bool:
    """The output shard's lease, when no live job holds it and it is still not done."""
    if not leases.acquire(path):
        return False
    if finished(k):
        leases.release(path)
        return False
    return True


def _predict(
    config: PipelineConfig, index: Stage2Index, pending: list[int], rows_by_shard: dict[int, pa.Table],
    checkpoint_dir: Path, out_dir: Path, stats: dict[str, Any], written: dict[str, int], leases: ShardLeases,
    store: ObjectStore | None = None,
) -> None:
    """Predict and write the ``pending`` output shards (this job holds their leases; each is released once written)."""
    import ray
    import ray.data

    from shared.ray_cluster import ensure_ray

    collected: dict[int, list[pa.Table]] = defaultdict(list)
    work = []
    for k in pending:
        rows = rows_by_shard[k]
        is_ok = pc.equal(rows["status"], "ok")
        collected[k].append(_error_rows(rows.filter(pc.invert(is_ok))))
        if rows.filter(is_ok).num_rows:
            work.append(rows.filter(is_ok).select(ROW_COLUMNS))

    def flush(k: int) -> None:
        mask_columns = [name for name in PREDICTION_SCHEMA.names if name not in TEXT_COLUMNS[1:]]
        masks = [part.select(mask_columns) for part in collected.pop(k)]
        shard = pa.concat_tables(masks).join(rows_by_shard[k].select(TEXT_COLUMNS), keys="sample_id")
        shard = shard.select(PREDICTION_SCHEMA.names).cast(PREDICTION_SCHEMA).sort_by("sample_id")
        ok = int(pc.sum(pc.cast(pc.equal(shard["status"], "ok"), pa.int64())).as_py() or 0)
        write_shard(shard, _output_path(out_dir, index.shards[k]), dict(stats, ok=ok, errors=shard.num_rows - ok))
        if store is not None:
            publish_shard(store, _output_path(out_dir, index.shards[k]))
        leases.release(_output_path(out_dir, index.shards[k]))
        written["shards"] += 1
        written["rows"] += shard.num_rows
        written["ok"] += ok
        written["errors"] += shard.num_rows - ok

    expected = {k: rows_by_shard[k].num_rows for k in pending}
    for k in pending:
        if sum(part.num_rows for part in collected[k]) == expected[k]:
            flush(k)
    started_ray = False
    if work:
        started_ray = ensure_ray(config)
        try:
            dataset = ray.data.from_arrow(work).map_batches(
                MaskPredictor,
                fn_constructor_kwargs=dict(config=config, checkpoint_dir=str(checkpoint_dir), shards=index.shards,
                                           llm_dim=index.llm_dim,
                                           shard_cache_dir=str(config.work_dir / "stage2" / "shard_cache")),
                batch_size=config.stage2.eval_batch,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=config.ray.num_workers),
                num_gpus=1 if config.ray.use_gpu else 0,
                num_cpus=config.ray.cpus_per_worker,
            )  # fmt: skip
            for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for k in set(block["shard"].to_pylist()):
                    collected[k].append(block.filter(pc.equal(block["shard"], k)))
                    if sum(part.num_rows for part in collected[k]) == expected[k]:
                        flush(k)
        finally:
            if started_ray:
                ray.shutdown()
    if collected:
        raise RuntimeError(f"inference ended with incomplete output shards: {sorted(collected)}")
    written["predicted"] += sum(part.num_rows for part in work)
