"""The user's own images and queries -> a manifest without masks (split ``inference``), for ``llavaseg infer --input``.

Two inputs:

- a table, CSV (header row), JSONL (one object a line) or Parquet, with the columns ``image`` (a path under the root;
  relative, or absolute inside it) and ``query``, and optionally ``id`` and ``query_kind`` (``sentence`` | ``phrase``;
  guessed from the query when absent or empty);
- a folder of images plus one query for every image.

The sample id is the row's ``id`` when given, else ``h-`` + the first 16 hex digits of the SHA-256 of
``[image path, query]`` (JSON), so the same (image, query) keeps its id across rebuilds. Every row gets the mask
reference ``{"type": "none"}`` (``shared.masks.NO_GROUND_TRUTH``): an inference manifest cannot be evaluated by mistake.

A bad row (duplicate id, missing value, empty query, a path outside the root, a missing or unreadable image) is
rejected with a message naming the file and row; the other rows are built. ``RejectedRow`` keeps what is known of it, so
inference can report it as an error row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from manifests.common import ManifestBuilder, ManifestResult, SkipSample
from shared.masks import NO_GROUND_TRUTH
from shared.paths import PathEscapeError, relative_posix

logger = logging.getLogger(__name__)

INFERENCE_SPLIT = "inference"
FAMILY = "reasoning"  # the user's queries go through the MLLM's step 1, like ReasonSeg's
TABLE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
REQUIRED_COLUMNS = ("image", "query")
OPTIONAL_COLUMNS = ("id", "query_kind")
QUERY_KINDS = ("sentence", "phrase")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SENTENCE_MIN_WORDS = 6


class InputTableError(ValueError):
    """The input as a whole cannot be used (unknown format, unreadable file, a required column absent everywhere)."""


@dataclass(frozen=True)
class RejectedRow:
    """A row of the input that is not in the manifest, and why. ``row`` counts data rows from 1."""

    row: int
    sample_id: str
    image_path: str
    query: str
    reason: str  # the counted category, e.g. "empty query"
    message: str  # names the file and the row


@dataclass
class TableManifest:
    result: ManifestResult
    rejected: list[RejectedRow] = field(default_factory=list)

    def summary(self) -> str:
        return self.result.summary()


def dataset_name(source: Path) -> str:
    """A manifest dataset name from the input's file or folder name: ``My photos.csv`` -> ``my-photos``."""
    stem = source.name if source.is_dir() else source.stem
    return re.sub(r"[^A-Za-z0-9_]+", "-", stem).strip("-").lower() or "table"


def default_root(source: Path) -> Path:
    """A folder input is its own root; a table's image paths are relative to the table's folder."""
    return source if source.is_dir() else source.parent


def guess_query_kind(query: str) -> str:
    """"sentence" for a question or a long description (as ReasonSeg's long queries), else "phrase"."""
    text = query.strip()
    return "sentence" if text.endswith(("?", ".")) or len(text.split()) >= SENTENCE_MIN_WORDS else "phrase"


