"""``write_report``: the report's context (tables, pictures, gallery, viewer), rendered by ``report.{html,md}.j2``."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llavaseg.report import tables
from llavaseg.report.pictures import is_number, plot_iou_histogram, plot_loss_curve, thumbnail
from llavaseg.report.templating import render
from llavaseg.report.viewer import write_viewer

log = logging.getLogger(__name__)

FILES_DIR = "report_files"
VIEWER_DIR = "viewer"
SUMMARY_FILE = "report.json"
ERRORS_SHOWN = 50


def select_cases(gallery: Sequence[Mapping[str, Any]], per_side: int) -> tuple[list[dict], list[dict]]:
    """(best, worst): the ``per_side`` highest-IoU cases, best first, and the lowest, worst first; never overlapping."""
    scored = [dict(c) for c in gallery if is_number(c.get("iou")) and math.isfinite(c["iou"])]
    if len(scored) < len(gallery):
        log.warning("report gallery: %d cases without a finite IoU left out", len(gallery) - len(scored))
    scored.sort(key=lambda c: (-float(c["iou"]), str(c.get("sample_id", ""))))
    n_best = min(per_side, math.ceil(len(scored) / 2))
    n_worst = min(per_side, len(scored) - n_best)
    return scored[:n_best], scored[len(scored) - n_worst :][::-1]


def _gallery_pictures(case: Mapping[str, Any], stem: str, out_dir: Path) -> list[dict[str, str | None]]:
    """Thumbnails of a case's image, ground truth and prediction: caption, relative path or the reason it has none."""
    pictures = []
    image_path = Path(case["image"]) if case.get("image") else None
    for role, caption, suffix in (("image", "image", ".jpg"), ("gt", "ground truth", ".png"),
                                  ("pred", "prediction", ".png")):  # fmt: skip
        source = case.get(role)
        picture: dict[str, str | None] = {"caption": caption, "path": None, "missing": None}
        if not source:
            picture["missing"] = "not given"
        else:
            relative = f"{FILES_DIR}/gallery/{stem}-{role}{suffix}"
            try:
                thumbnail(Path(source), out_dir / relative, image_path if role != "image" else None,
                          None if role == "image" else role)  # fmt: skip
                picture["path"] = relative
            except (OSError, ValueError) as err:  # PIL raises OSError subclasses for missing or unreadable files
                log.warning("report gallery, sample %s: cannot read %s %s (%s)", case.get("sample_id"), role, source,
                            err)  # fmt: skip
                picture["missing"] = f"cannot read {source}"
        pictures.append(picture)
    return pictures


def _gallery(gallery: Sequence[Mapping[str, Any]], out_dir: Path, per_side: int) -> dict[str, Any]:
    shutil.rmtree(out_dir / FILES_DIR / "gallery", ignore_errors=True)
    best, worst = select_cases(gallery, per_side)
    groups = []
    for name, cases in (("Best cases", best), ("Worst cases", worst)):
        shown = []
        for rank, case in enumerate(cases, 1):
            fields = [("query", case.get("query")), ("target", case.get("target")),
                      ("attributes", case.get("attributes")), ("MLLM answer", case.get("reason_answer"))]  # fmt: skip
            shown.append({"rank": rank, "iou": tables.percent(case["iou"]), "sample_id": case.get("sample_id", ""),
                          "fields": [(k, v) for k, v in fields if v not in (None, "")],
                          "pictures": _gallery_pictures(case, f"{name.split()[0].lower()}-{rank:02d}", out_dir)})
        if shown:
            groups.append({"name": name, "cases": shown})
    return {"total": len(gallery), "best": len(best), "worst": len(worst), "groups": groups}


def _training(loss_curve: Sequence[Mapping[str, Any]], out_dir: Path) -> dict[str, Any] | None:
    relative = f"{FILES_DIR}/loss_curve.png"
    drawn = plot_loss_curve(loss_curve, out_dir / relative)
    if not drawn:
        return None
    finite = [r for r in loss_curve
              if is_number(r.get("loss")) and math.isfinite(r["loss"]) and is_number(r.get("step"))]  # fmt: skip
    first, last = min(finite, key=lambda r: r["step"]), max(finite, key=lambda r: r["step"])
    return {"plot": relative, "summary": f"{drawn} logged steps; loss {first['loss']:.4f} at step {first['step']} → "
                                         f"{last['loss']:.4f} at step {last['step']}.",
            "left_out": len(loss_curve) - drawn}  # fmt: skip


def _histogram(samples: Sequence[Mapping[str, Any]], out_dir: Path) -> dict[str, Any] | None:
    by_split: dict[str, list[float]] = defaultdict(list)
    for sample in tables.scored(samples):
        by_split[str(sample.get("spec") or "all")].append(float(sample["iou"]))
    relative = f"{FILES_DIR}/iou_histogram.png"
    drawn = plot_iou_histogram(by_split, out_dir / relative)
    return {"plot": relative, "count": drawn} if drawn else None


