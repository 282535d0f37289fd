"""Stage-2 data: manifests joined with stage-1 shards, examples for SAM, the training mix by family, batching.

``Stage2Source`` and ``build_index`` (each manifest joined with its done stage-1 shards on ``sample_id``) live in
``stage2_segment.join`` and are re-exported here.
``Stage2Dataset`` turns an index row into an example: the image (``load_rgb`` + ``preprocess_image``), the ground-truth
mask (``rasterize`` + ``preprocess_mask``), and the text embedding as stored, float16 NxD (or, in ``input`` mode, the
rows of ``input_embeddings.safetensors`` selected by the token ids). Embeddings are read from an uncompressed Arrow copy
of each shard that is memory-mapped (``ShardStore``), so a worker touches only the rows it uses.
``MixtureSampler`` draws training examples by family (LISA: semantic 9 : referring 3 : reasoning 1), deterministically
from (seed, rank, step); ``collate`` pads the text to the batch's longest row and returns the mask (True = real token).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch

from shared.images import ImageLoadError, load_rgb
from shared.masks import MaskError, rasterize
from shared.paths import PathEscapeError, resolve_inside
from shared.shards import ShardError, done_path, embedding_from_arrow
from stage2_segment.join import (  # noqa: F401  (the join's names, re-exported: part of this module's API)
    EMBED_MODES,
    INPUT_EMBEDDINGS_FILE,
    INPUT_EMBEDDINGS_TENSOR,
    MANIFEST_COLUMNS,
    SHARD_INDEX_COLUMNS,
    JoinReport,
    ShardRef,
    Stage2Index,
    Stage2Source,
    build_index,
    join_source,
)
from stage2_segment.preprocess import preprocess_image, preprocess_mask

logger = logging.getLogger(__name__)

ARROW_ONLY_COLUMNS = ("mask", "query", "reason_answer", "target", "attributes", "seg_text", "error")


class ExampleError(ValueError):
    """One sample that cannot be turned into an example (image or mask unusable); the message names it."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class ShardStore:
    """Per-process access to the stage-1 embeddings of done shards.

    With a ``cache_dir``, each shard's ``token_ids`` and ``embedding`` columns are written once as an uncompressed Arrow
    IPC file (under the run key and the shard folder's name + a hash of its path, named by a fingerprint of the shard's
    done file, size and mtime, so a rewritten shard gets a new copy) and
    memory-mapped: reading a row is zero-copy and the OS pages in only what is touched. Without one, the columns are
    read into memory. At most ``max_open`` shards are kept open.
    """

    def __init__(self, cache_dir: Path | None = None, max_open: int = 256) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_open = max_open
        self._columns: collections.OrderedDict[str, tuple[pa.ListArray, pa.ListArray]] = collections.OrderedDict()
        self._input_tables: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:  # opened maps stay in their process
        return {"cache_dir": self.cache_dir, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cache_dir"], state["max_open"])

    def _cached_copy(self, ref: ShardRef) -> Path:
        shard = Path(ref.path)
        stat = shard.stat()
        done_text = done_path(shard).read_bytes()
        fingerprint = hashlib.sha256(done_text + f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        where = hashlib.sha256(str(shard.parent.resolve()).encode()).hexdigest()[:8]
        folder = self.cache_dir / ref.run_key / f"{shard.parent.name}-{where}"
        target = folder / f"{shard.stem}-{fingerprint}.arrow"
        if target.is_file():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        table = pq.read_table(shard, columns=["token_ids", "embedding"]).combine_chunks()
        temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with ipc.new_file(temporary, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))
        os.replace(temporary, target)
        for stale in folder.glob(f"{shard.stem}-*.arrow"):
            if stale != target:
                stale.unlink(missing_ok=True)
        return target

    def warm(self, refs: Sequence[ShardRef], threads: int | None = None, part: tuple[int, int] = (0, 1)) -> int:
        """Build the cached copies of ``refs`` (every ``part[1]``-th from ``part[0]``, so
        that the workers of one node split them) with ``threads`` threads (default: the CPU count, at most 8), before
        the first epoch asks for them one at a time. Parquet decoding releases the GIL, so copies build in parallel.
        Returns the number of shards visited; without a ``cache_dir`` it does nothing."""
        if self.cache_dir is None:
            return 0
        todo = list(refs)[part[0] :: part[1]]
        threads = threads or min(8, os.cpu_count() or 1)
        if threads <= 1 or len(todo) <= 1:
            for ref in todo:
                self._cached_copy(ref)
        else:
            with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="shard-cache") as pool:
                list(pool.map(self._cached_copy, todo))
        return len(todo)

    def _open(self, ref: ShardRef) -> tuple[pa.ListArray, pa.ListArray]:
        if ref.path in self._columns:
            self._columns.move_to_end(ref.path)
            return self._columns[ref.path]
        if self.cache_dir is not None:
            table = ipc.open_file(pa.memory_map(str(self._cached_copy(ref)))).read_all()
        else:
            table = pq.read_table(ref.path, columns=["token_ids", "embedding"]).combine_chunks()
        columns = tuple(
            table[name].chunk(0) if table[name].num_chunks == 1 else table[name].combine_chunks()
            for name in ("token_ids", "embedding")
        )
        self._columns[ref.path] = columns
        if len(self._columns) > self.max_open:
            self._columns.popitem(last=False)
        return columns

    def _input_table(self, path: str) -> np.ndarray:
        if path not in self._input_tables:
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as handle:
                self._input_tables[path] = handle.get_tensor(INPUT_EMBEDDINGS_TENSOR).astype(np.float16, copy=False)
        return self._input_tables[path]

    def text_embedding(self, ref: ShardRef, row: int) -> np.ndarray:
        """NxD float16 embedding of one shard row (a zero-copy view in ``hidden`` mode)."""
        token_ids, embedding = self._open(ref)
        if ref.embed_mode == "hidden":
            return embedding_from_arrow(embedding, row)
        table = self._input_table(ref.input_table)
        ids = token_ids[row].values.to_numpy(zero_copy_only=False).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
            raise ShardError(f"{ref.path} row {row}: token id outside the input embedding table [0, {table.shape[0]})")
        return table[ids]


