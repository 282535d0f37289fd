"""The dataset adapters by name, and the one entry point that builds and writes a manifest.

``ADAPTERS[name](data_root, split)`` returns a filled ``ManifestBuilder``; ``build_manifest`` checks the name and
split, runs the adapter and writes ``<out_path>`` atomically::

    result = build_manifest("reasonseg", Path("dataset"), "val", work / manifest_filename("reasonseg", "val"))
    print(result.summary())   # reasonseg/val: 200 rows, 0 skipped
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

from manifests import parts, reasonseg, refer, semantic
from manifests.common import BUILDER_VERSION, ManifestBuilder, ManifestResult

logger = logging.getLogger(__name__)

Adapter = Callable[[Path, str], ManifestBuilder]

ADAPTERS: dict[str, Adapter] = {
    "reasonseg": reasonseg.build_reasonseg,
    **{name: functools.partial(refer.build_refer, name) for name in refer.REFER_DATASETS},
    "ade20k": semantic.build_ade20k,
    "cocostuff": semantic.build_cocostuff,
    **{name: functools.partial(parts.build_parts, name) for name in parts.PART_DATASETS},
}

SPLITS: dict[str, tuple[str, ...]] = {
    "reasonseg": reasonseg.SPLITS,
    **{name: spec.splits for name, spec in refer.REFER_DATASETS.items()},
    "ade20k": semantic.SPLITS,
    "cocostuff": semantic.SPLITS,
    **{name: parts.SPLITS for name in parts.PART_DATASETS},
}


def check_dataset_split(dataset: str, split: str) -> None:
    """Raise ValueError listing the valid choices when ``dataset`` or its ``split`` is unknown."""
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(ADAPTERS)}")
    if split not in SPLITS[dataset]:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; valid: {', '.join(SPLITS[dataset])}")


def manifest_filename(dataset: str, split: str) -> str:
    """``"reasonseg", "val"`` -> ``"reasonseg-val.parquet"``."""
    check_dataset_split(dataset, split)
    return f"{dataset}-{split}.parquet"


def manifest_metadata(path: Path) -> dict[str, str]:
    """The ``llavaseg.*`` entries of a manifest's Parquet metadata (without the prefix); empty when unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return {}
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
    return {k.removeprefix("llavaseg."): v for k, v in meta.items() if k.startswith("llavaseg.")}


def reuse_problem(path: Path, dataset: str, split: str, data_root: Path) -> str | None:
    """Why the manifest at ``path`` cannot stand for ``dataset``/``split`` under ``data_root`` (None when it can):
    built from another data root, for another dataset or split, by another builder version, or unreadable."""
    meta = manifest_metadata(path)
    if not meta:
        return "it cannot be read"
    wanted = {"dataset": dataset, "split": split, "builder_version": BUILDER_VERSION,
              "data_root": str(Path(data_root).resolve())}  # fmt: skip
    for key, value in wanted.items():
        if meta.get(key) != value:
            return f"it was built with {key} {meta.get(key)!r}, the config asks for {value!r}"
    return None


def build_manifest(dataset: str, data_root: Path, split: str, out_path: Path) -> ManifestResult:
    """Build the manifest of ``dataset``/``split`` from ``data_root`` and write it to ``out_path``.

    Raises:
        ValueError: unknown dataset or split (listing the valid ones), or dataset-level files that cannot be used.
        FileNotFoundError: ``data_root`` or the dataset's folder/annotation files are missing.
    """
    check_dataset_split(dataset, split)
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"data_root is not a folder: {data_root}")
    builder = ADAPTERS[dataset](data_root, split)
    result = builder.write(Path(out_path))
    logger.info("%s -> %s", result.summary(), result.path)
    return result
