"""The human-facing report of a pipeline run: ``report.md`` and ``report.html`` in one self-contained folder.

The folder holds the two pages and ``report_files/`` (the loss plot and the gallery pictures, referenced by relative
paths), so it can be moved, zipped or served as is. Sections: notes, segmentation (gIoU/cIoU per split and query kind,
in percent with one decimal as in the paper, beside the paper's Table 1), dialogue quality (ROUGE-L, CIDEr), stage 1
(counts and throughput), training (loss and learning rate against step) and a gallery of the best and worst cases by
IoU with image, ground truth, prediction, query, target, attributes and the MLLM's answer. Every text is escaped in the
HTML page.

Gallery pictures are copied as thumbnails (longest side :data:`THUMBNAIL_SIZE`). A ground truth or prediction given as
a label mask (values 0/1/255, one channel) is drawn over the image (ground truth green, prediction red, 255 grey); an
overlay PNG is copied as it is. A picture that cannot be read is named in the report instead of failing the whole
report.
"""

from __future__ import annotations

import html
import logging
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 512
FILES_DIR = "report_files"
GT_COLOUR = (40, 200, 80)
PRED_COLOUR = (230, 50, 50)
IGNORE_COLOUR = (150, 150, 150)

# Paper Table 1, ReasonSeg val: gIoU, cIoU (percent), ROUGE-L, CIDEr.
PAPER_TABLE_1 = [
    ("LLaVASeg-13B", 59.1, 52.8, 0.393, 0.796),
    ("LLaVASeg-7B", 54.8, 49.9, None, None),
    ("LISA-13B (explain)", 57.3, 60.7, 0.290, 0.107),
]
_STAGE1_COLUMNS = ("rows", "shards", "new_rows", "reused_rows", "errors", "capped_rows", "generated_tokens",
                   "embedded_tokens")
_STAGE1_CAP_KEYS = ("capped_rows", "max_embed_tokens")  # shown as one row: "rows cut at max_embed_tokens"
_SCORE_KEYS = ("gIoU", "cIoU", "count", "failed")

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; background: #f6f7f9;
  margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 32px 0 10px; border-bottom: 2px solid #e3e6eb; }
