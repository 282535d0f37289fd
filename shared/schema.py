"""Arrow schemas both stages agree on.

The manifest is the unit of work: one row per (image, query) sample. Stage 1 writes one shard row per manifest row with the
same ``sample_id``; stage 2 joins the two on it. Neither stage imports the other: they meet here.
"""

from __future__ import annotations

import pyarrow as pa

MANIFEST_VERSION = 1

QUERY_KINDS = ("sentence", "phrase", "class")
FAMILIES = ("reasoning", "referring", "semantic")

MANIFEST_SCHEMA = pa.schema(
    [
        # "<dataset>/<split>/<image_id>/<query index>": stable across rebuilds of the same data.
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        # reasoning | referring | semantic: the unit of the training mix (LISA: semantic 9 : referring 3 : reasoning 1).
        pa.field("family", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        # Relative to [paths].data_root, POSIX separators, never escaping it.
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("query_kind", pa.string(), nullable=False),
        # JSON mask reference, rasterised by shared.masks.rasterize(); see that module for the kinds.
        pa.field("mask", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        # ReasonSeg explanatory answer (dialogue metrics); null elsewhere.
        pa.field("reference_answer", pa.string(), nullable=True),
    ],
    metadata={"llavaseg.manifest_version": str(MANIFEST_VERSION)},
)


def make_sample_id(dataset: str, split: str, image_id: str, query_index: int) -> str:
    """Deterministic sample id from dataset, split, image and query index."""
    return f"{dataset}/{split}/{image_id}/{query_index}"