def hashed_sample_id(image_path: str, query: str) -> str:
    digest = hashlib.sha256(json.dumps([image_path, query], ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"h-{digest[:16]}"


def read_table_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV, JSONL or Parquet file as dicts (a JSONL line that is not an object becomes ``{"_error": ...}``).

    Raises:
        InputTableError: an unknown suffix, an unreadable file, or ``image``/``query`` absent from every row.
    """
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputTableError(f"{path}: unknown table format {path.suffix!r}; use one of {sorted(TABLE_FORMATS)}")
    try:
        if kind == "csv":
            with path.open(newline="", encoding="utf-8-sig") as handle:
                rows = [dict(row) for row in csv.DictReader(handle)]
            header = set(rows[0]) if rows else _csv_header(path)
        elif kind == "jsonl":
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    value = {"_error": f"line {number} is not valid JSON: {error}"}
                rows.append(value if isinstance(value, dict) else {"_error": f"line {number} is not a JSON object"})
            header = {key for row in rows for key in row}
        else:
            table = pq.read_table(path)
            rows = table.to_pylist()
            header = set(table.column_names)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as error:
        raise InputTableError(f"{path}: cannot read the {kind} table: {error}") from error
    absent = [name for name in REQUIRED_COLUMNS if name not in header]
    if absent:
        raise InputTableError(f"{path}: missing column(s) {absent}; found {sorted(header)}; "
                              f"required {list(REQUIRED_COLUMNS)}, optional {list(OPTIONAL_COLUMNS)}")  # fmt: skip
    return rows


def _csv_header(path: Path) -> set[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return set(next(csv.reader(handle), []))


def folder_rows(folder: Path, query: str) -> list[dict[str, Any]]:
    """One row per image file under ``folder`` (recursively, sorted), each with ``query``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [{"image": str(p), "query": query} for p in files]


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (pandas-written Parquet)
        return None
    return str(value)


def _relative_image(root: Path, image: str) -> str:
    """The image path relative to the root; raises PathEscapeError when it is outside."""
    candidate = Path(image)
    if candidate.is_absolute():
        return relative_posix(root, candidate)
    relative = relative_posix(root, root / image)  # normalises "./a.jpg", refuses "../a.jpg"
    return relative


def build_table_manifest(
    source: Path, root: Path, out_path: Path, query: str | None = None, name: str | None = None
) -> TableManifest:
    """Build and write the inference manifest of ``source`` (a table file, or a folder of images with ``query``).

    Raises:
        InputTableError: the input cannot be used at all, or a folder without ``query``.
        FileNotFoundError: ``source`` or ``root`` does not exist.
    """
    source, root = Path(source), Path(root)
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"root {root} is not a folder")
    if source.is_dir():
        if query is None or not query.strip():
            raise InputTableError(f"{source} is a folder of images: give the query for them with --query")
        rows = folder_rows(source, query)
    else:
        if query is not None:
            raise InputTableError(f"--query goes with a folder of images; {source} is a table with a query column")
        rows = read_table_rows(source)
    builder = ManifestBuilder(name or dataset_name(source), INFERENCE_SPLIT, root)
    rejected: list[RejectedRow] = []
    first_row: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        where = f"{source.name} row {number}"
        image, text = _text(row.get("image")), _text(row.get("query"))
        image = image.strip() if image and image.strip() else None  # an empty CSV cell is no image either
        given_id, kind = _text(row.get("id")), _text(row.get("query_kind"))
        sample_id = given_id.strip() if given_id and given_id.strip() else hashed_sample_id(image or "", text or "")

        def reject(reason: str, detail: str) -> None:
            if reason == "duplicate id":
                rejected_id = f"{sample_id}#row{number}"
            else:
                rejected_id = sample_id if sample_id not in first_row else f"{sample_id}#row{number}"
            at = f"{where} ({image})" if image else where
            message = f"{at}: {reason}: {detail}"
            rejected.append(RejectedRow(number, rejected_id, image or "", text or "", reason, message))
            builder.skip(reason, message)

        if "_error" in row:
            reject("unreadable row", row["_error"])
            continue
        missing = [column for column, value in (("image", image), ("query", text)) if value is None]
        if missing:
            reject("missing value", f"no {' and no '.join(missing)}")
            continue
        if not text.strip():
            reject("empty query", "the query is empty")
            continue
        if kind is not None and kind.strip() and kind.strip() not in QUERY_KINDS:
            reject("bad query_kind", f"query_kind {kind!r} is not one of {QUERY_KINDS}")
            continue
        if sample_id in first_row:
            reject("duplicate id", f"sample id {sample_id!r} already used by row {first_row[sample_id]}")
            continue
        try:
            relative = _relative_image(root, image)
            height, width = builder.image_size(relative, where)
        except PathEscapeError as error:
            reject("path outside the root", str(error))
            continue
        except SkipSample as skip:
            reject(skip.reason, skip.detail.removeprefix(f"{where}: "))
            continue
        first_row[sample_id] = number
        builder.add(
            image_id=relative, query_index=0, family=FAMILY, image_path=relative, query=text.strip(),
            query_kind=kind.strip() if kind and kind.strip() else guess_query_kind(text), mask=NO_GROUND_TRUTH,
            height=height, width=width, source=where, sample_id=sample_id,
        )  # fmt: skip
    if not len(builder):
        raise InputTableError(f"{source}: no usable rows ({len(rows)} read): "
                              + " | ".join(r.message for r in rejected[:5]))  # fmt: skip
    write_rejected(rejected_path(Path(out_path)), rejected)
    result = builder.write(Path(out_path))
    for row in rejected:
        logger.warning("rejected %s", row.message)
    return TableManifest(result, rejected)


def write_rejected(path: Path, rejected: list[RejectedRow]) -> Path:
    """The rejected rows as JSON beside the manifest (read back by ``read_rejected``), written atomically."""
    from shared.shards import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, [r.__dict__ for r in rejected])
    return path


def rejected_path(manifest_path: Path) -> Path:
    return Path(manifest_path).with_name(Path(manifest_path).stem + ".rejected.json")


def read_rejected(manifest_path: Path) -> list[RejectedRow]:
    path = rejected_path(manifest_path)
    if not path.is_file():
        return []
    return [RejectedRow(**row) for row in json.loads(path.read_text(encoding="utf-8"))]