h3 { font-size: 16px; margin: 22px 0 8px; } .meta { color: #667085; font-size: 13px; }
.notes { background: #fff7e0; border-left: 4px solid #f0b400; padding: 8px 14px; margin: 14px 0; }
.notes li { margin: 2px 0; } .muted { color: #667085; }
table { border-collapse: collapse; margin: 6px 0 12px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #dde1e7; padding: 4px 10px; text-align: right; }
th { background: #f0f2f5; } td:first-child, th:first-child { text-align: left; }
tr.sub td:first-child { padding-left: 26px; }
img.plot { max-width: 100%; border: 1px solid #e3e6eb; }
.case { border: 1px solid #dde1e7; border-radius: 8px; padding: 12px 14px; margin: 14px 0; }
.case h4 { margin: 0 0 8px; font-size: 15px; } .iou { font-weight: 700; }
.pictures { display: grid; grid-template-columns: repeat(3, 1fr); gap: 10px; }
figure { margin: 0; }
figure img { display: block; width: 100%; height: 220px; object-fit: contain; background: #eef0f3; border-radius: 4px; }
figcaption { font-size: 12px; color: #667085; text-align: center; }
.missing { height: 220px; display: flex; align-items: center; justify-content: center; text-align: center;
  padding: 0 12px; color: #b42318; background: #fdf0ef; border-radius: 4px; font-size: 13px; overflow-wrap: anywhere; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 10px 0 0; }
dt { color: #667085; } dd { margin: 0; white-space: pre-wrap; }
"""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f}" if _is_number(value) and math.isfinite(value) else "–"


def _decimal(value: Any, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}" if _is_number(value) and math.isfinite(value) else "–"


def _integer(value: Any) -> str:
    return f"{int(value):,}" if _is_number(value) and math.isfinite(value) else "–"


def segmentation_rows(metrics: Mapping[str, Any]) -> list[tuple[str, int, dict]]:
    """(label, depth, scores) for every nested dict holding a numeric gIoU, cIoU or count, in input order.

    Grouping keys (``per_split``, ``by_query_kind`` and any other ``per_*``/``by_*``) are left out of the labels.
    """
    rows: list[tuple[str, int, dict]] = []

    def walk(node: Mapping[str, Any], labels: list[str]) -> None:
        for key, value in node.items():
            if not isinstance(value, Mapping):
                continue
            grouping = key.startswith(("per_", "by_"))
            path = labels if grouping else [*labels, str(key)]
            if not grouping and any(_is_number(value.get(k)) for k in _SCORE_KEYS):
                rows.append((" · ".join(path), len(path) - 1, value))
            walk(value, path)

    walk(metrics, [])
    return rows


def _scalar_items(mapping: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in mapping.items() if isinstance(v, (str, int, float, bool)) and k not in _SCORE_KEYS]


# ---------------------------------------------------------------------------------------------------------- pictures


def plot_loss_curve(loss_curve: Sequence[Mapping[str, Any]], path: Path) -> int:
    """Loss against step (learning rate on a twin axis) as a PNG; returns the number of points drawn (0: no file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = sorted(
        (float(r["step"]), float(r["loss"]), r.get("lr"))
        for r in loss_curve
        if _is_number(r.get("step")) and _is_number(r.get("loss")) and math.isfinite(r["loss"])
    )
    if not points:
        return 0
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    figure = Figure(figsize=(8, 3.4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.plot(steps, losses, color="#1f5fbf", linewidth=1.6, marker="o" if len(points) < 40 else None, markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss", color="#1f5fbf")
    axis.grid(alpha=0.3)
    if min(losses) > 0 and max(losses) / min(losses) > 30:
        axis.set_yscale("log")
    lr_points = [(s, float(lr)) for s, _, lr in points if _is_number(lr)]
    if lr_points:
        lr_axis = axis.twinx()
        lr_axis.plot(*zip(*lr_points), color="#d9822b", linewidth=1.2, linestyle="--")
        lr_axis.set_ylabel("learning rate", color="#d9822b")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return len(points)


def _label_mask_values(picture: Image.Image) -> np.ndarray | None:
    """The HxW array of a one-channel picture whose values are all in {0, 1, 255}, else None (an overlay or photo)."""
    if picture.mode not in ("1", "L", "P", "I", "I;16"):
        return None
    values = np.asarray(picture.convert("L") if picture.mode == "1" else picture)
    if picture.mode == "1":
        values = (values > 0).astype(np.uint8)
    return values if np.isin(np.unique(values), (0, 1, 255)).all() else None


def _draw_mask(base: Image.Image, mask: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """``base`` (RGB) with the mask's 1-pixels tinted ``colour`` and its 255-pixels grey; mask resized to ``base``."""
    labels = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(base.size, Image.NEAREST))
    pixels = np.asarray(base, dtype=np.float32).copy()
    for value, tint in ((1, colour), (255, IGNORE_COLOUR)):
        where = labels == value
        pixels[where] = 0.45 * pixels[where] + 0.55 * np.asarray(tint, np.float32)
    return Image.fromarray(pixels.round().astype(np.uint8))


def _thumbnail(source: Path, target: Path, background: Path | None, colour: tuple[int, int, int] | None) -> None:
    """Copy ``source`` to ``target`` as a thumbnail. With a ``colour``, a label mask is drawn in it over ``background``
    (or black) first; without one (the image itself) the picture is always copied as it is."""
    with Image.open(source) as picture:
        picture.load()
    mask = _label_mask_values(picture) if colour is not None else None
    if mask is not None:
        base = Image.new("RGB", picture.size)
        if background is not None:
            try:
                with Image.open(background) as photo:
                    base = photo.convert("RGB")
            except OSError:  # reported with the image itself; draw the mask on black
                pass
        base.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS)
        picture = _draw_mask(base, mask, colour)
    else:
        picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
        picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".jpg":
        picture.convert("RGB").save(target, quality=88)
    else:
        picture.save(target)


def _gallery_pictures(case: Mapping[str, Any], stem: str, out_dir: Path) -> dict[str, str]:
    """Thumbnails of a case's image, ground truth and prediction: role -> relative path, or '!<reason>' if unusable."""
    pictures: dict[str, str] = {}
    image_path = Path(case["image"]) if case.get("image") else None
    roles = (("image", ".jpg", None), ("gt", ".png", GT_COLOUR), ("pred", ".png", PRED_COLOUR))
    for role, suffix, colour in roles:
        source = case.get(role)
        if not source:
            pictures[role] = "!not given"
            continue
        relative = f"{FILES_DIR}/gallery/{stem}-{role}{suffix}"
        try:
            _thumbnail(Path(source), out_dir / relative, image_path if role != "image" else None, colour)
            pictures[role] = relative
        except (OSError, ValueError) as err:  # PIL raises OSError subclasses for missing or unreadable files
            log.warning("report gallery, sample %s: cannot read %s %s (%s)", case.get("sample_id"), role, source, err)
            pictures[role] = f"!cannot read {source}"
    return pictures


def select_cases(gallery: Sequence[Mapping[str, Any]], per_side: int) -> tuple[list[dict], list[dict]]:
    """(best, worst): the ``per_side`` highest-IoU cases, best first, and the lowest, worst first; never overlapping."""
    scored = [dict(c) for c in gallery if _is_number(c.get("iou")) and math.isfinite(c["iou"])]
    if len(scored) < len(gallery):
        log.warning("report gallery: %d cases without a finite IoU left out", len(gallery) - len(scored))
    scored.sort(key=lambda c: (-float(c["iou"]), str(c.get("sample_id", ""))))
    n_best = min(per_side, math.ceil(len(scored) / 2))
    n_worst = min(per_side, len(scored) - n_best)
    return scored[:n_best], scored[len(scored) - n_worst :][::-1]


# ------------------------------------------------------------------------------------------------------------ markdown


def _md(text: Any) -> str:
    """Inline Markdown text: HTML-escaped, Markdown marks backslash-escaped, on one line."""
    escaped = html.escape(" ".join(str(text).split()), quote=False)
    return "".join("\\" + ch if ch in "\\`*_[]|#" else ch for ch in escaped)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """Markdown table; ``align`` is one of l/c/r per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":--", "c": ":-:", "r": "--:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]], sub_rows: Sequence[bool] = ()) -> str:
    head = "".join(f"<th>{_h(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = ' class="sub"' if i < len(sub_rows) and sub_rows[i] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Page:
    """Both documents, built section by section in parallel."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, level: int, text: str) -> None:
        self.md += ["", "#" * level + " " + _md(text), ""]
        self.html.append(f"<h{level}>{_h(text)}</h{level}>")

    def paragraph(self, text: str, css: str = "") -> None:
        self.md += [_md(text), ""]
        self.html.append(f'<p class="{css}">{_h(text)}</p>' if css else f"<p>{_h(text)}</p>")

    def table(self, header: Sequence[str], rows: list[Sequence[str]], sub_rows: Sequence[bool] = ()) -> None:
        md_rows = [[_md(c) for c in r] for r in rows]
        for row, sub in zip(md_rows, sub_rows):
            row[0] = "&emsp;" + row[0] if sub else row[0]
        self.md += [*_md_table([_md(h) for h in header], md_rows), ""]
        self.html.append(_html_table(header, rows, sub_rows))

    def image(self, relative: str, alt: str, css: str = "plot") -> None:
        self.md += [f"![{_md(alt)}]({quote(relative)})", ""]
        self.html.append(f'<img class="{css}" src="{_h(quote(relative))}" alt="{_h(alt)}">')


# ------------------------------------------------------------------------------------------------------------ sections


def _notes_section(page: _Page, notes: Sequence[str]) -> None:
    if not notes:
        return
    page.md += [*(f"> **Note:** {_md(n)}" for n in notes), ""]
    page.html.append('<div class="notes"><ul>' + "".join(f"<li>{_h(n)}</li>" for n in notes) + "</ul></div>")


def _segmentation_section(page: _Page, metrics: Mapping[str, Any]) -> None:
    page.heading(2, "Segmentation")
    rows = segmentation_rows(metrics)
    if rows:
        page.table(
            ["split", "gIoU (%)", "cIoU (%)", "samples", "failed (scored empty)"],
            [[label, _percent(s.get("gIoU")), _percent(s.get("cIoU")), _integer(s.get("count")),
              _integer(s.get("failed"))] for label, _, s in rows],
            [depth > 0 for _, depth, _ in rows],
        )
    else:
        page.paragraph("No segmentation results.", "muted")
    details = _scalar_items(metrics)
    if details:
        page.table(["detail", "value"], [[k, str(v)] for k, v in details])
    page.paragraph("For reference, the paper's Table 1 (ReasonSeg val):", "muted")
    page.table(
        ["method", "gIoU (%)", "cIoU (%)", "ROUGE-L", "CIDEr"],
        [[m, f"{g:.1f}", f"{c:.1f}", _decimal(r), _decimal(d)] for m, g, c, r, d in PAPER_TABLE_1],
    )


def _dialogue_section(page: _Page, dialogue: Mapping[str, Any] | None) -> None:
    page.heading(2, "Dialogue quality (step-1 answers)")
    if not dialogue or not dialogue.get("count"):
        page.paragraph("No reference answers: ROUGE-L and CIDEr not computed.", "muted")
        return
    page.table(
        ["ROUGE-L", "CIDEr", "samples"],
        [[_decimal(dialogue.get("ROUGE-L")), _decimal(dialogue.get("CIDEr")), _integer(dialogue.get("count"))]],
    )
    if dialogue["count"] < 10:
        page.paragraph("CIDEr weighs n-grams by their rarity across the scored samples; over fewer than ten samples it "
                       "is not comparable with the paper's.", "muted")  # fmt: skip


def _stage1_section(page: _Page, stage1: Mapping[str, Any]) -> None:
    page.heading(2, "Stage 1: MLLM reasoning")
    if not stage1:
        page.paragraph("No stage-1 summary.", "muted")
        return
    seconds, generated = stage1.get("seconds"), stage1.get("generated_samples")
    rows = [[k.replace("_", " "), str(v) if isinstance(v, str) else _integer(v) if isinstance(v, int) else f"{v:.2f}"]
            for k, v in _scalar_items(stage1) if k not in _STAGE1_CAP_KEYS]  # fmt: skip
    if _is_number(seconds) and _is_number(generated) and seconds > 0 and generated > 0:
        rows.append(["generation throughput", f"{generated / seconds:.2f} samples/s"])  # this call, wall clock
    capped, cap = stage1.get("capped_rows"), stage1.get("max_embed_tokens")
    total = sum(v for v in (stage1.get("new_rows"), stage1.get("reused_rows")) if _is_number(v))
    if _is_number(capped):
        share = f" ({100 * capped / total:.1f}%)" if total else ""
        rows.append(["rows cut at max_embed_tokens", f"{_integer(capped)} of {_integer(total)}{share}"
                     + (f", cap {_integer(cap)} tokens" if _is_number(cap) else "")])  # fmt: skip
    page.table(["", "value"], rows)
    if _is_number(capped) and capped > 0:
        page.paragraph(f"{_integer(capped)} rows had a seg_text longer than stage1.max_embed_tokens; only its first "
                       "tokens were embedded, so trailing attributes were cut (shards: seg_tokens).", "muted")
    per_manifest = stage1.get("per_manifest") or {}
    if per_manifest:
        keys = [k for k in _STAGE1_COLUMNS if any(k in s for s in per_manifest.values())]
        keys += sorted({k for s in per_manifest.values() for k in s if k not in keys and _is_number(s[k])})
        page.table(["manifest", *(k.replace("_", " ") for k in keys)],
                   [[name, *(_integer(s.get(k)) if not isinstance(s.get(k), float) else f"{s[k]:.2f}" for k in keys)]
                    for name, s in per_manifest.items()])  # fmt: skip


def _training_section(page: _Page, loss_curve: Sequence[Mapping[str, Any]], out_dir: Path) -> None:
    page.heading(2, "Training")
    relative = f"{FILES_DIR}/loss_curve.png"
    drawn = plot_loss_curve(loss_curve, out_dir / relative)
    if not drawn:
        page.paragraph("No training steps recorded.", "muted")
        return
    finite = [r for r in loss_curve
              if _is_number(r.get("loss")) and math.isfinite(r["loss"]) and _is_number(r.get("step"))]  # fmt: skip
    first, last = min(finite, key=lambda r: r["step"]), max(finite, key=lambda r: r["step"])
    page.paragraph(f"{drawn} logged steps; loss {first['loss']:.4f} at step {first['step']} → {last['loss']:.4f} at "
                   f"step {last['step']}.")  # fmt: skip
    if drawn < len(loss_curve):
        page.paragraph(f"{len(loss_curve) - drawn} entries without a finite loss are not drawn.", "muted")
    page.image(relative, "training loss and learning rate against step")


def _case(page: _Page, case: Mapping[str, Any], rank: int, pictures: Mapping[str, str]) -> None:
    heading = f"{rank}. IoU {_percent(case['iou'])}% — {case.get('sample_id', '')}"
    fields = [("query", case.get("query")), ("target", case.get("target")), ("attributes", case.get("attributes")),
              ("MLLM answer", case.get("reason_answer"))]  # fmt: skip
    fields = [(k, v) for k, v in fields if v not in (None, "")]
    captions = {"image": "image", "gt": "ground truth", "pred": "prediction"}
    # Markdown
    page.md += [f"#### {_md(heading)}", ""]
    cells = [f"![{captions[role]}]({quote(path)})" if not path.startswith("!") else f"*{_md(path[1:])}*"
             for role, path in pictures.items()]  # fmt: skip
    page.md += [*_md_table(list(captions.values()), [cells], "ccc"), ""]
    page.md += [*(f"- **{k}:** {_md(v)}" for k, v in fields), ""]
    # HTML
    figures = []
    for role, path in pictures.items():
        inner = (f'<img src="{_h(quote(path))}" alt="{_h(captions[role])}" loading="eager">' if not path.startswith("!")
                 else f'<div class="missing">{_h(path[1:])}</div>')  # fmt: skip
        figures.append(f"<figure>{inner}<figcaption>{_h(captions[role])}</figcaption></figure>")
    definitions = "".join(f"<dt>{_h(k)}</dt><dd>{_h(v)}</dd>" for k, v in fields)
    page.html.append(
        f'<div class="case"><h4>{_h(rank)}. <span class="iou">IoU {_h(_percent(case["iou"]))}%</span> — '
        f'{_h(case.get("sample_id", ""))}</h4><div class="pictures">{"".join(figures)}</div>'
        f"<dl>{definitions}</dl></div>"
    )


def _gallery_section(page: _Page, gallery: Sequence[Mapping[str, Any]], out_dir: Path, per_side: int) -> None:
    page.heading(2, "Gallery")
    shutil.rmtree(out_dir / FILES_DIR / "gallery", ignore_errors=True)
    best, worst = select_cases(gallery, per_side)
    if not best:
        page.paragraph("No scored cases.", "muted")
        return
    page.paragraph(f"{len(best)} best and {len(worst)} worst of {len(gallery)} cases by IoU. Ground truth in green, "
                   "prediction in red; grey pixels are ignored by the metric.", "muted")  # fmt: skip
    for name, cases in (("Best cases", best), ("Worst cases", worst)):
        if cases:
            page.heading(3, name)
        for rank, case in enumerate(cases, 1):
            _case(page, case, rank, _gallery_pictures(case, f"{name.split()[0].lower()}-{rank:02d}", out_dir))


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
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (plus ``report_files/``) into ``out_dir``; returns both paths.

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
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = _Page()
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page.md += [f"# {_md(title)}", "", f"*written {written}*", ""]
    page.html.append(f'<h1>{_h(title)}</h1><div class="meta">written {_h(written)}</div>')
    _notes_section(page, list(notes))
    _segmentation_section(page, metrics or {})
    _dialogue_section(page, dialogue)
    _stage1_section(page, stage1 or {})
    _training_section(page, loss_curve or [], out_dir)
    _gallery_section(page, gallery or [], out_dir, gallery_per_side)

    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(page.md).strip() + "\n", encoding="utf-8")
    html_path.write_text(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_h(title)}</title>'
        f"<style>{CSS}</style></head>\n<body><main>\n" + "\n".join(page.html) + "\n</main></body></html>\n",
        encoding="utf-8",
    )
    log.info("report written to %s and %s", md_path, html_path)
    return md_path, html_path
