"""The pipeline's steps as functions of the config: prepare data, stage 1, stage 2, report. Each step reuses finished work."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from shared.config import PipelineConfig
from shared.console import echo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifestEntry:
    spec: str  # "<dataset>/<split>"
    path: Path

    @property
    def dataset(self) -> str:
        return self.spec.split("/")[0]

    @property
    def split(self) -> str:
        return self.spec.split("/")[1]


def manifest_specs(config: PipelineConfig) -> list[str]:
    """Train then eval specs, each once, in config order."""
    return list(dict.fromkeys([*config.data.train, *config.data.eval]))


def prepare(config: PipelineConfig, build_models: bool = True) -> list[ManifestEntry]:
    """Demo data (if configured), one manifest per configured dataset/split, tiny models.

    A manifest already there is reused when it was built from the configured data root, for the same dataset and split,
    by this builder version; otherwise it is rebuilt (and stage 1 then redoes the shards whose rows changed).
    """
    from manifests.demo import generate_demo_dataset
    from manifests.registry import build_manifest, manifest_filename, reuse_problem

    started = time.perf_counter()
    if config.data.generate_demo:
        generate_demo_dataset(
            config.data_root,
            n_train=config.data.demo_train_images,
            n_val=config.data.demo_val_images,
            n_test=config.data.demo_test_images,
            seed=config.data.demo_seed,
        )
    out_dir = config.work_dir / "manifests"
    entries = []
    for spec in manifest_specs(config):
        dataset, split = spec.split("/")
        path = out_dir / manifest_filename(dataset, split)
        stale = reuse_problem(path, dataset, split, config.data_root) if path.is_file() else "absent"
        if stale is None:
            log.info("manifest %s: reusing %s", spec, path)
        else:
            if stale != "absent":
                log.warning("manifest %s: rebuilding %s, %s", spec, path, stale)
            result = build_manifest(dataset, config.data_root, split, path)
            log.info("manifest %s", result.summary())
        entries.append(ManifestEntry(spec, path))
    config.write_resolved(out_dir)
    if build_models and config.stage1.model == "tiny-llava":
        from stage1_reason.tiny_model import resolve_model

        resolve_model(config.stage1.model, config.work_dir)
    log.info("prepare: %d manifests in %.1fs", len(entries), time.perf_counter() - started)
    return entries


def reason(
    config: PipelineConfig, manifests: list[ManifestEntry], overwrite: bool = False, backend: Any = None,
    embedder: Any = None, job: Any = None,
):
    """Stage 1 over every manifest; returns the run summary. ``backend``/``embedder``: engines already running;
    ``job``: a job array task's share of the shards (``shared.leases.JobSlice``)."""
    from stage1_reason.run import run_stage1

    return run_stage1(config, [(m.spec, m.path) for m in manifests], overwrite, backend, embedder, job)


def stage2_sources(config: PipelineConfig, manifests: list[ManifestEntry], specs: list[str]) -> list:
    """The stage-2 view of stage 1's output for ``specs``: manifest + shard folder + run key (stage 2 never runs the LLM).

    A training spec (in ``data.train``, not in ``data.eval``) of a COCO-based dataset gets the manifest without the
    images of the evaluated refCOCO-family splits (``manifests.leakage``; paper Sec. 4.1); the count is logged."""
    from manifests.leakage import held_out_coco_ids, training_view
    from stage1_reason.run import manifest_folder, run_dir_for
    from stage2_segment.data import Stage2Source

    run_dir, key, _ = run_dir_for(config)
    by_spec = {m.spec: m for m in manifests}
    missing = [spec for spec in specs if spec not in by_spec]
    if missing:
        raise ValueError(f"no manifest for {missing}; configured: {sorted(by_spec)}")
    training = [spec for spec in specs if spec in config.data.train and spec not in config.data.eval]
    held_out = held_out_coco_ids((s, by_spec[s].path) for s in config.data.eval if s in by_spec) if training else set()
    paths = {spec: training_view(spec, by_spec[spec].path, held_out).manifest if spec in training else by_spec[spec].path
             for spec in specs}  # fmt: skip
    return [Stage2Source(spec, paths[spec], manifest_folder(run_dir, spec), key) for spec in specs]


TINY_MODEL_NOTE = ("Smoke run on tiny randomly initialised models ({models}) and a generated demo dataset: "
                   "the numbers show the pipeline works end to end and say nothing about the method.")
MINI_WORLD_NOTE = ("The mini world: a 4 M-parameter LLaVA-1.5 and a 0.75 M-parameter SAM, both trained on this machine on "
                   "the generated demo world of coloured shapes and then frozen, as the method asks. A faithful small "
                   "testbed of the method's mechanisms (chain-of-thought answers, attribute embeddings, language-aware "
                   "adapters at several depths); its numbers are not the paper's and say nothing about real images.")