def _dialogue(dialogue: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not dialogue or not dialogue.get("count"):
        return None
    return {"table": tables.table(["ROUGE-L", "CIDEr", "samples"], [[tables.decimal(dialogue.get("ROUGE-L")),
             tables.decimal(dialogue.get("CIDEr")), tables.integer(dialogue.get("count"))]]),
            "few": dialogue["count"] < 10}  # fmt: skip


def _provenance(provenance: Mapping[str, Mapping[str, Any]] | None) -> list[tuple[str, dict[str, Any]]]:
    def text(value: Any) -> str:
        return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    return [(group, tables.table(["", "value"], [[k, text(v)] for k, v in values.items()]))
            for group, values in (provenance or {}).items() if values]  # fmt: skip


def write_report(
    out_dir: Path,
    *,
    title: str,
    metrics: dict,
    stage1: dict,
    loss_curve: list[dict],
    gallery: list[dict],
    dialogue: dict | None,
    notes: Sequence[str] = (),
    gallery_per_side: int = 4,
    samples: Iterable[Mapping[str, Any]] | None = None,
    stage1_errors: Sequence[Mapping[str, Any]] = (),
    provenance: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html``, ``report.json`` (the headline numbers, for the run index),
    ``report_files/`` and the sample viewer ``viewer/`` into ``out_dir``; returns the two report paths.

    Args:
        metrics: evaluation results, e.g. ``{"per_split": {"reasonseg/val": {"gIoU": 0.59, "cIoU": 0.53, "count": 200,
            "failed": 2, "by_query_kind": {"short": {...}, "long": {...}}}}}``; gIoU/cIoU as fractions, shown in
            percent; ``failed`` (samples scored as empty predictions) is shown beside them.
        stage1: the stage-1 ``summary.json`` (run_key, new_rows, reused_rows, errors, generated_samples, seconds,
            per_manifest).
        loss_curve: ``{"step", "loss", "lr", ...}`` per logged step.
        gallery: cases with ``image``, ``gt`` and ``pred`` paths, ``query``, ``target``, ``attributes``,
            ``reason_answer``, ``iou`` (fraction) and ``sample_id``; the ``gallery_per_side`` best and worst are shown.
        dialogue: :func:`llavaseg.dialogue.dialogue_scores` output, or None when there are no reference answers.
        notes: lines shown first, e.g. that a run used tiny random models.
        samples: every evaluated sample, as :mod:`llavaseg.report.viewer` takes them (plus ``intersection``,
            ``union``, ``family``, ``parse_status`` for the breakdowns); default: the gallery cases.
        stage1_errors: ``{"sample_id", "error"}`` of every stage-1 error row.
        provenance: ``{group: {name: value}}`` (:func:`llavaseg.report.provenance.run_provenance`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, stage1, gallery = metrics or {}, stage1 or {}, list(gallery or [])
    samples = list(gallery if samples is None else samples)
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stage1_summary, stage1_notes = tables.stage1_table(stage1) if stage1 else (None, [])
    error_messages, errors_listed = tables.stage1_error_tables(list(stage1_errors), ERRORS_SHOWN)
    viewer = write_viewer(out_dir / VIEWER_DIR, samples, title)
    context = {
        "title": title, "written": written, "notes": list(notes),
        "viewer": {"path": f"{VIEWER_DIR}/index.html", "count": viewer["samples"]},
        "segmentation": tables.segmentation_table(metrics),
        "details": tables.table(["detail", "value"], [[k, str(v)] for k, v in tables.scalar_items(metrics)]),
        "paper": tables.paper_table(),
        "breakdowns": tables.breakdown_tables(samples),
        "histogram": _histogram(samples, out_dir),
        "dialogue": _dialogue(dialogue),
        "stage1": stage1_summary and {"summary": stage1_summary, "notes": stage1_notes,
                                      "per_manifest": tables.stage1_manifest_table(stage1)},
        "stage1_errors": {"count": len(stage1_errors), "shown": min(len(stage1_errors), ERRORS_SHOWN),
                          "messages": error_messages, "listed": errors_listed},
        "training": _training(loss_curve or [], out_dir),
        "gallery": _gallery(gallery, out_dir, gallery_per_side),
        "provenance": _provenance(provenance),
    }  # fmt: skip
    if not context["histogram"]:
        (out_dir / FILES_DIR / "iou_histogram.png").unlink(missing_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(re.sub(r"\n{3,}", "\n\n", render("report.md.j2", **context)).strip() + "\n", encoding="utf-8")
    html_path.write_text(render("report.html.j2", **context), encoding="utf-8")
    summary = {"title": title, "written": written, "segmentation": [
        {"split": label, **{k: s.get(k) for k in tables.SCORE_KEYS if is_number(s.get(k))}}
        for label, _, s in tables.segmentation_rows(metrics)],
        "samples": viewer["samples"], "stage1_errors": len(stage1_errors), "provenance": provenance or {}}  # fmt: skip
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    log.info("report written to %s and %s", md_path, html_path)
    return md_path, html_path
