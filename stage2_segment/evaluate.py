"""Evaluation of a trained stage-2 checkpoint: gIoU / cIoU with LISA's semantics, tables and overlay pictures.

Prediction = logits > 0 upsampled to the original image size (``AdaptedSam.postprocess_masks``); ground truth =
``shared.masks.rasterize`` at the original size; per-mask intersection and union from ``shared.metrics`` (GT 255 pixels
removed). Scores per ``<dataset>/<split>``, and for ReasonSeg also by query length as LISA splits it (``is_sentence``:
sentence queries = "long", phrases = "short").

Every row of an evaluated manifest is scored, as LISA scores every val image: a stage-1 error row, a manifest row that
stage 1 has not produced, and a row whose prediction cannot be made (image unreadable or missing) count as an empty
prediction -- IoU 0 unless its ground truth is empty too, and its ground-truth area enters cIoU's union. Their number
is ``failed`` beside every score, and ``failures`` counts them by kind. A ground truth that cannot be rasterised is a
broken evaluation set, not a failed prediction: it stops the evaluation, naming the row.

Outputs under ``<work_dir>/eval/<name>/``::

    metrics.json          scores per dataset/split (+ by query length), failures by kind, checkpoint provenance
    metrics.md            the same as a table (percent, like the paper)
    per_sample.jsonl      sample_id, spec, query_kind, intersection, union, IoU, status, error
    predictions.parquet   sample_id, rle: every predicted mask as COCO RLE JSON at the original size (the viewer's)
    overlays/*.png        the best and worst few samples of each dataset/split
    cases/*.png           their ground truth and prediction as label masks (0/1/255), listed in ``gallery``
    resolved_config.json
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from shared.console import progress as tqdm  # tqdm on a terminal, plain lines in a log

from shared.config import PipelineConfig
from shared.paths import resolve_inside
from shared.masks import MaskError, rasterize
from shared.metrics import per_sample_intersection_union, scores_from_counts
from shared.object_store import pull_inputs
from shared.shards import write_json_atomic, write_table_atomic
from stage2_segment.checkpoint import load_trained_model
from stage2_segment.data import ExampleError, ShardStore, Stage2Dataset, Stage2Source, build_index
from stage2_segment.infer import inference_device, load_batch_skipping_errors, predict_masks
from stage2_segment.modeling import get_variant
from stage2_segment.overlay import render_overlay
from stage2_segment.text_blind import TEXT_BLIND_SUFFIX, TextBlindDataset
from stage2_segment.rle import decode_mask, encode_mask

logger = logging.getLogger(__name__)

QUERY_LENGTH = {"sentence": "long", "phrase": "short"}  # LISA's is_sentence split of ReasonSeg
SPLIT_BY_QUERY_LENGTH = ("reasonseg",)
OVERLAYS_PER_END = 3


FAILURE_KINDS = ("stage1_error", "no_stage1_row", "no_prediction")  # scored as empty predictions
SCORING = "every manifest row; failures scored as empty predictions"
UNPRODUCED_COLUMNS = ["sample_id", "image_path", "query_kind", "mask", "height", "width"]


def _summary(intersection: np.ndarray, union: np.ndarray, failed: np.ndarray) -> dict[str, Any]:
    scores = scores_from_counts(np.asarray(intersection, np.int64), np.asarray(union, np.int64))
    summary = {key: scores[key] for key in ("gIoU", "cIoU", "count", "intersection", "union")}
    summary["failed"] = int(np.count_nonzero(failed))
    return summary


def group_scores(
    intersection: Sequence[int], union: Sequence[int], specs: Sequence[str], query_kinds: Sequence[str],
    failed: Sequence[bool] | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Scores per spec (``"<dataset>/<split>"``) from per-sample foreground intersection and union; ``failed`` marks
    the samples scored as empty predictions (their number is each summary's ``failed``). ReasonSeg specs get
    ``by_query_length`` with ``long`` (sentence) and ``short`` (phrase) where present."""
    intersection, union = np.asarray(intersection, np.int64), np.asarray(union, np.int64)
    specs, query_kinds = np.asarray(specs, dtype=object), np.asarray(query_kinds, dtype=object)
    failed = np.zeros(len(specs), bool) if failed is None else np.asarray(failed, bool)
    results = {}
    for spec in dict.fromkeys(specs.tolist()):
        members = specs == spec
        result = _summary(intersection[members], union[members], failed[members])
        if spec.split("/")[0] in SPLIT_BY_QUERY_LENGTH:
            result["by_query_length"] = {
                length: _summary(intersection[chosen], union[chosen], failed[chosen])
                for kind, length in QUERY_LENGTH.items()
                if np.any(chosen := members & (query_kinds == kind))
            }
        results[spec] = result
    return results


