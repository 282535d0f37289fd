"""The sample viewer: static pages beside the report that browse every evaluated or inferred sample.

``write_viewer(folder, samples)`` writes ``folder/index.html`` and ``viewer.js`` (from the package's templates), and::

    data/index.js              every sample's split, query kind, status and IoU (a few bytes each): filtered, sorted
                               and paged in the browser
    data/chunk-NNNNN.js        the texts of CHUNK_SIZE samples (query, step-1 answer, target, attributes, reference
                               answer, error), loaded only when a page shows one of them
    images/NNNNN/<n>.jpg       each sample's image with the ground-truth and prediction outlines, loaded lazily

Data files are scripts (``window.llavasegIndex(...)``, ``window.llavasegChunk(...)``) rather than JSON so the viewer
works opened straight from disk (``file://``, where browsers refuse ``fetch``) as well as from any static web server.
Every text is inserted with ``textContent``, never as HTML.

A sample is a mapping with ``sample_id``, ``spec`` (``dataset/split``), ``query``, ``query_kind``, ``iou`` (or None),
``status`` and optionally ``reason_answer``, ``target``, ``attributes``, ``reference_answer``, ``error``,
``parse_status``, ``family``, ``image`` (path), ``gt`` and ``pred``: each an HxW label array (1 target, 255 ignore),
a callable returning one, a label-PNG path, or None. A ``pred`` path that is a picture (an overlay) is shown as the
image. A sample whose picture cannot be made is shown with the reason instead.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llavaseg.report.pictures import GT_OUTLINE, PRED_OUTLINE, draw_outlines, is_number, open_rgb, read_label_mask
from llavaseg.report.templating import render, template_text
from shared.console import progress

log = logging.getLogger(__name__)

CHUNK_SIZE = 100
VIEWER_IMAGE_SIZE = 384
TEXT_FIELDS = ("sample_id", "spec", "dataset", "family", "query", "query_kind", "reason_answer", "target",
               "attributes", "reference_answer", "status", "error", "parse_status")


@lru_cache(maxsize=32)
def _base_image(path: Path, size: int) -> Image.Image:
    """Cached: samples of one image (several queries each, as in refCOCO) decode it once; never drawn on."""
    return open_rgb(path, size)


def _mask(value: Any) -> np.ndarray | None:
    """A label array from an array, a callable or a label-PNG path; None for None or a picture that is no mask."""
    if value is None:
        return None
    if callable(value):
        value = value()
    if isinstance(value, (str, Path)):
        return read_label_mask(Path(value))
    return np.asarray(value)


def sample_picture(sample: Mapping[str, Any], size: int = VIEWER_IMAGE_SIZE) -> tuple[Image.Image, list[str]]:
    """The sample's image scaled to fit ``size`` with its ground truth (white core) and prediction (magenta core)
    outlined, and what could not be drawn; raises OSError/ValueError when neither the image nor a mask can be read."""
    masks, problems = {}, []
    for role in ("gt", "pred"):
        try:
            masks[role] = _mask(sample.get(role))
        except (OSError, ValueError) as err:
            masks[role] = None
            problems.append(f"{'ground truth' if role == 'gt' else 'prediction'} not drawn: {err}")
    gt, pred = masks["gt"], masks["pred"]
    base = None
    pred_source = sample.get("pred")
    if pred is None and not problems and isinstance(pred_source, (str, Path)):  # an overlay: it is the image to show
        base = open_rgb(Path(pred_source), size)
    elif sample.get("image"):
        base = _base_image(Path(sample["image"]), size)
    if base is None:
        shape = next((m.shape for m in (gt, pred) if m is not None), None)
        if shape is None:
            raise ValueError("; ".join(problems) or "no image and no mask")
        scale = size / max(shape)
        base = Image.new("RGB", (max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale))), (40, 40, 40))
    drawn = [(m, colour) for m, colour in ((gt, GT_OUTLINE), (pred, PRED_OUTLINE)) if m is not None]
    return draw_outlines(base, drawn), problems


def _iou(value: Any) -> float | None:
    return round(float(value), 5) if is_number(value) and math.isfinite(value) else None


def _levels(values: list[str]) -> list[str]:
    return sorted(set(values))


def write_viewer(folder: Path, samples: Iterable[Mapping[str, Any]], title: str) -> dict[str, Any]:
    """Write the viewer for ``samples`` into ``folder`` (replacing an earlier one); returns its counts."""
    folder = Path(folder)
    for stale in ("data", "images"):
        shutil.rmtree(folder / stale, ignore_errors=True)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, float | None]] = []
    chunk: list[dict[str, Any]] = []
    unreadable = 0

    def flush() -> None:
        number = (len(rows) - 1) // CHUNK_SIZE
        text = f"window.llavasegChunk({number}, {json.dumps(chunk, ensure_ascii=True)});\n"
        (folder / "data" / f"chunk-{number:05d}.js").write_text(text, encoding="ascii")
        chunk.clear()

    total = len(samples) if isinstance(samples, Sequence) else None
    for sample in progress(samples, desc="sample viewer", total=total, unit="sample"):
        n = len(rows)
        record = {k: (None if sample.get(k) is None else str(sample.get(k))) for k in TEXT_FIELDS}
        record.update(n=n, iou=_iou(sample.get("iou")), image=None, image_error=None)
        relative = f"images/{n // CHUNK_SIZE:05d}/{n:06d}.jpg"
        try:
            picture, problems = sample_picture(sample)
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            picture.save(folder / relative, quality=85)
            record["image"] = relative
            record["image_error"] = "; ".join(problems) or None
        except (OSError, ValueError) as err:
            unreadable += 1
            (log.warning if unreadable <= 5 else log.debug)("viewer, sample %s: no picture (%s)",
                                                            sample.get("sample_id"), err)  # fmt: skip
            record["image_error"] = f"no picture: {err}"
        rows.append((record["spec"] or "", record["query_kind"] or "", record["status"] or "", record["iou"]))
        chunk.append(record)
        if len(chunk) == CHUNK_SIZE:
            flush()
    if chunk:
        flush()
    specs, kinds, statuses = (_levels([r[k] for r in rows]) for k in range(3))
    where = [{name: i for i, name in enumerate(levels)} for levels in (specs, kinds, statuses)]
    index = {
        "title": title, "count": len(rows), "chunk_size": CHUNK_SIZE, "specs": specs, "kinds": kinds,
        "statuses": statuses,
        # one row per sample, in sample order: [spec index, query-kind index, status index, IoU or null]
        "rows": [[where[0][s], where[1][k], where[2][t], iou] for s, k, t, iou in rows],
    }  # fmt: skip
    (folder / "data" / "index.js").write_text(f"window.llavasegIndex({json.dumps(index, ensure_ascii=True)});\n",
                                              encoding="ascii")  # fmt: skip
    (folder / "viewer.js").write_text(template_text("viewer.js"), encoding="utf-8")
    (folder / "index.html").write_text(render("viewer.html.j2", title=title, count=len(rows)), encoding="utf-8")
    _base_image.cache_clear()
    log.info("viewer: %d samples (%d without a picture) in %s", len(rows), unreadable, folder)
    return {"samples": len(rows), "without_picture": unreadable, "index": folder / "index.html"}
