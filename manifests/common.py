"""Manifest builder shared by every dataset adapter: validated rows, counted skips, one atomic Parquet write.

An adapter walks its dataset on disk and, per sample, either calls ``ManifestBuilder.add`` or ``ManifestBuilder.skip``
with a short reason ("image missing", "unreadable json", ...). ``write`` sorts rows by ``sample_id`` and writes the
Parquet file under a temporary name, then renames it, so a reader never sees half a manifest.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.images import IMAGE_SUFFIXES, ImageFormatError, ImageLoadError, read_image_size
from shared.paths import PathEscapeError, resolve_inside
from shared.schema import FAMILIES, MANIFEST_SCHEMA, QUERY_KINDS, make_sample_id

logger = logging.getLogger(__name__)

MAX_SKIP_EXAMPLES = 3
# What a manifest was built from, in its Parquet metadata: a manifest of another builder version, dataset, split or
# data root is rebuilt by ``llavaseg prepare`` instead of reused (``manifests.registry.reuse_problem``).
# 2: records the data root; images found whatever the case of their extension and admitted by their decoded format.
BUILDER_VERSION = "2"


class ManifestRowError(ValueError):
    """A row that violates the manifest schema (an adapter bug, or data the adapter failed to screen)."""


class DuplicateSampleIdError(ValueError):
    """Two samples produced the same ``sample_id``."""


class SkipSample(Exception):
    """Raised inside an adapter to skip samples: ``reason`` is the counted category, ``detail`` says where,
    ``count`` how many samples are lost (e.g. every query of an image whose file is missing)."""

    def __init__(self, reason: str, detail: str = "", count: int = 1):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.count = count

    def times(self, count: int) -> "SkipSample":
        """The same skip, counting ``count`` samples."""
        return SkipSample(self.reason, self.detail, count)


@dataclass(frozen=True)
class ManifestResult:
    """What a manifest build produced: where, how many rows, and what was skipped and why."""

    dataset: str
    split: str
    path: Path
    rows: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "where: detail" strings

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. ``reasonseg/val: 200 rows, 3 skipped (image missing: 2, unreadable json: 1)``."""
        line = f"{self.dataset}/{self.split}: {self.rows} rows, {self.total_skipped} skipped"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items(), key=_by_count))
            line += f" ({reasons})"
        return line


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])


def dataset_file(data_root: Path, relative: str) -> Path:
    """A file an adapter reads (annotation JSON, refs pickle, label map) under ``data_root``, by the rule every path a
    manifest stores follows (``shared.paths.resolve_inside``): a name or a symlink leading outside the root is refused.

    Raises:
        PathEscapeError: naming the path and the root.
    """
    return resolve_inside(Path(data_root), relative)


def image_files_by_stem(folder: Path) -> dict[str, str]:
    """``{stem: file name}`` of the files in ``folder`` named like images (``IMAGE_SUFFIXES`` in any letter case, so
    ``a.JPG`` too); of several with one stem, ``.jpg`` first, then by name. Whether one really is an image of a format
    we read is decided from its bytes when it is opened (``shared.images``)."""
    found: dict[str, list[str]] = {}
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            found.setdefault(path.stem, []).append(path.name)
    return {stem: min(names, key=lambda name: (not name.endswith(".jpg"), name)) for stem, names in found.items()}


