"""Evaluation of a trained stage-2 checkpoint: gIoU / cIoU with LISA's semantics, tables and overlay pictures.

Prediction = logits > 0 upsampled to the original image size (``AdaptedSam.postprocess_masks``); ground truth =
``shared.masks.rasterize`` at the original size; per-mask intersection and union from ``shared.metrics`` (GT 255 pixels
removed). Scores per ``<dataset>/<split>``, and for ReasonSeg also by query length as LISA splits it (``is_sentence``:
sentence queries = "long", phrases = "short"). Outputs under ``<work_dir>/eval/<name>/``::

    metrics.json          scores per dataset/split (+ by query length), skipped samples, checkpoint provenance
    metrics.md            the same as a table (percent, like the paper)
    per_sample.jsonl      sample_id, spec, query_kind, intersection, union, IoU
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
from PIL import Image
from tqdm import tqdm

from shared.config import PipelineConfig
from shared.paths import resolve_inside
from shared.metrics import per_sample_intersection_union, scores_from_counts
from shared.shards import write_json_atomic
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


def _summary(intersection: np.ndarray, union: np.ndarray) -> dict[str, Any]:
    scores = scores_from_counts(np.asarray(intersection, np.int64), np.asarray(union, np.int64))
    return {key: scores[key] for key in ("gIoU", "cIoU", "count", "intersection", "union")}


def group_scores(
    intersection: Sequence[int], union: Sequence[int], specs: Sequence[str], query_kinds: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Scores per spec (``"<dataset>/<split>"``) from per-sample foreground intersection and union; ReasonSeg specs
    get ``by_query_length`` with ``long`` (sentence) and ``short`` (phrase) where present."""
    intersection, union = np.asarray(intersection, np.int64), np.asarray(union, np.int64)
    specs, query_kinds = np.asarray(specs, dtype=object), np.asarray(query_kinds, dtype=object)
    results = {}
    for spec in dict.fromkeys(specs.tolist()):
        members = specs == spec
        result = _summary(intersection[members], union[members])
        if spec.split("/")[0] in SPLIT_BY_QUERY_LENGTH:
            result["by_query_length"] = {
                length: _summary(intersection[members & (query_kinds == kind)], union[members & (query_kinds == kind)])
                for kind, length in QUERY_LENGTH.items()
                if np.any(members & (query_kinds == kind))
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
        "| dataset/split | queries | samples | gIoU (%) | cIoU (%) |",
        "|---|---|---:|---:|---:|",
    ]
    for spec, result in metrics["results"].items():
        rows = [("all", result)] + list(result.get("by_query_length", {}).items())
        for label, scores in rows:
            giou, ciou = 100 * scores["gIoU"], 100 * scores["cIoU"]
            lines.append(f"| {spec} | {label} | {scores['count']} | {giou:.1f} | {ciou:.1f} |")
    skipped = {spec: count for spec, count in metrics["unusable_samples"].items() if count}
    lines += ["", f"Samples whose image or mask could not be used (left out): {skipped or 'none'}."]
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
    }  # fmt: skip


def evaluate(
    config: PipelineConfig, sources: list[Stage2Source], checkpoint_dir: Path, name: str | None = None,
    text_blind: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate the trained parts in ``checkpoint_dir`` on ``sources``; writes ``<work_dir>/eval/<name>/`` (name
    defaults to ``<train name>-step<NNNNNN>``) and returns the ``metrics.json`` content."""
    started = time.perf_counter()
    device = inference_device(config)
    model, meta = load_trained_model(Path(checkpoint_dir), device)
    use_bf16 = config.stage2.precision == "bf16" and device.type == "cuda"
    name = name or evaluation_name(meta, text_blind)
    out_dir = config.work_dir / "eval" / name
    index = build_index(sources, config.data.max_samples_per_manifest)
    image_size = get_variant(meta["model"]["variant"]).image_size
    dataset = Stage2Dataset(index, config.data_root, image_size, ShardStore(config.work_dir / "stage2" / "shard_cache"))
    if text_blind:  # the control: each sample gets another image's text (stage2_segment.text_blind)
        dataset = TextBlindDataset(dataset, config.stage2.seed)
    intersection, union, kept, rles = [], [], [], {}
    unusable = dict.fromkeys(dataset.rows["spec"], 0)
    batch_size = config.stage2.eval_batch
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"evaluate {name}", unit="batch"):
        batch, errors = load_batch_skipping_errors(dataset, list(range(start, min(start + batch_size, len(dataset)))))
        for i, message in errors.items():
            logger.warning("evaluation: leaving out %s", message)
            unusable[dataset.rows["spec"][i]] += 1
        if batch is None:
            continue
        masks, _ = predict_masks(model, batch, device, use_bf16)
        for i, mask in zip(batch["indices"], masks):
            try:
                gt = dataset.gt_mask(i)
            except ExampleError as error:
                logger.warning("evaluation: leaving out %s", error)
                unusable[dataset.rows["spec"][i]] += 1
                continue
            sample_i, sample_u = per_sample_intersection_union([mask], [gt])
            intersection.append(int(sample_i[0]))
            union.append(int(sample_u[0]))
            kept.append(i)
            rles[i] = encode_mask(mask)
    specs = [dataset.rows["spec"][i] for i in kept]
    kinds = [dataset.rows["query_kind"][i] for i in kept]
    results = group_scores(intersection, union, specs, kinds)
    per_sample_iou = scores_from_counts(np.asarray(intersection, np.int64), np.asarray(union, np.int64))
    per_sample_iou = per_sample_iou["per_sample_iou"]

    out_dir.mkdir(parents=True, exist_ok=True)
    config.write_resolved(out_dir)
    with (out_dir / "per_sample.jsonl").open("w") as handle:
        for k, i in enumerate(kept):
            record = {"sample_id": dataset.rows["sample_id"][i], "spec": specs[k], "query_kind": kinds[k],
                      "intersection": intersection[k], "union": union[k], "iou": float(per_sample_iou[k])}  # fmt: skip
            handle.write(json.dumps(record) + "\n")
    overlays, gallery = _write_overlays(dataset, kept, specs, per_sample_iou, rles, out_dir)
    metrics = {
        "name": name,
        **evaluation_identity(config, sources, checkpoint_dir, meta, text_blind),
        "train_name": meta["train_name"],
        "sam_checkpoint": meta.get("sam_checkpoint"),
        "results": results,
        "unusable_samples": unusable,
        "stage1_skipped": {report.spec: report.describe() for report in index.reports},
        "overlays": overlays,
        "gallery": gallery,
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    (out_dir / "metrics.md").write_text(metrics_markdown(metrics))
    for spec, result in results.items():
        logger.info("%s: gIoU %.4f cIoU %.4f over %d samples", spec, result["gIoU"], result["cIoU"], result["count"])
    logger.info("evaluation written to %s", out_dir)
    return metrics


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