@dataclass
class RunSummary:
    """What ``llavaseg run`` did: per-step seconds, stage-1 counts, the checkpoint, the scores and the report."""

    seconds: dict[str, float]
    stage1: Any
    trained: Any
    metrics: dict[str, Any]
    dialogue: dict[str, Any] | None
    evaluation_reused: bool
    report_md: Path
    report_html: Path

    def describe(self) -> str:
        lines = [self.stage1.describe()]
        t = self.trained
        loss = f"{t.final_loss:.4f}" if isinstance(t.final_loss, float) else str(t.final_loss)
        if t.steps_done:
            rate = f", {t.samples_per_s:.1f} samples/s" if t.samples_per_s else ""
            lines.append(f"stage 2: {t.steps_done} new steps, trained to step {t.final_step} (final loss {loss}{rate})"
                         f" -> {t.checkpoint_dir}")  # fmt: skip
        else:
            lines.append(f"stage 2: 0 new steps, reusing the checkpoint at step {t.final_step} (final loss {loss}) "
                         f"-> {t.checkpoint_dir}")  # fmt: skip
        lines.append(f"evaluation {self.metrics['name']}: " + ("reused" if self.evaluation_reused else "computed"))
        for spec, scores in (self.metrics.get("results") or {}).items():
            lines.append(f"  {spec}: gIoU {100 * scores['gIoU']:.1f}%  cIoU {100 * scores['cIoU']:.1f}%  "
                         f"({scores['count']} samples){_failed(scores)}")  # fmt: skip
            for length, sub in (scores.get("by_query_length") or {}).items():
                lines.append(f"    {length} queries: gIoU {100 * sub['gIoU']:.1f}%  cIoU {100 * sub['cIoU']:.1f}%  "
                             f"({sub['count']} samples){_failed(sub)}")  # fmt: skip
        if self.dialogue and self.dialogue.get("count"):
            d = self.dialogue
            lines.append(f"dialogue (step-1 answers vs references): ROUGE-L {d['ROUGE-L']:.3f}  CIDEr {d['CIDEr']:.3f}  "
                         f"({d['count']} samples)")  # fmt: skip
        lines.append("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items()))
        lines.append(f"report: {self.report_html} (and {self.report_md.name})")
        return "\n".join(lines)


def _failed(scores: dict[str, Any]) -> str:
    """The count of samples scored as empty predictions (stage-1 errors, unreadable images), beside a score."""
    return f"  {scores.get('failed', 0)} failed (scored as empty predictions)"


def evaluate_or_reuse(config: PipelineConfig, sources: list, checkpoint_dir: Path) -> tuple[dict[str, Any], bool]:
    """The evaluation of ``checkpoint_dir`` on ``sources``; an earlier ``metrics.json`` of the same checkpoint, step,
    sources and sample limit is reused. Returns (metrics, reused)."""
    from stage2_segment.checkpoint import read_meta
    from stage2_segment.evaluate import evaluate, evaluation_identity, evaluation_name

    meta = read_meta(checkpoint_dir)
    name = evaluation_name(meta)
    expected = evaluation_identity(config, sources, checkpoint_dir, meta)
    path = config.work_dir / "eval" / name / "metrics.json"
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            earlier = {}
        if all(earlier.get(k) == v for k, v in expected.items()):
            log.info("evaluation %s: reusing %s", name, path)
            return earlier, True
    return evaluate(config, sources, checkpoint_dir, name=name), False


def stage1_answers(sources: list) -> pa.Table:
    """sample_id, status and reason_answer of the sources' done shards (for the report's dialogue and gallery)."""
    from shared.shards import read_shards

    columns = ["sample_id", "status", "reason_answer"]
    return pa.concat_tables([read_shards(s.shard_dir, s.run_key, columns=columns) for s in sources])


def dialogue_for(sources: list, answers: pa.Table) -> dict[str, Any] | None:
    """ROUGE-L / CIDEr of the step-1 answers against the manifests' reference answers (None without references)."""
    import pyarrow.parquet as pq

    from llavaseg.dialogue import dialogue_scores_from_tables

    manifests = pa.concat_tables([pq.read_table(s.manifest, columns=["sample_id", "reference_answer"]) for s in sources])
    scores = dialogue_scores_from_tables(answers, manifests)
    return scores if scores["count"] else None


def report_notes(config: PipelineConfig) -> list[str]:
    from stage1_reason.tiny_model import COMPLETE_MARKER

    notes = []
    model = config.stage1.model
    tiny = [name for name, random in (
        ("tiny LLaVA", model.startswith("tiny-") or (Path(config.base_dir) / model / COMPLETE_MARKER).is_file()),
        ("tiny SAM", config.stage2.sam_variant == "tiny"),
    ) if random]  # fmt: skip
    if tiny:
        notes.append(TINY_MODEL_NOTE.format(models=", ".join(tiny)))
    elif model == "mini-llava" and config.stage2.sam_variant == "mini":
        notes.append(MINI_WORLD_NOTE)
    return notes


def write_run_report(
    config: PipelineConfig, stage1_run_dir: Path, trained: Any, metrics: dict[str, Any], sources: list
) -> tuple[Path, Path, dict[str, Any] | None]:
    """The report of a run in its own folder under ``<work_dir>/reports/`` (and the index of every run there);
    returns (md, html, dialogue scores)."""
    from llavaseg.report.runs import write_run_report as write_report_folder

    answers = stage1_answers(sources)
    dialogue = dialogue_for(sources, answers)
    md, html = write_report_folder(config, stage1_run_dir, trained, metrics, sources, answers, dialogue,
                                   report_notes(config))  # fmt: skip
    return md, html, dialogue


def run_all(config: PipelineConfig) -> RunSummary:
    """manifests -> stage 1 -> stage-2 training -> evaluation -> report; every step reuses finished work."""
    from stage2_segment.train import train

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    manifests = prepare(config)
    lap("prepare")
    stage1 = reason(config, manifests)
    lap("stage 1")
    trained = train(config, stage2_sources(config, manifests, config.data.train))
    lap("train")
    eval_sources = stage2_sources(config, manifests, config.data.eval)
    metrics, reused = evaluate_or_reuse(config, eval_sources, Path(trained.checkpoint_dir))
    lap("evaluate")
    md, html, dialogue = write_run_report(config, stage1.run_dir, trained, metrics, eval_sources)
    lap("report")
    summary = RunSummary(seconds, stage1, trained, metrics, dialogue, reused, md, html)
    seconds["total"] = sum(seconds.values())
    for note in report_notes(config):
        echo(f"note: {note}")
    echo(summary.describe())
    return summary
