"""Stage-1 shards: schema, atomic writes, completion markers, validated reads.

A run folder holds one sub-folder per manifest (``<dataset>-<split>/``) with fixed, numbered shards::

    00000.parquet               rows of manifest rows [0, shard_size) in sample_id order
    .done/00000.done.json       stats, written LAST: the only proof the shard is complete
    .partial/, .00000.parquet.<host>-<pid>.tmp   intermediates and temporary files of a writer at work
    .leases/00000.lease.json    which job is writing the shard (shared.leases)

Only final shards end in ``.parquet`` outside a hidden folder, so pandas, Hugging Face ``load_dataset("parquet",
data_dir=...)``, ``ray.data.read_parquet`` and a ``*.parquet`` glob read a run folder as it is, mid-run included.

A shard is written to a temporary name and renamed; a rerun skips shards whose ``done`` file exists, whose sample ids
match the manifest (a rebuilt manifest invalidates exactly the shards it changed) and whose bytes still match the sha256
recorded in the done file. Stage 2 reads only done shards, and checks each one's checksum, run key and schema version, so
a stray or corrupted file cannot be read as data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_SCHEMA_VERSION = 3  # 2: seg_tokens and reason_source columns; 3: image_path
TMP_SUFFIX = ".tmp"
DONE_DIR = ".done"  # hidden: readers of the folder skip it
PARTIAL_DIR = ".partial"  # hidden: a writer's intermediates (stage 1's generation files)
_SHARD_RE = re.compile(r"^(\d{5})\.parquet$")
# Written without a Parquet dictionary: float16 hidden states never repeat, so a dictionary page only costs (reading
# the column was 4-6x slower with one, and the file larger; bench/shard_read.py, BENCHMARKS.md).
NO_DICTIONARY_COLUMNS = ("embedding",)


class ShardError(ValueError):
    """A shard that cannot be used as data: truncated, from another run, or of another schema version."""


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriteError(OSError):
    """A shard or its done file could not be written (disk full, file size limit, permissions...).

    ``errno`` is the OS error's; the message names the file. Nothing half-written is left under the final name, and no
    done file is written, so a rerun redoes the shard.
    """


def shard_schema(dim: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """Stage-1 shard schema. ``embedding`` is float16 [n_tokens, dim], empty (0 x dim) in ``input`` mode or on error."""
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("split", pa.string()),
        pa.field("image_path", pa.string()),  # as the manifest has it (relative to the dataset root)
        pa.field("query", pa.string()),
        pa.field("reason_prompt", pa.string()),  # step 1 (reason) user turn
        pa.field("reason_answer", pa.string()),  # the MLLM's unharmed answer
        pa.field("seg_prompt", pa.string()),  # second turn: steps 2+3 merged, or step 2 alone (cot_steps 2)
        pa.field("seg_answer", pa.string()),
        pa.field("target", pa.string()),
        pa.field("attributes", pa.string()),
        pa.field("parse_status", pa.string()),  # ok | fallback
        pa.field("seg_text", pa.string()),  # the exact text that was embedded
        pa.field("token_ids", pa.list_(pa.int32())),  # capped at max_embed_tokens (the first ones kept)
        pa.field("seg_tokens", pa.int32()),  # seg_text's token count before that cap; null on error rows
        pa.field("embedding", pa.list_(pa.list_(pa.float16(), dim))),
        pa.field("generated_tokens", pa.int32()),
        pa.field("reason_source", pa.string()),  # who wrote the step-1 answer: mllm | template (Sec. 3.4)
        pa.field("status", pa.string(), nullable=False),  # ok | error
        pa.field("error", pa.string()),
    ]
    meta = {"llavaseg.shard_schema_version": str(SHARD_SCHEMA_VERSION), "llavaseg.embedding_dim": str(dim)}
    meta.update(metadata or {})
    return pa.schema(fields, metadata=meta)


def run_key(settings: dict[str, Any], label: str = "") -> str:
    """Folder name from everything that changes the rows: ``<label>-<12 hex>``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:48]
    return f"{label}-{digest}" if label else digest