def scores_from_predictions(
    pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], specs: Sequence[str], query_kinds: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """gIoU/cIoU per spec (and ReasonSeg query length) of HxW bool predictions against HxW 0/1/255 ground truths."""
    intersection, union = per_sample_intersection_union(pred_masks, gt_masks)
    return group_scores(intersection, union, specs, query_kinds)


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """``metrics.json`` content -> a Markdown table (gIoU and cIoU in percent)."""
    lines = [
        f"# Stage-2 evaluation: {metrics['name']}",
        "",
        f"Checkpoint `{metrics['checkpoint']}` (train {metrics['train_name']}, step {metrics['step']}).",
        "",
        "| dataset/split | queries | samples | gIoU (%) | cIoU (%) | failed (scored empty) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for spec, result in metrics["results"].items():
        rows = [("all", result)] + list(result.get("by_query_length", {}).items())
        for label, scores in rows:
            giou, ciou, failed = 100 * scores["gIoU"], 100 * scores["cIoU"], scores.get("failed", 0)
            lines.append(f"| {spec} | {label} | {scores['count']} | {giou:.1f} | {ciou:.1f} | {failed} |")
    failures = {spec: {kind: n for kind, n in kinds.items() if n} for spec, kinds in metrics.get("failures", {}).items()
                if any(kinds.values())}  # fmt: skip
    lines += ["", "Every manifest row is scored; a failed row counts as an empty prediction (IoU 0 unless its ground "
              f"truth is empty; its ground-truth area enters cIoU's union). Failures by kind: {failures or 'none'}."]
    return "\n".join(lines) + "\n"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80]


def evaluation_name(meta: dict[str, Any], text_blind: bool = False) -> str:
    """``<train name>-step<NNNNNN>``: the folder under ``<work_dir>/eval/`` of a checkpoint's evaluation
    (``...-textblind`` for the text-blind control)."""
    return f"{meta['train_name']}-step{meta['step']:06d}" + (TEXT_BLIND_SUFFIX if text_blind else "")


