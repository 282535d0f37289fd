"""One report folder per run under ``<work_dir>/reports/``, and ``reports/index.html`` comparing them.

A run's folder is named ``<UTC time>-<evaluation name>`` (``20261202-013000-demo-step000200``), so reports of earlier
runs stay; the index lists every folder holding a ``report.json``, newest first, with its scores per split and its
provenance (models, SAM variant, training step, commit), linking each report and sample viewer.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llavaseg.report.page import SUMMARY_FILE, VIEWER_DIR, write_report
from llavaseg.report.tables import integer, percent
from llavaseg.report.templating import render

log = logging.getLogger(__name__)

REPORTS_DIR = "reports"
INDEX_FILE = "index.html"


def new_run_folder(reports_dir: Path, name: str, now: datetime | None = None) -> Path:
    """A fresh folder ``<reports_dir>/<YYYYmmdd-HHMMSS>-<name>`` (``-2``, ``-3``... when taken), created."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_')[:80] or 'run'}"
    for attempt in range(1, 1000):
        folder = Path(reports_dir) / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{reports_dir}: no free folder name for {base}")


def _summaries(reports_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(Path(reports_dir).glob(f"*/{SUMMARY_FILE}")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("run index: %s left out (%s)", path, err)
            continue
        if isinstance(summary, dict):
            found.append((path.parent, summary))
    return sorted(found, key=lambda item: item[0].name, reverse=True)


def write_index(reports_dir: Path) -> Path:
    """``reports_dir/index.html``: one row per run folder, newest first; returns its path."""
    reports_dir = Path(reports_dir)
    runs = _summaries(reports_dir)
    splits = list(dict.fromkeys(s["split"] for _, summary in runs for s in summary.get("segmentation") or []
                                if " · " not in str(s.get("split"))))  # fmt: skip
    rows = []
    for folder, summary in runs:
        scores = {s.get("split"): s for s in summary.get("segmentation") or []}
        provenance = summary.get("provenance") or {}
        models, code = provenance.get("models") or {}, provenance.get("code") or {}
        commit = str(code.get("commit") or "")
        rows.append({
            "folder": folder.name, "report": f"{folder.name}/report.html",
            "viewer": f"{folder.name}/{VIEWER_DIR}/index.html" if (folder / VIEWER_DIR / "index.html").is_file()
            else None,
            "written": summary.get("written", ""), "title": summary.get("title", ""),
            "mllm": models.get("MLLM", "–"), "sam": models.get("SAM variant", "–"),
            "step": str(models.get("training step", "–")),
            "scores": [(percent((scores.get(split) or {}).get("gIoU")), percent((scores.get(split) or {}).get("cIoU")))
                       for split in splits],
            "samples": integer(summary.get("samples")), "errors": integer(summary.get("stage1_errors")),
            "commit": commit[:10] + (" +" if "local changes" in commit else ""),
        })  # fmt: skip
    path = reports_dir / INDEX_FILE
    reports_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(render("index.html.j2", runs=rows, splits=splits), encoding="utf-8")
    return path


def write_run_report(config: Any, stage1_run_dir: Path, trained: Any, metrics: dict[str, Any], sources: list,
                     answers: Any, dialogue: dict[str, Any] | None, notes: list[str]) -> tuple[Path, Path]:  # fmt: skip
    """The report of one ``llavaseg run`` in a new folder under ``<work_dir>/reports/``, then the index; returns
    (md, html). ``answers``: sample_id/reason_answer of the evaluated shards; ``metrics``: the evaluation's JSON."""
    from llavaseg.report.provenance import run_provenance
    from llavaseg.report.samples import evaluated_samples, stage1_errors
    from stage2_segment.train import read_metrics

    by_id = dict(zip(answers["sample_id"].to_pylist(), answers["reason_answer"].to_pylist()))
    gallery = [{**case, "reason_answer": by_id.get(case["sample_id"])} for case in metrics.get("gallery") or []]
    summary_path = Path(stage1_run_dir) / "summary.json"
    stage1 = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    loss_curve = [r for r in read_metrics(trained.output_dir) if "step" in r]
    shown = {"per_split": metrics.get("results") or {}, "checkpoint": metrics.get("checkpoint"),
             "training step": metrics.get("step")}  # fmt: skip
    name = metrics.get("name", trained.train_name)
    folder = new_run_folder(config.work_dir / REPORTS_DIR, name)
    md, html = write_report(
        folder,
        title=f"LLaVASeg run: {name}",
        metrics=shown,
        stage1=stage1,
        loss_curve=loss_curve,
        gallery=gallery,
        dialogue=dialogue,
        notes=notes,
        samples=evaluated_samples(sources, config.work_dir / "eval" / name, config.data_root),
        stage1_errors=stage1_errors(stage1_run_dir),
        provenance=run_provenance(config, stage1_run_dir, Path(trained.checkpoint_dir), metrics),
    )
    config.write_resolved(folder)
    write_index(folder.parent)
    return md, html