def ids_digest(sample_ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for sid in sample_ids:
        h.update(sid.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"{index:05d}.parquet"


def done_path(shard_path: Path) -> Path:
    """``<folder>/.done/<n>.done.json``: the completion marker of ``<folder>/<n>.parquet``."""
    return shard_path.parent / DONE_DIR / shard_path.name.replace(".parquet", ".done.json")


def partial_path(shard_path: Path, suffix: str) -> Path:
    """``<folder>/.partial/<n><suffix>``: an intermediate file of ``<folder>/<n>.parquet`` (hidden from readers)."""
    return shard_path.parent / PARTIAL_DIR / shard_path.name.replace(".parquet", suffix)


def temporary_path(path: Path) -> Path:
    """``.<name>.<host>-<pid>.tmp`` beside ``path``: hidden, so no reader of the folder takes it for data, and the
    writer's own, so two jobs writing the same file (``run.json`` of a shared run folder) never write into one file."""
    host = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname()) or "host"
    return path.with_name(f".{path.name}.{host}-{os.getpid()}{TMP_SUFFIX}")


def embeddings_to_arrow(embeddings: list[np.ndarray | None], dim: int) -> pa.Array:
    """List of float16 [n_i, dim] arrays (None -> empty) -> list<fixed_size_list<float16, dim>> without per-value Python work."""
    offsets = [0]
    flat = []
    for emb in embeddings:
        if emb is None:
            emb = np.zeros((0, dim), np.float16)
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise ValueError(f"embedding of shape {emb.shape} does not match dim {dim}")
        flat.append(np.ascontiguousarray(emb, dtype=np.float16).reshape(-1))
        offsets.append(offsets[-1] + emb.shape[0])
    values = np.concatenate(flat) if flat else np.zeros(0, np.float16)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values, type=pa.float16()), dim)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), inner)


def embedding_from_arrow(column: pa.ListArray | pa.ChunkedArray, row: int) -> np.ndarray:
    """One row's float16 [n_tokens, dim] array, zero-copy from the Arrow buffers."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.value_type.list_size
    cell = column[row].values  # FixedSizeListArray of n_tokens
    flat = cell.flatten().to_numpy(zero_copy_only=True)
    return flat.reshape(-1, dim)


def write_table_atomic(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Write ``table`` as Parquet to a temporary name beside ``path``, fsync, rename: ``path`` is whole or absent.

    Raises:
        ShardWriteError: naming ``path`` and the OS error (the temporary file is removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        dictionary = [name for name in table.column_names if name not in NO_DICTIONARY_COLUMNS]
        pq.write_table(table, tmp, compression=compression, use_dictionary=dictionary)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # pyarrow reports write failures as OSError without the file name
        tmp.unlink(missing_ok=True)
        raise _write_error(path, error) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_shard(table: pa.Table, shard_path: Path, stats: dict[str, Any]) -> None:
    """Write ``table`` to ``shard_path`` atomically, then the done file (stats, row ids digest, content sha256) last.

    Raises:
        ShardWriteError: the shard or its done file could not be written (named, with the OS error); the shard is then
            not done, and a rerun redoes it.
    """
    write_table_atomic(table, shard_path)
    stats = dict(
        stats,
        rows=table.num_rows,
        ids_digest=ids_digest(table.column("sample_id").to_pylist()),
        content_sha256=file_sha256(shard_path),
    )
    write_json_atomic(done_path(shard_path), stats)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to a temporary name, fsync, rename (creating the folder).

    Raises:
        ShardWriteError: naming ``path`` and the OS error (the temporary file is removed).
    """
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, error) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_error(path: Path, error: OSError) -> ShardWriteError:
    if isinstance(error, ShardWriteError):
        return error
    reason = os.strerror(error.errno) if error.errno else str(error)
    return ShardWriteError(error.errno, f"{path}: could not be written ({reason}); not marked done, a rerun redoes it")


