"""Stage 1 over manifests: fixed numbered shards, two phases, exactly once.

Layout under ``<work_dir>/stage1/<run_key>/``::

    run.json                      the settings that make up the run key (model + weights fingerprint, prompt version, ...)
    resolved_config.json
    input_embeddings.safetensors  (embed_mode "input" only) the MLLM's input embedding table, for stage 2 lookups
    <dataset>-<split>/00000.parquet, ..., .done/00000.done.json, ..., .partial/ (hidden from readers)

Phase 1 (generation engine) turns each pending shard's rows into a ``.partial/<n>.gen.parquet`` with the chain of thought; phase 2
(embedding engine, started after the first is closed: one engine at a time) adds token ids and embeddings and writes the
final shard, then its ``done`` file, then removes the ``gen`` file. Both phases write to temporary names and rename, so a
kill at any point loses at most the shard in flight; a rerun skips done shards and reuses finished generation.
Per-row failures (unreadable image, empty or over-long query, engine errors) are error rows, never a crash. The phases
of one shard are in ``shard_phases``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from shared import shards
from shared.config import PipelineConfig
from shared.leases import JobSlice, clean_temp_files
from shared.object_leases import leases_for
from shared.object_store import publish_shard, push_if, refresh_shard
from shared.shard_inputs import shard_input_stats, stage1_input_problem
from stage1_reason import parsing, prompts, step1_templates
from stage1_reason.backends import make_embedder_for, make_generation_backend  # noqa: F401  (re-exported)
from stage1_reason.executor import (  # noqa: F401  (run_with_restarts: re-exported)
    EngineLifecycle,
    FinishedCheck,
    ShardClaims,
    poll_interval,
    run_with_restarts,
)
from stage1_reason.fingerprint import model_fingerprint
from stage1_reason.shard_phases import (  # noqa: F401  (GEN_SCHEMA, read_manifest_rows: part of this module's API)
    GEN_SCHEMA,
    ShardTask,
    embed_shard,
    gen_covers,
    gen_path,
    generate_shard,
    read_manifest_rows,
)
from stage1_reason.tiny_model import resolve_model

log = logging.getLogger(__name__)


@dataclass
class ManifestStats:
    rows: int = 0
    shards: int = 0
    reused_rows: int = 0
    new_rows: int = 0
    errors: int = 0
    generated_tokens: int = 0
    embedded_tokens: int = 0
    capped_rows: int = 0  # rows whose seg_text had more tokens than max_embed_tokens (the rest was cut)
    generate_seconds: float = 0.0  # summed over every done shard, reused ones included
    embed_seconds: float = 0.0


@dataclass
class Stage1Summary:
    run_dir: Path
    run_key: str
    per_manifest: dict[str, ManifestStats] = field(default_factory=dict)
    generated_samples: int = 0  # rows that went through the generation engine in this call
    embedded_samples: int = 0
    seconds: float = 0.0
    engine_restarts: int = 0  # engines restarted after they died or stalled
    retried_rows: int = 0  # rows of done shards redone because their errors came from the engine
    job: str = "whole run"  # or "task i of N" (a job array's static split)
    shards_by_this_job: int = 0  # shards this job wrote
    shards_by_others: int = 0  # pending shards another job wrote while this one ran
    shards_already_done: int = 0  # done when this job planned
    other_task_shards: int = 0  # shards of the other tasks of the array (not this task's)
    leases_taken_over: int = 0  # stale leases of dead jobs whose shards this job took over
    changed_input_shards: int = 0  # done shards redone because their manifest rows or image files changed
    # per phase (generate, embed): the engines this job started and closed, with their seconds
    engines: dict[str, EngineLifecycle] = field(
        default_factory=lambda: {"generate": EngineLifecycle(), "embed": EngineLifecycle()}
    )

    @property
    def new_rows(self) -> int:
        return sum(s.new_rows for s in self.per_manifest.values())

    @property
    def reused_rows(self) -> int:
        return sum(s.reused_rows for s in self.per_manifest.values())

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.per_manifest.values())

    @property
    def capped_rows(self) -> int:
        return sum(s.capped_rows for s in self.per_manifest.values())

    def generation_rate(self) -> float | None:
        """Rows per second of generation over every done shard (from their done files), None when unknown."""
        seconds = sum(s.generate_seconds for s in self.per_manifest.values())
        rows = sum(s.new_rows + s.reused_rows for s in self.per_manifest.values())
        return round(rows / seconds, 2) if seconds > 0 else None

    def describe(self) -> str:
        rate = self.generated_samples / self.seconds if self.seconds and self.generated_samples else 0.0
        lines = [
            f"stage 1: {self.new_rows} new samples, {self.reused_rows} reused, {self.errors} error rows, "
            f"{self.capped_rows} rows cut at max_embed_tokens, {self.seconds:.1f}s ({rate:.2f} samples/s generated) -> {self.run_dir}"
        ]
        started = {phase: e for phase, e in self.engines.items() if e.starts}
        if started:
            lines.append("  engines: " + ", ".join(
                f"{phase} {e.starts} start(s) {e.start_seconds:.1f}s + close {e.close_seconds:.1f}s"
                for phase, e in started.items()) + f" of the {self.seconds:.1f}s")  # fmt: skip
        if self.engine_restarts or self.retried_rows:
            lines.append(f"  {self.engine_restarts} engine restart(s); {self.retried_rows} rows retried after engine-side "
                         "errors of an earlier run")  # fmt: skip
        if self.changed_input_shards:
            lines.append(f"  {self.changed_input_shards} done shard(s) redone because their inputs changed (query, "
                         "image path or image file)")  # fmt: skip
        others = f", {self.other_task_shards} belong to the other tasks" if self.other_task_shards else ""
        lines.append(f"  {self.job}: {self.shards_by_this_job} shards written by this job, {self.shards_by_others} "
                     f"by other jobs meanwhile, {self.shards_already_done} already done{others}; "
                     f"{self.leases_taken_over} stale lease(s) taken over")  # fmt: skip
        for name, s in self.per_manifest.items():
            lines.append(
                f"  {name}: {s.rows} rows in {s.shards} shards ({s.new_rows} new, {s.reused_rows} reused, "
                f"{s.errors} errors, {s.generated_tokens} generated tokens, {s.embedded_tokens} embedded tokens, "
                f"{s.capped_rows} cut at max_embed_tokens)"
            )
        return "\n".join(lines)


def run_settings(config: PipelineConfig, model_path: str) -> dict[str, Any]:
    """Everything that changes the rows of a shard: it makes the run key."""
    s1 = config.stage1
    templated = sorted(family for family, source in s1.step1_source.items() if source == "template")
    return {
        "model": s1.model,
        "weights": model_fingerprint(model_path),
        "backend": s1.backend,
        "prompt_version": s1.prompt_version,
        "prompts": prompts.prompt_set(s1.prompt_version).__dict__,
        "cot_steps": s1.cot_steps,
        "seg_text_rule": prompts.SEG_TEXT_RULES[s1.cot_steps],
        "parser_version": parsing.PARSER_VERSION,
        "conversation_format": s1.conversation_format,
        "image_pad_to_square": s1.image_pad_to_square,
        "step1_templated_families": templated,
        "step1_templates": step1_templates.TEMPLATE_VERSION if templated else None,
        "embed_mode": s1.embed_mode,
        "max_embed_tokens": s1.max_embed_tokens,
        "max_new_tokens": s1.max_new_tokens,
        "max_model_len": s1.max_model_len,
        **({"embed_backend": s1.embed_backend} if s1.embed_backend not in ("", s1.backend) else {}),
        "dtype": s1.dtype,
        "decoding": "greedy",
        "seed": s1.seed,
        "shard_size": s1.shard_size,
        "max_samples_per_manifest": config.data.max_samples_per_manifest,
    }


def run_dir_for(config: PipelineConfig, model_path: str | None = None) -> tuple[Path, str, dict[str, Any]]:
    model_path = model_path or resolve_model(config.stage1.model, config.work_dir)
    settings = run_settings(config, model_path)
    key = shards.run_key(settings, label=Path(config.stage1.model.rstrip("/")).name)
    return config.work_dir / "stage1" / key, key, settings


def manifest_folder(run_dir: Path, spec: str) -> Path:
    return run_dir / spec.replace("/", "-")


def plan_shards(run_dir: Path, spec: str, manifest_path: Path, manifest: pa.Table, shard_size: int) -> list[ShardTask]:
    ids = manifest.column("sample_id").to_pylist()
    folder = manifest_folder(run_dir, spec)
    return [
        ShardTask(spec, str(manifest_path), i, str(folder / shards.shard_name(i)), ids[start : start + shard_size])
        for i, start in enumerate(range(0, len(ids), shard_size))
    ]


def embedding_dim(model_path: str, trust_remote_code: bool = False) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).get_text_config().hidden_size)


def shard_metadata(config: PipelineConfig, key: str, settings: dict[str, Any], model_path: str, dim: int) -> dict[str, str]:
    from importlib.metadata import version

    s1 = config.stage1
    return {
        "llavaseg.run_key": key,
        "llavaseg.model": s1.model,
        "llavaseg.model_path": str(model_path),
        "llavaseg.weights_fingerprint": settings["weights"],
        "llavaseg.prompt_version": s1.prompt_version,
        "llavaseg.cot_steps": str(s1.cot_steps),
        "llavaseg.embed_mode": s1.embed_mode,
        "llavaseg.embed_layer": "last_hidden" if s1.embed_mode == "hidden" else "input_embeddings",
        "llavaseg.embedding_dim": str(dim),
        "llavaseg.embedding_dtype": "float16",
        "llavaseg.backend": s1.backend,
        "llavaseg.embed_backend": s1.embed_backend or s1.backend,
        "llavaseg.package_version": version("llavaseg"),
        "llavaseg.settings": json.dumps(settings, sort_keys=True),
    }


def _rows_by_task(tasks: list[ShardTask], manifests: dict[str, pa.Table]) -> dict[tuple[str, int], pa.Table]:
    out = {}
    for task in tasks:
        table = manifests[task.manifest]
        out[(task.manifest, task.index)] = table.filter(pa.compute.is_in(table["sample_id"], pa.array(task.sample_ids)))
    return out


def check_engine_conventions(engine: Any, config: PipelineConfig, role: str) -> None:
    """A passed-in engine must render prompts and images as the config says, or its rows would be mislabelled."""
    if engine is None:
        return
    s1 = config.stage1
    fmt = getattr(engine, "conversation_format", s1.conversation_format)
    padded = getattr(engine, "pad_colour", None) is not None
    if (fmt, padded) != (s1.conversation_format, s1.image_pad_to_square):
        raise ValueError(
            f"the {role} engine renders conversation_format {fmt!r} with pad_to_square {padded}, but the config says "
            f"stage1.conversation_format={s1.conversation_format!r}, stage1.image_pad_to_square={s1.image_pad_to_square}"
        )


def run_stage1(
    config: PipelineConfig,
    manifests: list[tuple[str, Path]],
    overwrite: bool = False,
    backend: Any = None,
    embedder: Any = None,
    job: JobSlice | None = None,
) -> Stage1Summary:
    """Stage 1 for every manifest (spec, path). ``backend``/``embedder`` may be passed in (shared engines); they are then
    not closed here. With ``stage1.use_ray`` the shards run on a Ray Data actor pool of ``stage1.replicas`` engines.
    ``job``: this task's share of a job array; other jobs on the same run folder are met through shard leases."""
    import pyarrow.compute  # noqa: F401  (pa.compute)

    check_engine_conventions(backend, config, "generation")
    check_engine_conventions(embedder, config, "embedding")
    started = time.perf_counter()
    model_path = resolve_model(config.stage1.model, config.work_dir)
    run_dir, key, settings = run_dir_for(config, model_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = config.work_store  # an s3:// work dir: run_dir is this job's mirror of the run folder on the store
    published = store.pull(run_dir) if store is not None else set()
    shards.write_json_atomic(run_dir / "run.json", {"run_key": key, "settings": settings})
    push_if(store, run_dir / "run.json", config.write_resolved(run_dir))
    job = job or JobSlice()
    for stale in clean_temp_files(run_dir, config.stage1.lease_timeout_s):  # other live jobs' files stay
        log.warning("removed a temp file or lease left by a killed writer: %s", stale)
    dim = embedding_dim(model_path, config.stage1.trust_remote_code)
    metadata = shard_metadata(config, key, settings, model_path, dim)
    if config.stage1.embed_mode == "input" and not (run_dir / "input_embeddings.safetensors").is_file():
        from stage1_reason.embed import export_input_embeddings

        export_input_embeddings(model_path, run_dir / "input_embeddings.safetensors")

    summary, redo, ordinal = Stage1Summary(run_dir, key, job=job.describe()), {}, -1
    tables, pending, input_digests = {}, [], {}
    for spec, path in manifests:
        table = read_manifest_rows(Path(path), config.data.max_samples_per_manifest)
        tables[spec] = table
        tasks = plan_shards(run_dir, spec, Path(path), table, config.stage1.shard_size)
        stats = summary.per_manifest.setdefault(spec, ManifestStats(rows=table.num_rows, shards=len(tasks)))
        for task in tasks:
            ordinal += 1  # over every manifest: the static split of a job array
            if not job.takes(ordinal):
                summary.other_task_shards += 1
                continue
            task_rows = table.slice(task.index * config.stage1.shard_size, len(task.sample_ids))
            inputs = shard_input_stats(task_rows, config.data_root)
            input_digests[(task.manifest, task.index)] = inputs["input_digest"]
            done = shards.read_done(Path(task.path)) or {}
            transient = int(done.get("transient_errors", 0))
            complete = shards.is_done(Path(task.path), task.sample_ids, expected_run_key=key)
            if complete and store is not None and shards.done_path(Path(task.path)).relative_to(run_dir).as_posix() \
                    not in published:
                publish_shard(store, Path(task.path))  # finished here by a job killed before it published it
            changed = stage1_input_problem(done, inputs) if complete and not overwrite else None
            if transient and complete:
                log.info("%s: redoing it, %d of its rows failed in the engine", task.path, transient)
                summary.retried_rows += transient
                overwrite_this = True
            elif changed:
                log.info("%s: redoing it, %s", task.path, changed)
                summary.changed_input_shards += 1
                overwrite_this = True
            else:
                overwrite_this = overwrite
            if not overwrite_this and complete:
                gen_path(task).unlink(missing_ok=True)  # left by a kill between the done file and its removal
                stats.reused_rows += len(task.sample_ids)
                summary.shards_already_done += 1
                done = shards.read_done(Path(task.path)) or {}
                stats.errors += int(done.get("errors", 0))
                stats.generated_tokens += int(done.get("generated_tokens", 0))
                stats.embedded_tokens += int(done.get("embedded_tokens", 0))
                stats.capped_rows += int(done.get("capped_rows", 0))
                stats.generate_seconds += float(done.get("generate_seconds", 0.0))
                stats.embed_seconds += float(done.get("embed_seconds", 0.0))
            else:
                if overwrite_this:  # the old shard and its done file stay valid until the new ones replace them
                    gen_path(task).unlink(missing_ok=True)
                    redo[task.path] = FinishedCheck.marker(Path(task.path))
                pending.append(task)
    rows = _rows_by_task(pending, tables)
    if pending and config.stage1.backend == "openai":  # an unreachable server fails here, before any shard is touched
        from stage1_reason.openai_backend import server_metadata

        metadata.update(server_metadata(config.stage1))
    to_generate = [t for t in pending if not gen_covers(t, input_digests[(t.manifest, t.index)])]
    log.info("stage 1 run %s: %d shards pending (%d need generation)", key, len(pending), len(to_generate))

    leases = leases_for(config)
    refresh = (lambda path: refresh_shard(store, path)) if store is not None else None
    publish = (lambda path: publish_shard(store, path)) if store is not None else None
    claims = ShardClaims(leases, FinishedCheck(key, redo, refresh), poll_interval(config.stage1.lease_timeout_s),
                         publish=publish)  # fmt: skip
    has_generation = lambda t: gen_covers(t, input_digests[(t.manifest, t.index)])  # noqa: E731
    restarts = config.stage1.engine_restarts

    def run_round(todo: list[ShardTask]) -> list[dict[str, Any]]:
        if config.stage1.use_ray:
            from stage1_reason.ray_run import run_phases_on_ray

            stats, generated = run_phases_on_ray(config, model_path, todo, [t for t in todo if not has_generation(t)],
                                                 metadata, dim, claims.finished)  # fmt: skip
            summary.generated_samples += generated
            return stats
        generated, restarted = run_with_restarts(
            [t for t in todo if not has_generation(t)], "stage 1 generate", backend,
            lambda: make_generation_backend(config, model_path),
            claims.generating(lambda task, engine: generate_shard(task, rows[(task.manifest, task.index)], engine,
                                                                  config), has_generation), restarts,
            summary.engines["generate"],
        )  # fmt: skip
        summary.generated_samples += sum(generated)
        done, restarted_embed = run_with_restarts(
            claims.embeddable(todo, has_generation), "stage 1 embed", embedder,
            lambda: make_embedder_for(config, model_path),
            claims.embedding(lambda task, engine: embed_shard(task, rows[(task.manifest, task.index)], engine, config,
                                                              metadata, dim), has_generation), restarts,
            summary.engines["embed"],
        )  # fmt: skip
        summary.engine_restarts += restarted + restarted_embed
        return done

    with leases:
        done_stats = claims.work_through(pending, run_round)
    clean_temp_files(run_dir, config.stage1.lease_timeout_s)  # leases a killed job left on shards done since
    summary.shards_by_this_job = len(done_stats)
    summary.shards_by_others = len(pending) - len(done_stats)
    summary.leases_taken_over = len(leases.taken_over)
    for stats in done_stats:
        m = summary.per_manifest[stats["manifest"]]
        m.new_rows += stats["rows"]
        m.errors += stats["errors"]
        m.generated_tokens += stats["generated_tokens"]
        m.embedded_tokens += stats["embedded_tokens"]
        m.capped_rows += int(stats.get("capped_rows", 0))
        m.generate_seconds += float(stats.get("generate_seconds", 0.0))
        m.embed_seconds += float(stats.get("embed_seconds", 0.0))
    summary.embedded_samples = sum(s["rows"] for s in done_stats)
    summary.seconds = time.perf_counter() - started
    summary_name = "summary.json" if job.count == 1 else f"summary.task-{job.index}-of-{job.count}.json"
    shards.write_json_atomic(run_dir / summary_name, {
        "run_key": key, "new_rows": summary.new_rows, "reused_rows": summary.reused_rows, "errors": summary.errors,
        "capped_rows": summary.capped_rows, "max_embed_tokens": config.stage1.max_embed_tokens,
        "generated_samples": summary.generated_samples, "seconds": round(summary.seconds, 2),
        "engine_restarts": summary.engine_restarts, "retried_rows": summary.retried_rows,
        "engines": {phase: e.as_dict() for phase, e in summary.engines.items()},
        "job": {"slice": summary.job, "owner": leases.owner, "shards_by_this_job": summary.shards_by_this_job,
                "shards_by_others": summary.shards_by_others, "shards_already_done": summary.shards_already_done,
                "other_task_shards": summary.other_task_shards, "leases_taken_over": summary.leases_taken_over},
        "changed_input_shards": summary.changed_input_shards,
        "samples_per_s_in_generate_calls": summary.generation_rate(),  # every done shard, engine starts excluded
        "per_manifest": {k: {**v.__dict__, "generate_seconds": round(v.generate_seconds, 2),
                             "embed_seconds": round(v.embed_seconds, 2)} for k, v in summary.per_manifest.items()},
    })  # fmt: skip
    push_if(store, run_dir / summary_name)
    log.info("%s", summary.describe())
    return summary