class Stage2Dataset(torch.utils.data.Dataset):
    """Examples of a ``Stage2Index``: SAM inputs, labels and text embeddings.

    Decoded, preprocessed images are kept in a small LRU cache keyed by image path, and ``load_batch`` loads each
    distinct image of a batch once, so several queries of one image share one decode (``image_loads`` counts decodes).
    """

    def __init__(
        self, index: Stage2Index, data_root: Path, image_size: int, store: ShardStore | None = None,
        image_cache_size: int = 16,
    ) -> None:  # fmt: skip
        self.index = index
        self.data_root = Path(data_root)
        self.image_size = image_size
        self.store = store or ShardStore()
        self.image_cache_size = image_cache_size
        # Short columns as Python lists for fast per-item access; long text (mask JSON, answers) stays in Arrow.
        self.rows = {
            name: index.table[name].to_pylist() for name in index.table.column_names if name not in ARROW_ONLY_COLUMNS
        }
        self.image_loads = 0
        self._image_cache: collections.OrderedDict[str, Any] = collections.OrderedDict()  # path -> image()

    def __len__(self) -> int:
        return len(self.index)

    def where(self, i: int) -> str:
        return f"{self.rows['sample_id'][i]} ({self.rows['image_path'][i]})"

    def value(self, name: str, i: int) -> Any:
        """Column ``name`` of row ``i``."""
        return self.rows[name][i] if name in self.rows else self.index.table[name][i].as_py()

    def info(self, i: int) -> dict[str, Any]:
        """Every column of row ``i`` (sample_id, dataset, query, target, attributes, ...)."""
        return {name: self.value(name, i) for name in self.index.table.column_names}

    def original_image(self, i: int) -> np.ndarray:
        """HxWx3 uint8 at the original size; raises ExampleError naming the sample."""
        try:
            image = load_rgb(resolve_inside(self.data_root, self.rows["image_path"][i]))
        except (ImageLoadError, PathEscapeError) as error:
            raise ExampleError(i, f"{self.where(i)}: {error}") from error
        expected = (self.rows["height"][i], self.rows["width"][i])
        if image.shape[:2] != expected:
            raise ExampleError(i, f"{self.where(i)}: image is {image.shape[0]}x{image.shape[1]}, manifest says "
                               f"{expected[0]}x{expected[1]} (HxW)")  # fmt: skip
        self.image_loads += 1
        return image

    def image(self, i: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """(3xSxS normalised, padded image; resized (h, w)), through the LRU cache."""
        key = self.rows["image_path"][i]
        if key in self._image_cache:
            self._image_cache.move_to_end(key)
            return self._image_cache[key]
        loaded = preprocess_image(self.original_image(i), self.image_size)
        if self.image_cache_size > 0:
            self._image_cache[key] = loaded
            if len(self._image_cache) > self.image_cache_size:
                self._image_cache.popitem(last=False)
        return loaded

    def gt_mask(self, i: int) -> np.ndarray:
        """HxW uint8 ground truth at the original size (1 target, 0 background, 255 ignore)."""
        try:
            return rasterize(self.value("mask", i), self.rows["height"][i], self.rows["width"][i], self.data_root)
        except MaskError as error:
            raise ExampleError(i, f"{self.where(i)}: mask: {error}") from error

    def text_embedding(self, i: int) -> np.ndarray:
        """NxD float16 text embedding."""
        return self.store.text_embedding(self.index.shards[self.rows["shard"][i]], self.rows["shard_row"][i])

    def example(
        self, i: int, with_target: bool = True, image: tuple[torch.Tensor, tuple[int, int]] | None = None
    ) -> dict[str, Any]:
        """One example: ``image`` 3xSxS, ``input_size`` (h, w), ``original_size`` (H, W), ``text_embedding`` NxD
        float16, ``target`` SxS uint8 (with_target), plus ``index`` and ``sample_id``."""
        pixels, input_size = image if image is not None else self.image(i)
        example = {
            "index": i,
            "sample_id": self.rows["sample_id"][i],
            "image": pixels,
            "input_size": input_size,
            "original_size": (self.rows["height"][i], self.rows["width"][i]),
            "text_embedding": torch.from_numpy(np.array(self.text_embedding(i), dtype=np.float16, copy=True)),
        }
        if with_target:
            example["target"] = preprocess_mask(self.gt_mask(i), self.image_size)
        return example

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.example(i)

    def load_batch(self, indices: Sequence[int], with_target: bool = True) -> dict[str, Any]:
        """Collated batch of ``indices``; each distinct image is decoded at most once."""
        images: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
        examples = []
        for i in indices:
            path = self.rows["image_path"][i]
            if path not in images:
                images[path] = self.image(i)
            examples.append(self.example(i, with_target, images[path]))
        return collate(examples)


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Examples -> batch: ``images`` Bx3xSxS float32, ``text_embeds`` BxNxD float16 zero-padded to the longest row,
    ``text_mask`` BxN bool (True = real token), ``targets`` BxSxS uint8 (if the examples have them), and the lists
    ``indices``, ``sample_ids``, ``input_sizes``, ``original_sizes``."""
    if not examples:
        raise ValueError("collate: empty batch")
    dim = examples[0]["text_embedding"].shape[1]
    longest = max(example["text_embedding"].shape[0] for example in examples)
    text = torch.zeros(len(examples), longest, dim, dtype=torch.float16)
    text_mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    for row, example in enumerate(examples):
        length = example["text_embedding"].shape[0]
        text[row, :length] = example["text_embedding"]
        text_mask[row, :length] = True
    batch = {
        "images": torch.stack([example["image"] for example in examples]),
        "text_embeds": text,
        "text_mask": text_mask,
        "indices": [example["index"] for example in examples],
        "sample_ids": [example["sample_id"] for example in examples],
        "input_sizes": [example["input_size"] for example in examples],
        "original_sizes": [example["original_size"] for example in examples],
    }
    if "target" in examples[0]:
        batch["targets"] = torch.stack([example["target"] for example in examples])
    return batch


class MixtureSampler:
    """Draws training examples: a family by its rate, then one of that family's datasets uniformly, then one of that
    dataset's examples uniformly (LISA's scheme). Families absent from the data are dropped and the remaining rates
    renormalised. The draws of (step, rank) come from ``numpy.random.default_rng([seed, rank, step])``, so a run resumed
    at step s draws exactly what an uninterrupted run draws there; the sampler's position is the step.
    """

    def __init__(self, families: Sequence[str], datasets: Sequence[str], rates: Mapping[str, float], seed: int) -> None:
        groups: dict[str, dict[str, list[int]]] = {}
        for i, (family, dataset) in enumerate(zip(families, datasets, strict=True)):
            groups.setdefault(family, {}).setdefault(dataset, []).append(i)
        missing = sorted(family for family in groups if family not in rates)
        if missing:
            raise ValueError(f"data.sample_rates has no rate for famil{'ies' if len(missing) > 1 else 'y'} "
                             f"{', '.join(missing)} (present in the training sources)")  # fmt: skip
        present = {family: float(rates[family]) for family in sorted(groups) if float(rates[family]) > 0}
        if not present:
            raise ValueError(f"data.sample_rates gives no positive rate to any family present ({sorted(groups)})")
        total = sum(present.values())
        self.families = list(present)
        self.probabilities = np.array([present[family] / total for family in self.families])
        self.dataset_names = {family: sorted(groups[family]) for family in self.families}
        self.groups = {
            family: [np.array(groups[family][name]) for name in self.dataset_names[family]] for family in self.families
        }
        self.seed = seed

    @property
    def mix(self) -> dict[str, float]:
        """family -> probability."""
        return dict(zip(self.families, self.probabilities.tolist()))

    def describe(self) -> str:
        parts = []
        for family, probability in self.mix.items():
            sizes = zip(self.dataset_names[family], self.groups[family])
            parts.append(f"{family} {100 * probability:.1f}% ({', '.join(f'{d}: {len(ix)}' for d, ix in sizes)})")
        return "; ".join(parts)

    def draw(self, step: int, rank: int, count: int) -> np.ndarray:
        """``count`` example indices for (step, rank)."""
        rng = np.random.default_rng([self.seed, rank, step])
        family_draws = rng.choice(len(self.families), size=count, p=self.probabilities)
        out = np.empty(count, dtype=np.int64)
        for k, family_index in enumerate(family_draws):
            datasets = self.groups[self.families[family_index]]
            members = datasets[rng.integers(len(datasets))]
            out[k] = members[rng.integers(len(members))]
        return out