def read_done(shard_path: Path) -> dict[str, Any] | None:
    path = done_path(shard_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(shard_path: Path, expected_ids: list[str], expected_run_key: str | None = None) -> bool:
    """True when the shard is complete and covers exactly ``expected_ids``.

    Beyond the done file, the Parquet footer must read back with the done file's row count, the shard schema version
    this code writes (when the file carries one) and, if given, ``expected_run_key``. Only the footer is read, so a
    shard damaged or replaced after it was marked done is redone instead of being skipped forever. The file's bytes must
    match the done file's ``content_sha256`` (a done file without one, from an older writer, does not count as done).
    """
    done = read_done(shard_path)
    if not done or not shard_path.is_file() or done.get("ids_digest") != ids_digest(expected_ids):
        return False
    if checksum_problem(shard_path, done) is not None:
        return False
    try:
        footer = pq.read_metadata(shard_path)
    except (pa.ArrowInvalid, OSError):
        return False
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (footer.metadata or {}).items()}
    if footer.num_rows != done.get("rows"):
        return False
    if meta.get("llavaseg.shard_schema_version", str(SHARD_SCHEMA_VERSION)) != str(SHARD_SCHEMA_VERSION):
        return False
    return expected_run_key is None or meta.get("llavaseg.run_key") == expected_run_key


def clean_stale_temp_files(folder: Path) -> list[Path]:
    """Remove temp files a killed writer left behind; they are never read as data."""
    removed = []
    if folder.is_dir():
        for path in folder.rglob(f"*{TMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    rows: int
    metadata: dict[str, str]


def checksum_problem(shard_path: Path, done: dict[str, Any]) -> str | None:
    """Why the shard's bytes do not match its done file's ``content_sha256`` (None when they do)."""
    expected = done.get("content_sha256")
    if not isinstance(expected, str):
        return "its done marker records no content checksum (written by an older version)"
    try:
        actual = file_sha256(shard_path)
    except OSError as error:
        return f"it cannot be read ({os.strerror(error.errno) if error.errno else error})"
    if actual != expected:
        return f"its content sha256 {actual[:16]}... differs from the {expected[:16]}... recorded when it was written"
    return None


def open_shard(shard_path: Path, expected_run_key: str | None = None) -> pq.ParquetFile:
    """Open a done shard after checking its checksum, that it is whole, of this schema version, and of the expected run."""
    done = read_done(shard_path)
    if done is None:
        raise ShardError(f"{shard_path}: no done marker; the shard is incomplete and is not read")
    problem = checksum_problem(shard_path, done)
    if problem is not None:
        raise ShardError(
            f"{shard_path}: refused, {problem}; the file was changed or corrupted after it was marked done. "
            "Rerun the command that wrote it (`llavaseg reason` for stage-1 shards) to redo it"
        )
    try:
        pf = pq.ParquetFile(shard_path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(f"{shard_path}: unreadable Parquet ({err})") from None
    raw_meta = pf.schema_arrow.metadata or {}
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw_meta.items()}
    version = meta.get("llavaseg.shard_schema_version")
    if version != str(SHARD_SCHEMA_VERSION):
        raise ShardError(f"{shard_path}: shard schema version {version!r}, this code reads {SHARD_SCHEMA_VERSION}")
    if expected_run_key is not None and meta.get("llavaseg.run_key") != expected_run_key:
        raise ShardError(
            f"{shard_path}: belongs to run {meta.get('llavaseg.run_key')!r}, expected {expected_run_key!r}"
        )
    return pf


def list_shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.parquet") if _SHARD_RE.match(p.name))


def read_shards(folder: Path, expected_run_key: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Concatenate every done shard of a manifest folder (validated). Missing done markers raise ShardError."""
    tables = []
    for path in list_shards(folder):
        pf = open_shard(path, expected_run_key)
        try:
            tables.append(pf.read(columns=columns))
        except (pa.ArrowInvalid, OSError) as err:
            raise ShardError(f"{path}: unreadable Parquet ({err})") from None
    if not tables:
        raise ShardError(f"{folder}: no shards")
    return pa.concat_tables(tables)
