"""Stage-2 sources and their join: each manifest joined with its done stage-1 shards on ``sample_id``.

A ``Stage2Source`` names one ``<dataset>/<split>`` manifest and its stage-1 shard folder. ``build_index`` joins the two
using only the small columns (the embeddings stay on disk); stage-1 error rows, shard rows whose sample is not in the
manifest and manifest rows that stage 1 has not produced are skipped, counted and logged with reasons. A shard whose
done marker records other inputs than the manifest's rows now (an edited query, a replaced image: see
``shared.shard_inputs``) is refused, as a shard whose bytes changed is.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.shard_inputs import stage2_input_problem
from shared.shards import ShardError, list_shards, open_shard, read_done

logger = logging.getLogger("stage2_segment.data")  # the name these messages have always been logged under

MANIFEST_COLUMNS = [
    "sample_id", "dataset", "family", "split", "image_path", "image_id", "query", "query_kind", "mask", "height",
    "width",
]  # fmt: skip
SHARD_INDEX_COLUMNS = ["sample_id", "reason_answer", "target", "attributes", "seg_text", "status", "error"]
INPUT_EMBEDDINGS_FILE = "input_embeddings.safetensors"
INPUT_EMBEDDINGS_TENSOR = "input_embeddings"
EMBED_MODES = ("hidden", "input")


@dataclass(frozen=True)
class Stage2Source:
    """One manifest and its stage-1 shards.

    Attributes:
        spec: ``"<dataset>/<split>"``, e.g. ``"reasonseg/train"``.
        manifest: the manifest Parquet file.
        shard_dir: that manifest's shard folder, ``<work_dir>/stage1/<run_key>/<dataset>-<split>/``; in ``input``
            embedding mode its parent (the run folder) holds ``input_embeddings.safetensors``.
        run_key: the stage-1 run key every shard must carry in its metadata.
    """

    spec: str
    manifest: Path
    shard_dir: Path
    run_key: str


@dataclass(frozen=True)
class ShardRef:
    """Where one shard's embeddings live and how to read them."""

    path: str
    run_key: str
    embed_mode: str  # hidden | input
    input_table: str  # input_embeddings.safetensors in input mode, else ""


@dataclass
class JoinReport:
    """Counts of one source's join, with examples of stage-1 errors."""

    spec: str
    joined: int = 0
    stage1_errors: int = 0
    not_in_manifest: int = 0
    without_stage1_row: int = 0
    unfinished_shards: int = 0
    error_examples: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        text = (
            f"{self.spec}: {self.joined} samples; skipped {self.stage1_errors} stage-1 error rows, "
            f"{self.not_in_manifest} shard rows not in the manifest, {self.without_stage1_row} manifest rows without "
            f"a stage-1 row, {self.unfinished_shards} unfinished shards"
        )
        if self.error_examples:
            top = sorted(self.error_examples.items(), key=lambda item: -item[1])[:3]
            text += "; stage-1 errors: " + "; ".join(f"{count} x {message[:120]!r}" for message, count in top)
        return text


@dataclass
class Stage2Index:
    """The joined rows of all sources (sorted by spec order, then sample_id) and the shards they point into.

    ``table`` columns: the manifest's (``MANIFEST_COLUMNS``), the shard's ``reason_answer``/``target``/``attributes``/
    ``seg_text``/``status``/``error``, plus ``spec``, ``shard`` (index into ``shards``) and ``shard_row``.
    """

    table: pa.Table
    shards: list[ShardRef]
    llm_dim: int
    reports: list[JoinReport]

    def __len__(self) -> int:
        return self.table.num_rows


def _schema_metadata(parquet_file: pq.ParquetFile) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (parquet_file.schema_arrow.metadata or {}).items()}


def _input_table_path(source: Stage2Source) -> Path:
    for folder in (source.shard_dir.parent, source.shard_dir):
        if (folder / INPUT_EMBEDDINGS_FILE).is_file():
            return folder / INPUT_EMBEDDINGS_FILE
    raise FileNotFoundError(
        f"{source.spec}: shards are in 'input' embedding mode but {INPUT_EMBEDDINGS_FILE} is in neither "
        f"{source.shard_dir.parent} nor {source.shard_dir}"
    )


