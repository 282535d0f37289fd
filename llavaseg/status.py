"""``llavaseg status``: what exists for a config and what is done, read from the work dir without changing anything.

Reads manifests, done markers (checked against the manifest rows and a stat of their images) and the ``parse_status``/``status`` columns of done shards, training metrics and
checkpoint folders, evaluation ``metrics.json`` files and prediction done markers. It starts no engine, builds no model
and writes nothing, so it is safe to run beside a job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.config import PipelineConfig
from shared.shards import list_shards, read_done


@dataclass
class ManifestStatus:
    spec: str
    path: Path
    rows: int | None  # None: the manifest does not exist yet
    shards_total: int = 0
    shards_done: int = 0
    rows_done: int = 0
    errors: int = 0
    parse_fallback: int = 0
    shards_stale: int = 0  # marked done, but their manifest rows or image files changed since: reason redoes them

    def describe(self) -> str:
        if self.rows is None:
            return f"  {self.spec}: no manifest yet ({self.path})"
        line = f"  {self.spec}: {self.rows} rows; stage 1 {self.shards_done}/{self.shards_total} shards done"
        if self.shards_done:
            line += f" ({self.rows_done} rows, {self.errors} errors, {self.parse_fallback} parse fallbacks)"
        if self.shards_stale:
            line += (f"; {self.shards_stale} more marked done but their inputs changed (query, image path or image "
                     "file): `llavaseg reason` redoes them")  # fmt: skip
        return line


@dataclass
class Status:
    work_dir: Path
    stage1_run: str | None
    stage1_note: str
    manifests: list[ManifestStatus] = field(default_factory=list)
    training: list[str] = field(default_factory=list)
    evaluations: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"work dir: {self.work_dir}", f"stage 1 run: {self.stage1_run or '-'} {self.stage1_note}".rstrip()]
        lines += ["manifests and stage-1 shards:", *(m.describe() for m in self.manifests)]
        lines += ["training:", *(self.training or ["  none yet"])]
        lines += ["evaluations:", *(self.evaluations or ["  none yet"])]
        lines += ["predictions:", *(self.predictions or ["  none yet"])]
        return "\n".join(lines)


def _model_path_without_building(config: PipelineConfig) -> str | None:
    """The model folder stage 1 would load, or None when it is a locally built model that is not built yet."""
    from stage1_reason.tiny_model import TINY_MODELS, resolve_model

    if config.stage1.model in TINY_MODELS:
        folder = config.work_dir / "models" / config.stage1.model
        return str(folder) if (folder / "config.json").is_file() else None
    return resolve_model(config.stage1.model, config.work_dir)


def _manifest_status(spec: str, path: Path, shard_dir: Path | None, config: PipelineConfig) -> ManifestStatus:
    """A shard counts as done as stage 1 counts it: a done marker whose recorded inputs are the manifest's rows now
    (``shared.shard_inputs``: a stat of each row's image, no image read)."""
    from shared.shard_inputs import shard_input_stats, stage1_input_problem
    from stage1_reason.shard_phases import read_manifest_rows

    if not path.is_file():
        return ManifestStatus(spec, path, None)
    shard_size = config.stage1.shard_size
    manifest = read_manifest_rows(path, config.data.max_samples_per_manifest)
    rows = manifest.num_rows
    status = ManifestStatus(spec, path, rows, shards_total=-(-rows // shard_size) if rows else 0)
    if shard_dir is None or not shard_dir.is_dir():
        return status
    for shard in list_shards(shard_dir):
        done = read_done(shard)
        if done is None:
            continue
        index = int(shard.stem)
        expected = shard_input_stats(manifest.slice(index * shard_size, shard_size), config.data_root)
        if stage1_input_problem(done, expected) is not None:
            status.shards_stale += 1
            continue
        status.shards_done += 1
        table = pq.read_table(shard, columns=["status", "parse_status"])
        status.rows_done += table.num_rows
        status.errors += table.num_rows - (pc.sum(pc.equal(table["status"], "ok")).as_py() or 0)
        status.parse_fallback += pc.sum(pc.equal(table["parse_status"], "fallback")).as_py() or 0
    return status


def _training_lines(config: PipelineConfig, sources: list) -> list[str]:
    from stage2_segment.train import read_metrics, train_output_dir

    out = train_output_dir(config, sources)
    if not out.is_dir():
        return [f"  {out.name}: not started (`llavaseg train`)"]
    steps = [r["step"] for r in read_metrics(out) if "step" in r]
    final = out / "final"
    state = "final checkpoint exported" if (final / "checkpoint.json").is_file() else "in progress or interrupted"
    last = max(steps) if steps else 0
    return [f"  {out.name}: step {last}/{config.stage2.iterations}, {state} ({out})"]


def _evaluation_lines(work_dir: Path) -> list[str]:
    lines = []
    for path in sorted((work_dir / "eval").glob("*/metrics.json")):
        try:
            metrics: dict[str, Any] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            lines.append(f"  {path.parent.name}: unreadable metrics.json")
            continue
        scores = [
            f"{spec} gIoU {100 * s['gIoU']:.1f} cIoU {100 * s['cIoU']:.1f}"
            for spec, s in sorted((metrics.get("results") or {}).items()) if isinstance(s, dict) and "gIoU" in s
        ]  # fmt: skip
        lines.append(f"  {path.parent.name}: {'; '.join(scores) or 'no scores'}")
    return lines


def _prediction_lines(work_dir: Path) -> list[str]:
    lines = []
    for folder in sorted(p for p in (work_dir / "predictions").glob("*") if p.is_dir()):
        found = list_shards(folder)
        done = [s for s in found if read_done(s) is not None]
        rows = sum((read_done(s) or {}).get("rows", 0) for s in done)
        lines.append(f"  {folder.name}: {len(done)}/{len(found)} shards done, {rows} rows")
    return lines


def collect_status(config: PipelineConfig) -> Status:
    """What exists under the config's work dir for its manifests, stage-1 run, training, evaluations and predictions."""
    from llavaseg.pipeline import ManifestEntry, manifest_specs, stage2_sources
    from manifests.registry import manifest_filename
    from stage1_reason.run import manifest_folder, run_dir_for

    model_path = _model_path_without_building(config)
    run_dir = key = None
    note = ""
    if model_path is None:
        note = f"(model {config.stage1.model!r} not built yet: nothing reasoned)"
    else:
        run_dir, key, _ = run_dir_for(config, model_path)
    status = Status(config.work_dir, key, note)
    entries = []
    for spec in manifest_specs(config):
        path = config.work_dir / "manifests" / manifest_filename(*spec.split("/"))
        entries.append(ManifestEntry(spec, path))
        shard_dir = manifest_folder(run_dir, spec) if run_dir else None
        status.manifests.append(_manifest_status(spec, path, shard_dir, config))
    train_ready = run_dir is not None and all(e.path.is_file() for e in entries if e.spec in config.data.train)
    if train_ready:
        status.training = _training_lines(config, stage2_sources(config, entries, config.data.train))
    status.evaluations = _evaluation_lines(config.work_dir)
    status.predictions = _prediction_lines(config.work_dir)
    return status