class ManifestBuilder:
    """Accumulates the rows of one ``<dataset>/<split>`` manifest and the samples skipped on the way."""

    def __init__(self, dataset: str, split: str, data_root: Path, max_examples: int = MAX_SKIP_EXAMPLES):
        self.dataset = dataset
        self.split = split
        self.data_root = Path(data_root)
        self.max_examples = max_examples
        self._rows: dict[str, dict] = {}
        self._sources: dict[str, str] = {}
        self._skipped: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def add(
        self,
        *,
        image_id: str,
        query_index: int,
        family: str,
        image_path: str,
        query: str,
        query_kind: str,
        mask: str,
        height: int,
        width: int,
        source: str,
        reference_answer: str | None = None,
        sample_id: str | None = None,
    ) -> str:
        """Validate and add one row; returns its ``sample_id``.

        ``source`` says where the row came from (a file, and a key inside it) and appears in error messages.
        ``sample_id`` replaces the default ``make_sample_id(dataset, split, image_id, query_index)`` (user-given ids).

        Raises:
            ManifestRowError: a field breaks the schema (bad query_kind/family, empty query, non-positive size...).
            DuplicateSampleIdError: naming the id and both sources.
        """
        if sample_id is None:
            sample_id = make_sample_id(self.dataset, self.split, str(image_id), query_index)
        problems = []
        if not isinstance(sample_id, str) or not sample_id.strip():
            problems.append(f"sample_id must be a non-empty string, got {sample_id!r}")
        if query_kind not in QUERY_KINDS:
            problems.append(f"query_kind {query_kind!r} not in {QUERY_KINDS}")
        if family not in FAMILIES:
            problems.append(f"family {family!r} not in {FAMILIES}")
        if not isinstance(query, str) or not query.strip():
            problems.append(f"query must be a non-empty string, got {query!r}")
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value >= 2**31:
                problems.append(f"{name} must be a positive int32, got {value!r}")
        for name, value in (("image_id", image_id), ("image_path", image_path), ("mask", mask)):
            if not isinstance(value, str) or not value:
                problems.append(f"{name} must be a non-empty string, got {value!r}")
        if reference_answer is not None and not isinstance(reference_answer, str):
            problems.append(f"reference_answer must be a string or None, got {type(reference_answer).__name__}")
        if problems:
            raise ManifestRowError(f"{self.dataset}/{self.split} row {sample_id} ({source}): " + "; ".join(problems))
        if sample_id in self._rows:
            raise DuplicateSampleIdError(
                f"{self.dataset}/{self.split}: duplicate sample_id {sample_id!r} from {source} "
                f"(first from {self._sources[sample_id]})"
            )
        self._rows[sample_id] = {
            "sample_id": sample_id,
            "dataset": self.dataset,
            "family": family,
            "split": self.split,
            "image_path": image_path,
            "image_id": str(image_id),
            "query": query,
            "query_kind": query_kind,
            "mask": mask,
            "height": height,
            "width": width,
            "reference_answer": reference_answer,
        }
        self._sources[sample_id] = source
        return sample_id

    def add_unless_duplicate(self, **row: Any) -> str | None:
        """``add`` one row, but count a repeated ``sample_id`` as skipped ("duplicate sample_id", naming both sources)
        instead of raising: the first row is kept and one bad record does not stop the whole manifest.

        Raises:
            ManifestRowError: as ``add``.
        """
        try:
            return self.add(**row)
        except DuplicateSampleIdError as error:
            self.skip("duplicate sample_id", str(error))
            return None

    def skip(self, reason: str, where: str, count: int = 1) -> None:
        """Count ``count`` skipped samples under ``reason``; keep the first few ``where`` strings as examples."""
        self._skipped[reason] += count
        examples = self._examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(where)
        logger.debug("%s/%s skipped (%s): %s", self.dataset, self.split, reason, where)

    def image_size(self, image_path: str, where: str) -> tuple[int, int]:
        """(height, width) of the image at ``image_path`` (relative to the data root).

        Raises:
            SkipSample: "path escapes data_root", "image missing", "image format not read" (by the file's content,
                e.g. a TIFF named ``.jpg``) or "image unreadable", with ``where`` in the detail.
        """
        try:
            absolute = resolve_inside(self.data_root, image_path)
        except PathEscapeError as error:
            raise SkipSample("path escapes data_root", f"{where}: {error}") from error
        if not absolute.is_file():
            raise SkipSample("image missing", f"{where}: {image_path} not found under {self.data_root}")
        try:
            return read_image_size(absolute)
        except ImageFormatError as error:
            raise SkipSample("image format not read", f"{where}: {error}") from error
        except ImageLoadError as error:
            raise SkipSample("image unreadable", f"{where}: {error}") from error

    def result(self, path: Path) -> ManifestResult:
        """Counts so far, as the result of a manifest at ``path``."""
        return ManifestResult(
            dataset=self.dataset,
            split=self.split,
            path=Path(path),
            rows=len(self._rows),
            skipped=dict(self._skipped),
            examples={reason: list(found) for reason, found in self._examples.items()},
        )

    def table(self) -> pa.Table:
        """The rows as a table with ``MANIFEST_SCHEMA`` (plus build metadata), sorted by ``sample_id``."""
        rows = [self._rows[sample_id] for sample_id in sorted(self._rows)]
        metadata = dict(MANIFEST_SCHEMA.metadata or {})
        metadata.update(
            {
                b"llavaseg.dataset": self.dataset.encode(),
                b"llavaseg.split": self.split.encode(),
                b"llavaseg.skipped": json.dumps(dict(sorted(self._skipped.items()))).encode(),
                b"llavaseg.data_root": str(self.data_root.resolve()).encode(),
                b"llavaseg.builder_version": BUILDER_VERSION.encode(),
            }
        )
        schema = MANIFEST_SCHEMA.with_metadata(metadata)
        return pa.Table.from_pylist(rows, schema=schema)

    def write(self, out_path: Path) -> ManifestResult:
        """Write the manifest atomically (temporary name, then ``os.replace``) and return the result."""
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
        try:
            pq.write_table(self.table(), tmp_path)
            os.replace(tmp_path, out_path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()
        result = self.result(out_path)
        for reason, examples in result.examples.items():
            logger.warning(
                "%s/%s: %d skipped (%s), e.g. %s",
                self.dataset,
                self.split,
                result.skipped[reason],
                reason,
                " | ".join(examples),
            )
        return result