def _input_table_dim(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return int(handle.get_slice(INPUT_EMBEDDINGS_TENSOR).get_shape()[1])


def join_source(
    source: Stage2Source, shard_offset: int = 0, max_samples: int = 0, keep_errors: bool = False
) -> tuple[pa.Table, list[ShardRef], int, JoinReport]:
    """Join one manifest with its done shards on sample_id.

    Returns (joined rows, the shards they point into, embedding dim, report). ``max_samples`` > 0 keeps the first N
    manifest rows by sample_id, as stage 1 does. Stage-1 error rows are dropped unless ``keep_errors`` (inference
    reports them as rows). Shards of another run or schema version raise ``ShardError``.
    """
    report = JoinReport(source.spec)
    manifest = pq.read_table(source.manifest, columns=MANIFEST_COLUMNS).sort_by("sample_id")
    if max_samples > 0:
        manifest = manifest.slice(0, max_samples)
    built_from = (manifest.schema.metadata or {}).get(b"llavaseg.data_root")
    manifest_rows = {row["sample_id"]: row for row in manifest.select(["sample_id", "query", "query_kind",
                     "image_path"]).to_pylist()} if built_from else {}  # fmt: skip
    parts, refs, dims, unchecked = [], [], set(), 0
    for path in list_shards(Path(source.shard_dir)):
        done = read_done(path)
        if done is None:
            report.unfinished_shards += 1
            continue
        parquet_file = open_shard(path, source.run_key)
        if built_from and "row_input_digests" not in done:
            unchecked += 1
        elif built_from:
            shard_ids = parquet_file.read(columns=["sample_id"]).column("sample_id").to_pylist()
            problem = stage2_input_problem(done, shard_ids, manifest_rows, Path(built_from.decode()))
            if problem:
                raise ShardError(f"{path}: refused, {problem}; rerun `llavaseg reason` to redo it")
        metadata = _schema_metadata(parquet_file)
        mode = metadata.get("llavaseg.embed_mode", "hidden")
        if mode not in EMBED_MODES:
            raise ShardError(f"{path}: unknown embed mode {mode!r} in its metadata")
        input_table = str(_input_table_path(source)) if mode == "input" else ""
        if mode == "input":
            dims.add(_input_table_dim(Path(input_table)))
        else:
            dims.add(parquet_file.schema_arrow.field("embedding").type.value_type.list_size)
        rows = parquet_file.read(columns=SHARD_INDEX_COLUMNS)
        rows = rows.append_column("shard", pa.array(np.full(rows.num_rows, shard_offset + len(refs), np.int32)))
        rows = rows.append_column("shard_row", pa.array(np.arange(rows.num_rows, dtype=np.int32)))
        parts.append(rows)
        refs.append(ShardRef(str(path), source.run_key, mode, input_table))
    if unchecked:
        logger.warning("%s: %d done shard(s) record no input digests (written by an older version): their rows are not "
                       "checked against the manifest; `llavaseg reason` redoes them", source.spec, unchecked)
    if len(dims) > 1:
        raise ShardError(f"{source.shard_dir}: shards disagree on the embedding dim ({sorted(dims)})")
    if not parts:
        raise ShardError(f"{source.shard_dir}: no done stage-1 shards for {source.spec}")
    shard_rows = pa.concat_tables(parts)
    in_manifest = pc.is_in(shard_rows["sample_id"], value_set=manifest["sample_id"])
    report.not_in_manifest = shard_rows.num_rows - _count_true(in_manifest)
    report.without_stage1_row = manifest.num_rows - _count_true(
        pc.is_in(manifest["sample_id"], value_set=shard_rows["sample_id"])
    )
    usable = shard_rows.filter(in_manifest)
    is_error = pc.not_equal(usable["status"], "ok")
    errors = usable.filter(is_error)
    report.stage1_errors = errors.num_rows
    report.error_examples = dict(collections.Counter(str(e) for e in errors["error"].to_pylist()))
    if not keep_errors:
        usable = usable.filter(pc.invert(is_error))
    joined = usable.join(manifest, keys="sample_id", join_type="inner").sort_by("sample_id")
    joined = joined.append_column("spec", pa.array([source.spec] * joined.num_rows, pa.string()))
    report.joined = joined.num_rows
    return joined, refs, dims.pop(), report


def _count_true(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)


def build_index(
    sources: Sequence[Stage2Source], max_samples_per_manifest: int = 0, keep_errors: bool = False
) -> Stage2Index:
    """Join every source; log each source's counts. Raises ValueError when the sources disagree on the embedding dim
    or nothing is left to use."""
    tables, refs, reports, dims = [], [], [], {}
    for source in sources:
        table, source_refs, dim, report = join_source(source, len(refs), max_samples_per_manifest, keep_errors)
        logger.info("%s", report.describe())
        tables.append(table)
        refs.extend(source_refs)
        reports.append(report)
        dims[source.spec] = dim
    if not sources:
        raise ValueError("no stage-2 sources given")
    if len(set(dims.values())) > 1:
        raise ValueError(f"stage-1 embedding dims differ between sources: {dims}")
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise ValueError("no usable samples: " + " | ".join(report.describe() for report in reports))
    return Stage2Index(table, refs, next(iter(dims.values())), reports)