def evaluation_identity(
    config: PipelineConfig, sources: list[Stage2Source], checkpoint_dir: Path, meta: dict[str, Any],
    text_blind: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """What an evaluation's numbers depend on (checkpoint, step, sources, sample limit; the text derangement's seed
    for the text-blind control); stored in ``metrics.json`` so an equal identity means the stored numbers can be
    reused."""
    return ({"text_blind_seed": config.stage2.seed} if text_blind else {}) | {
        "checkpoint": str(Path(checkpoint_dir).resolve()),
        "step": meta["step"],
        "sources": [{"spec": src.spec, "manifest": str(Path(src.manifest).resolve()), "run_key": src.run_key}
                    for src in sources],
        "max_samples_per_manifest": config.data.max_samples_per_manifest,
        "scoring": SCORING,
    }  # fmt: skip


def _unproduced_rows(sources: list[Stage2Source], joined_ids: set[str], max_samples: int) -> list[dict[str, Any]]:
    """Manifest rows (as ``build_index`` limits them) that no done stage-1 shard holds, each with its ``spec``."""
    rows = []
    for source in sources:
        manifest = pq.read_table(source.manifest, columns=UNPRODUCED_COLUMNS).sort_by("sample_id")
        manifest = manifest.slice(0, max_samples) if max_samples > 0 else manifest
        rows += [dict(row, spec=source.spec) for row in manifest.to_pylist() if row["sample_id"] not in joined_ids]
    return rows


def _unscorable(where: str, error: Exception) -> ValueError:
    return ValueError(f"evaluation cannot score {where}: its ground truth is unusable ({error}); fix the data or "
                      "rebuild the manifest")  # fmt: skip


def evaluate(
    config: PipelineConfig, sources: list[Stage2Source], checkpoint_dir: Path, name: str | None = None,
    text_blind: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate the trained parts in ``checkpoint_dir`` on every row of ``sources``' manifests (failures scored as
    empty predictions); writes ``<work_dir>/eval/<name>/`` (name defaults to ``<train name>-step<NNNNNN>``) and
    returns the ``metrics.json`` content. Raises ValueError naming the row whose ground truth cannot be rasterised."""
    started = time.perf_counter()
    device = inference_device(config)
    store = pull_inputs(config, [Path(checkpoint_dir), *{s.shard_dir.parent for s in sources}])
    model, meta = load_trained_model(Path(checkpoint_dir), device)
    use_bf16 = config.stage2.precision == "bf16" and device.type == "cuda"
    name = name or evaluation_name(meta, text_blind)
    out_dir = config.work_dir / "eval" / name
    index = build_index(sources, config.data.max_samples_per_manifest, keep_errors=True)
    image_size = get_variant(meta["model"]["variant"]).image_size
    dataset = Stage2Dataset(index, config.data_root, image_size, ShardStore(config.work_dir / "stage2" / "shard_cache"))
    dataset.store.warm(index.shards)
    if text_blind:  # the control: each sample gets another image's text (stage2_segment.text_blind)
        dataset = TextBlindDataset(dataset, config.stage2.seed)
    records: dict[int, dict[str, Any]] = {}  # dataset index -> per-sample record of a predicted row
    failures: dict[int, tuple[str, str]] = {
        i: ("stage1_error", f"stage-1 error: {dataset.value('error', i)}")
        for i, status in enumerate(dataset.rows["status"]) if status != "ok"
    }  # fmt: skip
    ok_rows = [i for i in range(len(dataset)) if i not in failures]
    rles, batch_size = {}, config.stage2.eval_batch
    for start in tqdm(range(0, len(ok_rows), batch_size), desc=f"evaluate {name}", unit="batch"):
        batch, errors = load_batch_skipping_errors(dataset, ok_rows[start : start + batch_size])
        for i, message in errors.items():
            logger.warning("evaluation: no prediction for %s; scored as an empty prediction", message)
            failures[i] = ("no_prediction", message)
        if batch is None:
            continue
        masks, _ = predict_masks(model, batch, device, use_bf16)
        for i, mask in zip(batch["indices"], masks):
            try:
                gt = dataset.gt_mask(i)
            except ExampleError as error:
                raise _unscorable(dataset.where(i), error) from error
            records[i] = _record(dataset.rows["sample_id"][i], dataset.rows["spec"][i],
                                 dataset.rows["query_kind"][i], mask, gt, "ok", None)  # fmt: skip
            rles[i] = encode_mask(mask)
    for i, (kind, message) in failures.items():
        try:
            gt = dataset.gt_mask(i)
        except ExampleError as error:
            raise _unscorable(dataset.where(i), error) from error
        records[i] = _record(dataset.rows["sample_id"][i], dataset.rows["spec"][i], dataset.rows["query_kind"][i],
                             np.zeros(gt.shape, bool), gt, kind, message)  # fmt: skip
    per_sample = [records[i] for i in sorted(records)]
    for row in _unproduced_rows(sources, set(dataset.rows["sample_id"]), config.data.max_samples_per_manifest):
        try:
            gt = rasterize(row["mask"], row["height"], row["width"], config.data_root)
        except MaskError as error:
            raise _unscorable(f"{row['sample_id']} ({row['image_path']})", error) from error
        per_sample.append(_record(row["sample_id"], row["spec"], row["query_kind"], np.zeros(gt.shape, bool), gt,
                                  "no_stage1_row", "no stage-1 row (its shard is not done)"))  # fmt: skip
    results = group_scores([r["intersection"] for r in per_sample], [r["union"] for r in per_sample],
                           [r["spec"] for r in per_sample], [r["query_kind"] for r in per_sample],
                           [r["status"] != "ok" for r in per_sample])  # fmt: skip
    failure_counts = {spec: dict.fromkeys(FAILURE_KINDS, 0) for spec in results}
    for record in per_sample:
        if record["status"] != "ok":
            failure_counts[record["spec"]][record["status"]] += 1

    out_dir.mkdir(parents=True, exist_ok=True)
    config.write_resolved(out_dir)
    with (out_dir / "per_sample.jsonl").open("w") as handle:
        for record in per_sample:
            handle.write(json.dumps(record) + "\n")
    predicted = sorted(rles)
    write_table_atomic(pa.table({"sample_id": [dataset.rows["sample_id"][i] for i in predicted],
                                 "rle": [json.dumps(rles[i]) for i in predicted]}), out_dir / "predictions.parquet")
    overlays, gallery = _write_overlays(dataset, predicted, [dataset.rows["spec"][i] for i in predicted],
                                        np.array([records[i]["iou"] for i in predicted]), rles, out_dir)  # fmt: skip
    metrics = {
        "name": name,
        **evaluation_identity(config, sources, checkpoint_dir, meta, text_blind),
        "train_name": meta["train_name"],
        "sam_checkpoint": meta.get("sam_checkpoint"),
        "results": results,
        "failures": failure_counts,
        "stage1_join": {report.spec: report.describe() for report in index.reports},
        "overlays": overlays,
        "gallery": gallery,
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    (out_dir / "metrics.md").write_text(metrics_markdown(metrics))
    for spec, result in results.items():
        logger.info("%s: gIoU %.4f cIoU %.4f over %d samples (%d failed, scored as empty predictions)", spec,
                    result["gIoU"], result["cIoU"], result["count"], result["failed"])  # fmt: skip
    if store is not None:  # the report reads it from the store; metrics.json last: present means complete
        store.push_tree(out_dir, last="metrics.json")
    logger.info("evaluation written to %s", out_dir)
    return metrics


def _record(
    sample_id: str, spec: str, query_kind: str, prediction: np.ndarray, gt: np.ndarray, status: str, error: str | None
) -> dict[str, Any]:
    """One ``per_sample.jsonl`` record: the sample's intersection, union and IoU (LISA's per-mask IoU)."""
    intersection, union = per_sample_intersection_union([prediction], [gt])
    iou = float(scores_from_counts(intersection, union)["per_sample_iou"][0])
    return {"sample_id": sample_id, "spec": spec, "query_kind": query_kind, "intersection": int(intersection[0]),
            "union": int(union[0]), "iou": iou, "status": status, "error": error}  # fmt: skip


def _write_overlays(
    dataset: Stage2Dataset, kept: list[int], specs: list[str], ious: np.ndarray, rles: dict[int, dict], out_dir: Path
) -> tuple[list[str], list[dict[str, Any]]]:
    """PNG overlays of the best and worst ``OVERLAYS_PER_END`` samples of each spec in ``overlays/``, and their ground
    truth and prediction as label PNGs in ``cases/``; returns the overlay file names and one gallery case per sample
    (image path, gt, pred, query, target, attributes, iou, ...) for the report."""
    folder, cases_dir = out_dir / "overlays", out_dir / "cases"
    for stale_dir in (folder, cases_dir):
        stale_dir.mkdir(parents=True, exist_ok=True)
        for stale in stale_dir.glob("*.png"):
            stale.unlink()
    names, gallery = [], []
    for spec in dict.fromkeys(specs):
        members = sorted((k for k in range(len(kept)) if specs[k] == spec), key=lambda k: -ious[k])
        chosen = [("best", rank, k) for rank, k in enumerate(members[:OVERLAYS_PER_END])]
        chosen += [("worst", rank, k) for rank, k in enumerate(reversed(members[-OVERLAYS_PER_END:]))
                   if k not in members[:OVERLAYS_PER_END]]  # fmt: skip
        for end, rank, k in chosen:
            i = kept[k]
            info = dataset.info(i)
            caption = [
                f"{info['sample_id']}  IoU {ious[k]:.3f}",
                f"query ({info['query_kind']}): {info['query']}",
                f"target: {info.get('target') or ''}",
                f"attributes: {info.get('attributes') or ''}",
            ]
            prediction = decode_mask(rles[i]).astype(bool)
            gt = dataset.gt_mask(i)
            picture = render_overlay(dataset.original_image(i), gt, prediction, caption)
            stem = f"{_safe_name(spec)}-{end}{rank + 1}-{_safe_name(info['sample_id'])}"
            picture.save(folder / f"{stem}.png")
            names.append(f"{stem}.png")
            Image.fromarray(gt.astype(np.uint8)).save(cases_dir / f"{stem}-gt.png")
            Image.fromarray(prediction.astype(np.uint8)).save(cases_dir / f"{stem}-pred.png")
            gallery.append({
                "sample_id": info["sample_id"], "spec": spec, "iou": float(ious[k]),
                "image": str(resolve_inside(dataset.data_root, info["image_path"])),
                "gt": str(cases_dir / f"{stem}-gt.png"), "pred": str(cases_dir / f"{stem}-pred.png"),
                "overlay": str(folder / f"{stem}.png"), "query": info["query"], "query_kind": info["query_kind"],
                "target": info.get("target"), "attributes": info.get("attributes"),
            })  # fmt: skip
    return names, gallery
