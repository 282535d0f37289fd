"""Stage 1's two phases for one shard: generation (the chain of thought -> ``.partial/<n>.gen.parquet``) and embedding (token ids
and embeddings -> the final shard and its ``done`` file).

Both write to temporary names and rename. Per-row failures (unreadable image, empty or over-long query, engine errors)
are error rows, never a crash. The shard's ``seg_tokens`` column holds each row's seg_text token count before the
``max_embed_tokens`` cap; the done file counts the rows that the cap cut (``capped_rows``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared import shards
from shared.config import PipelineConfig
from shared.shard_inputs import shard_input_stats
from stage1_reason import prompts, step1_templates
from stage1_reason.engine_health import is_transient_error

GEN_SUFFIX = ".gen.parquet"
GEN_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("reason_prompt", pa.string()),
        pa.field("reason_answer", pa.string()),
        pa.field("seg_answer", pa.string()),
        pa.field("target", pa.string()),
        pa.field("attributes", pa.string()),
        pa.field("parse_status", pa.string()),
        pa.field("seg_text", pa.string()),
        pa.field("context_messages", pa.string()),  # JSON: the conversation seg_text continues
        pa.field("generated_tokens", pa.int32()),
        pa.field("reason_source", pa.string()),
        pa.field("error", pa.string()),
    ]
)
MANIFEST_COLUMNS = ["sample_id", "dataset", "family", "split", "image_path", "query", "query_kind"]


@dataclass(frozen=True)
class ShardTask:
    manifest: str  # "<dataset>/<split>"
    manifest_path: str
    index: int
    path: str  # final shard path
    sample_ids: list[str]


def read_manifest_rows(path: Path, limit: int = 0) -> pa.Table:
    table = pq.read_table(path, columns=MANIFEST_COLUMNS).sort_by("sample_id")
    return table.slice(0, limit) if limit > 0 else table


def gen_path(task: ShardTask) -> Path:
    """``<folder>/.partial/<n>.gen.parquet``: hidden, so readers of the shard folder never take it for data."""
    return shards.partial_path(Path(task.path), GEN_SUFFIX)


def gen_covers(task: ShardTask, input_digest: str | None = None) -> bool:
    """Whether the shard's gen file exists, reads, and holds a row for every sample id of the task; with
    ``input_digest``, also whether it was generated from those inputs (``shared.shard_inputs``)."""
    try:
        table = pq.read_table(gen_path(task), columns=["sample_id"])
    except (pa.ArrowInvalid, OSError):
        return False
    if input_digest is not None and (table.schema.metadata or {}).get(b"input_digest") != input_digest.encode():
        return False
    return set(task.sample_ids) <= set(table.column("sample_id").to_pylist())


def load_samples(rows: pa.Table, config: PipelineConfig) -> list[Any]:
    """Manifest rows -> Samples with decoded images (unreadable images become the row's error) and, for the families
    that ``stage1.step1_source`` sends to templates, the simulated step 1."""
    from shared.images import load_rgb
    from shared.paths import resolve_inside
    from stage1_reason.chain import Sample

    data_root, s1 = config.data_root, config.stage1
    samples = []
    for row in rows.to_pylist():
        step1 = None
        if step1_templates.step1_is_templated(row["family"], s1.step1_source):
            step1 = step1_templates.simulated_step1(row["sample_id"], row["query"], row["query_kind"], s1.seed)
        image, error = None, None
        try:
            image = load_rgb(resolve_inside(data_root, row["image_path"]))
        except ValueError as err:  # ImageLoadError, PathEscapeError
            error = str(err)
        except OSError as err:
            error = f"{row['image_path']}: {err}"
        samples.append(Sample(
            row["sample_id"], row["query"], row["query_kind"], image, error,
            step1.question if step1 else None, step1.answer if step1 else None,
        ))
    return samples


def generate_shard(task: ShardTask, rows: pa.Table, backend: Any, config: PipelineConfig) -> int:
    """Phase 1 for one shard: both CoT turns, written atomically to the shard's gen file. Returns rows generated."""
    from stage1_reason.chain import run_chain_of_thought

    started = time.perf_counter()
    inputs = shard_input_stats(rows, config.data_root)  # before reading the images: a later change is noticed
    samples = load_samples(rows, config)
    outputs = run_chain_of_thought(backend, samples, config.stage1.cot_steps, config.stage1.prompt_version)
    seconds = time.perf_counter() - started
    table = pa.Table.from_pylist(
        [
            {
                "sample_id": out.key,
                "reason_prompt": out.reason_question,
                "reason_answer": out.reason_answer,
                "seg_answer": out.target_attribute_answer,
                "target": out.target,
                "attributes": out.attributes,
                "parse_status": out.parse_status,
                "seg_text": out.seg_text,
                "context_messages": json.dumps(out.context_messages),
                "generated_tokens": out.generated_tokens,
                "reason_source": out.reason_source,
                "error": out.error,
            }
            for out in outputs
        ],
        schema=GEN_SCHEMA.with_metadata({
            "generate_seconds": f"{seconds:.3f}", "input_digest": inputs["input_digest"],
            "row_input_digests": json.dumps(inputs["row_input_digests"]),
        }),  # fmt: skip
    )
    shards.write_table_atomic(table, gen_path(task))
    return len(samples)


def embed_shard(
    task: ShardTask, rows: pa.Table, embedder: Any, config: PipelineConfig, metadata: dict[str, str], dim: int
) -> dict[str, Any]:
    """Phase 2 for one shard: embeddings for its gen rows, then the final shard and its done file. Returns its stats."""
    from stage1_reason.embed import EmbedRequest

    started = time.perf_counter()
    generated = pq.read_table(gen_path(task))
    gen_meta = generated.schema.metadata or {}
    generate_seconds = float(gen_meta.get(b"generate_seconds", b"0"))
    if b"input_digest" in gen_meta:  # what the answers were generated from
        inputs = {"input_digest": gen_meta[b"input_digest"].decode(),
                  "row_input_digests": json.loads(gen_meta[b"row_input_digests"])}  # fmt: skip
    else:
        inputs = shard_input_stats(rows, config.data_root)
    gen_rows = {row["sample_id"]: row for row in generated.to_pylist()}
    manifest_rows = rows.to_pylist()
    missing = [r["sample_id"] for r in manifest_rows if r["sample_id"] not in gen_rows]
    if missing:
        raise RuntimeError(f"{gen_path(task)}: generation output lacks {len(missing)} rows, e.g. {missing[:3]}")
    samples = {s.key: s for s in load_samples(rows, config)}
    requests = []
    for row in manifest_rows:
        gen = gen_rows[row["sample_id"]]
        sample = samples[row["sample_id"]]
        error = gen["error"] or (f"image: {sample.image_error}" if sample.image_error else None)
        requests.append(
            EmbedRequest(row["sample_id"], json.loads(gen["context_messages"]), gen["seg_text"], sample.image, error)
        )
    results = embedder.embed(requests)
    cap = config.stage1.max_embed_tokens
    records, embeddings = [], []
    for row, result in zip(manifest_rows, results, strict=True):
        gen = gen_rows[row["sample_id"]]
        ok = result.ok
        records.append(
            {
                "sample_id": row["sample_id"],
                "dataset": row["dataset"],
                "split": row["split"],
                "image_path": row["image_path"],
                "query": row["query"],
                "reason_prompt": gen["reason_prompt"],
                "reason_answer": gen["reason_answer"],
                "seg_prompt": _seg_prompt(gen, config.stage1.cot_steps),
                "seg_answer": gen["seg_answer"],
                "target": gen["target"],
                "attributes": gen["attributes"],
                "parse_status": gen["parse_status"],
                "seg_text": gen["seg_text"],
                "token_ids": result.token_ids.tolist() if ok else [],
                "seg_tokens": result.num_seg_tokens if ok else None,
                "generated_tokens": gen["generated_tokens"],
                "reason_source": gen["reason_source"],
                "status": "ok" if ok else "error",
                "error": None if ok else result.error,
            }
        )
        embeddings.append(result.embedding if ok else None)
    schema = shards.shard_schema(dim, metadata)
    columns = {name: [rec[name] for rec in records] for name in schema.names if name != "embedding"}
    arrays = [
        shards.embeddings_to_arrow(embeddings, dim) if f.name == "embedding" else pa.array(columns[f.name], type=f.type)
        for f in schema
    ]
    table = pa.Table.from_arrays(arrays, schema=schema)
    stats = {
        "manifest": task.manifest,
        "shard": task.index,
        "errors": sum(r["status"] == "error" for r in records),
        # engine-side row failures (not the row's fault): a rerun redoes the shard
        "transient_errors": sum(r["status"] == "error" and is_transient_error(r["error"]) for r in records),
        "generated_tokens": int(sum(r["generated_tokens"] or 0 for r in records)),
        "embedded_tokens": int(sum(len(r["token_ids"]) for r in records)),
        "capped_rows": sum(r["status"] == "ok" and r["seg_tokens"] > cap for r in records),
        "generate_seconds": round(generate_seconds, 3),
        "embed_seconds": round(time.perf_counter() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **inputs,  # input_digest, row_input_digests: stage 1 redoes the shard when its manifest rows change
    }
    shards.write_shard(table, Path(task.path), stats)
    gen_path(task).unlink(missing_ok=True)
    return json.loads(shards.done_path(Path(task.path)).read_text())


def _seg_prompt(gen: dict[str, Any], cot_steps: int) -> str:
    """The second turn's prompt (step 2 alone, or steps 2+3 merged) as it was asked; empty without a second turn."""
    if cot_steps == 1 or not gen["context_messages"]:
        return ""
    return prompts.second_turn_prompt(json.loads(gen["context_messages"]))
