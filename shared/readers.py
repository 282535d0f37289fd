"""Helpers for reading stage-1 shards with the usual tools: pandas, Hugging Face ``datasets``, Ray Data, torch.

The ``embedding`` column is ragged: one float16 [n_tokens, dim] matrix per row. pyarrow hands it out zero-copy
(``shared.shards.embedding_from_arrow``); pandas and Ray Data hand it out as object arrays of per-token vectors, which
``torch.utils.data.default_collate`` and Ray's ``iter_torch_batches`` cannot stack. ``pad_embeddings`` turns any of
these forms into one padded BxTxD array plus a BxT mask, and ``collate_embeddings`` does that for a whole Ray/numpy
batch (pass it as ``collate_fn``). README.md ("Reading the outputs") shows each reader; a test runs those snippets.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np


def _as_matrix(cell: Any, dim: int | None) -> np.ndarray:
    """One row's embedding in any reader's form -> float16 [n_tokens, dim]."""
    if cell is None:
        return np.zeros((0, dim or 0), np.float16)
    if isinstance(cell, np.ndarray) and cell.dtype != object:
        matrix = cell.reshape(-1, cell.shape[-1]) if cell.ndim else cell.reshape(0, dim or 0)
        return matrix.astype(np.float16, copy=False)
    rows = list(cell)
    if not rows:
        return np.zeros((0, dim or 0), np.float16)
    return np.stack([np.asarray(row, dtype=np.float16) for row in rows])


def pad_embeddings(cells: Iterable[Any], max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ragged embeddings (pyarrow/pandas/Ray/HF cells) -> (float16 BxTxD, bool BxT mask of real tokens).

    T is the longest row (or ``max_tokens``, keeping each row's first tokens). Rows without tokens (stage-1 error rows)
    are all padding. Raises ValueError when rows disagree on the embedding dim.
    """
    matrices = [_as_matrix(cell, None) for cell in cells]
    dims = {m.shape[1] for m in matrices if m.shape[0]}
    if len(dims) > 1:
        raise ValueError(f"rows disagree on the embedding dim: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    longest = max((m.shape[0] for m in matrices), default=0)
    tokens = min(longest, max_tokens) if max_tokens is not None else longest
    padded = np.zeros((len(matrices), tokens, dim), np.float16)
    mask = np.zeros((len(matrices), tokens), bool)
    for row, matrix in enumerate(matrices):
        n = min(matrix.shape[0], tokens)
        if n:
            padded[row, :n] = matrix[:n]
            mask[row, :n] = True
    return padded, mask


def collate_embeddings(batch: dict[str, np.ndarray], max_tokens: int | None = None) -> dict[str, Any]:
    """A Ray Data / numpy batch -> torch tensors: ``embedding`` padded (float16 BxTxD) plus ``embedding_mask`` (BxT).

    Numeric columns become tensors, other columns stay as they are. Use as
    ``dataset.iter_torch_batches(collate_fn=collate_embeddings)``.
    """
    import torch

    out: dict[str, Any] = {}
    for name, values in batch.items():
        if name == "embedding":
            padded, mask = pad_embeddings(values, max_tokens)
            out["embedding"], out["embedding_mask"] = torch.from_numpy(padded), torch.from_numpy(mask)
        elif isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
            out[name] = torch.from_numpy(values)
        else:
            out[name] = values
    return out
