"""The pipeline's steps as functions of the config: prepare data, stage 1, stage 2, report. Each step reuses finished work."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from shared.config import PipelineConfig

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
    """Demo data (if configured), one manifest per configured dataset/split (reused when present), tiny models."""
    from manifests.demo import generate_demo_dataset
    from manifests.registry import build_manifest, manifest_filename

    started = time.perf_counter()
    if config.data.generate_demo:
        generate_demo_dataset(
            config.data_root, n_train=config.data.demo_train_images, n_val=config.data.demo_val_images, seed=0
        )
    out_dir = config.work_dir / "manifests"
    entries = []
    for spec in manifest_specs(config):
        dataset, split = spec.split("/")
        path = out_dir / manifest_filename(dataset, split)
        if path.is_file():
            log.info("manifest %s: reusing %s", spec, path)
        else:
            result = build_manifest(dataset, config.data_root, split, path)
            log.info("manifest %s", result.summary())
        entries.append(ManifestEntry(spec, path))
    config.write_resolved(out_dir)
    if build_models and config.stage1.model == "tiny-llava":
        from stage1_reason.tiny_model import resolve_model

        resolve_model(config.stage1.model, config.work_dir)
    log.info("prepare: %d manifests in %.1fs", len(entries), time.perf_counter() - started)
    return entries


def reason(config: PipelineConfig, manifests: list[ManifestEntry], overwrite: bool = False):
    """Stage 1 over every manifest; returns the run summary."""
    from stage1_reason.run import run_stage1

    return run_stage1(config, [(m.spec, m.path) for m in manifests], overwrite=overwrite)


def stage2_sources(config: PipelineConfig, manifests: list[ManifestEntry], specs: list[str]) -> list:
    """The stage-2 view of stage 1's output for ``specs``: manifest + shard folder + run key (stage 2 never runs the LLM)."""
    from stage1_reason.run import manifest_folder, run_dir_for
    from stage2_segment.data import Stage2Source

    run_dir, key, _ = run_dir_for(config)
    by_spec = {m.spec: m for m in manifests}
    missing = [spec for spec in specs if spec not in by_spec]
    if missing:
        raise ValueError(f"no manifest for {missing}; configured: {sorted(by_spec)}")
    return [Stage2Source(spec, by_spec[spec].path, manifest_folder(run_dir, spec), key) for spec in specs]


def run_all(config: PipelineConfig) -> None:
    started = time.perf_counter()
    manifests = prepare(config)
    summary = reason(config, manifests)
    print(summary.describe())
    from stage2_segment.evaluate import evaluate
    from stage2_segment.train import train

    trained = train(config, stage2_sources(config, manifests, config.data.train))
    print(f"stage 2: trained to step {trained.final_step}, final loss {trained.final_loss}, "
          f"{trained.samples_per_s} samples/s -> {trained.checkpoint_dir}")
    metrics = evaluate(config, stage2_sources(config, manifests, config.data.eval), Path(trained.checkpoint_dir))
    for spec, scores in (metrics.get("results") or {}).items():
        if isinstance(scores, dict) and "gIoU" in scores:
            print(f"  {spec}: gIoU {scores['gIoU']:.3f}  cIoU {scores['cIoU']:.3f}  ({scores.get('count')} samples)")
    print(f"pipeline finished in {time.perf_counter() - started:.0f}s; outputs under {config.work_dir}")
