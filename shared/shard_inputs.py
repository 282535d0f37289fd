"""What a stage-1 shard was made from: a digest of each of its manifest rows and of that row's image file.

A shard's done marker records ``row_input_digests`` (one 16-hex digest per row, in sample_id order, the order of the
shard's rows) and ``input_digest`` (sha256 over those). A row's digest covers ``sample_id``, ``query``, ``query_kind``,
``image_path`` and the image file's size and ``mtime_ns`` (after following symlinks; "missing" when it cannot be
stat'ed). So an edited query (manifest rebuilt from an edited dataset file), an image replaced under the same name, or
a manifest built from another data root no longer match the marker, though the sample ids still do.

Size + mtime and not the image's bytes: a stat costs microseconds per file where hashing costs reading every image,
which at dataset scale (hundreds of thousands of images, on network storage) is a second pass over the whole data set
at every run. Writing a file or copying it without keeping times changes its mtime; what escapes is a rewrite that
keeps both size and mtime (``touch -r`` after an edit), which is deliberate.

Stage 1 redoes a done shard whose ``input_digest`` differs, and one whose marker has none (written before markers
recorded it: its rows cannot be shown to be current). Stage 2 refuses a shard whose recorded row digests differ from
the manifest's rows; a shard recording none is read with a warning (``llavaseg reason`` then records them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from shared.paths import PathEscapeError, resolve_inside

INPUT_FIELDS = ("sample_id", "query", "query_kind", "image_path")


def _image_stat(data_root: Path, image_path: str) -> list[Any]:
    try:
        stat = os.stat(resolve_inside(data_root, image_path))
    except (PathEscapeError, OSError):
        return ["missing"]
    return [stat.st_size, stat.st_mtime_ns]


def row_input_digest(row: Mapping[str, Any], data_root: Path) -> str:
    """16-hex digest of one manifest row's inputs (``INPUT_FIELDS``) and its image file's size and mtime_ns."""
    values = [row.get(name) for name in INPUT_FIELDS] + _image_stat(Path(data_root), str(row.get("image_path") or ""))
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).hexdigest()[:16]


def row_input_digests(rows: Iterable[Mapping[str, Any]], data_root: Path) -> dict[str, str]:
    """``{sample_id: row digest}`` of manifest rows (dicts, or a pyarrow Table's ``to_pylist()``)."""
    if hasattr(rows, "to_pylist"):
        rows = rows.select([c for c in INPUT_FIELDS if c in rows.column_names]).to_pylist()
    return {row["sample_id"]: row_input_digest(row, data_root) for row in rows}


def shard_input_stats(rows: Iterable[Mapping[str, Any]], data_root: Path) -> dict[str, Any]:
    """The done-marker fields of a shard's rows: ``row_input_digests`` (sample_id order) and their ``input_digest``."""
    by_id = row_input_digests(rows, data_root)
    ordered = [by_id[sample_id] for sample_id in sorted(by_id)]
    return {"input_digest": hashlib.sha256("\n".join(ordered).encode()).hexdigest(), "row_input_digests": ordered}


def stage1_input_problem(done: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """Why a done shard's marker does not match ``expected`` (``shard_input_stats`` of the manifest's rows now)."""
    recorded = done.get("input_digest")
    if not isinstance(recorded, str):
        return "its done marker records no input digest (written by an older version)"
    if recorded != expected["input_digest"]:
        changed = sum(a != b for a, b in zip(done.get("row_input_digests") or [], expected["row_input_digests"]))
        return f"{changed or 'some'} of its manifest rows changed (query, image path or image file) since it was written"
    return None


def stage2_input_problem(
    done: Mapping[str, Any], shard_ids: list[str], manifest_rows: Mapping[str, Mapping[str, Any]], data_root: Path
) -> str | None:
    """Why a done shard's rows no longer match the manifest rows they were made from (None when they do, when the
    marker records no row digests, or for shard rows the manifest does not hold: those are skipped as before).

    ``shard_ids``: the shard's sample ids; ``manifest_rows``: ``{sample_id: row}`` of the manifest.
    """
    recorded = done.get("row_input_digests")
    if not isinstance(recorded, list) or len(recorded) != len(shard_ids):
        return None
    changed = []
    for sample_id, digest in zip(sorted(shard_ids), recorded):
        row = manifest_rows.get(sample_id)
        if row is not None and row_input_digest(row, data_root) != digest:
            changed.append(sample_id)
    if not changed:
        return None
    return (f"{len(changed)} of its rows (e.g. {changed[0]!r}) have another query, image path or image file in the "
            "manifest than when stage 1 answered them")  # fmt: skip
