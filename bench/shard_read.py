"""Stage-2 read rate of stage-1 shards: rows/s and MB/s of text embeddings through the readers stage 2 uses.

Builds (once, reused while the parameters match) a synthetic stage-1 run folder: a manifest of ``--rows`` rows
(``shared.schema.MANIFEST_SCHEMA``) and its stage-1 shards of ``--shard-size`` rows (``shared.shards.shard_schema``,
written by ``shared.shards.write_shard``, so each has its done marker with row digest and sha256), each row with
``--tokens`` x ``--dim`` float16 embeddings (the dtype the schema stores; random values, which zstd cannot shrink, as
with real hidden states). Then it times what stage 2 does with them:

    index         stage2_segment.data.build_index: every shard's checksum verified, the index columns read and joined
    first read    every row's embedding in index order via ShardStore.text_embedding + the copy Stage2Dataset.example
                  makes, with a fresh shard cache (each shard's Arrow copy written on first use, as a first epoch does)
    first read, warmed   the same, the cache first built by ``ShardStore.warm`` (``--warm-threads`` threads), as
                  training and evaluation do before their first epoch
    cached read   the same with the cache built (memory-mapped Arrow, the steady state of training and inference)
    random batch  Stage2Dataset.text_embedding for shuffled batches of ``--batch`` + padding to BxNxD (collate's work)

The page cache is not dropped (the files were just written): the figures are for data in RAM, the reader's own cost.

    .venv/bin/python bench/shard_read.py --out work/bench-shard-read [--embedding-dictionary]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPEC = "bench/val"
RUN_KEY = "bench-shard-read"


def build_run(
    out: Path, rows: int, shard_size: int, tokens: int, dim: int, dictionary: bool = False, seed: int = 0
) -> tuple[Path, Path]:
    """(manifest path, shard folder); rebuilt only when the parameters differ from those of the folder there.
    ``dictionary``: write the embedding column with a Parquet dictionary, as the shard writer did before Dec 2026."""
    from shared import shards
    from shared.schema import MANIFEST_SCHEMA

    params = {"schema": shards.SHARD_SCHEMA_VERSION, "rows": rows, "shard_size": shard_size, "tokens": tokens, "dim": dim, "seed": seed,
              "embedding_dictionary": dictionary, "version": 2}  # fmt: skip
    if dictionary:
        shards.NO_DICTIONARY_COLUMNS = ()  # the writer's old behaviour, for the before/after comparison
    manifest_path, shard_dir = out / "manifests" / "bench-val.parquet", out / "stage1" / RUN_KEY / "bench-val"
    marker = out / "params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return manifest_path, shard_dir
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    ids = [f"bench/val/img{i:06d}/0" for i in range(rows)]
    manifest_path.parent.mkdir(parents=True)
    manifest = {
        "sample_id": ids, "dataset": ["bench"] * rows, "family": ["referring"] * rows, "split": ["val"] * rows,
        "image_path": [f"images/img{i:06d}.jpg" for i in range(rows)], "image_id": [f"img{i:06d}" for i in range(rows)],
        "query": [f"the object number {i}" for i in range(rows)], "query_kind": ["phrase"] * rows,
        "mask": ['{"kind": "empty"}'] * rows, "height": [480] * rows, "width": [640] * rows,
        "reference_answer": [None] * rows,
    }  # fmt: skip
    pq.write_table(pa.table(manifest, schema=MANIFEST_SCHEMA), manifest_path)
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(2 * shard_size * tokens * dim).astype(np.float16)  # each shard: a slice at its own offset
    schema = shards.shard_schema(dim, {"llavaseg.run_key": RUN_KEY, "llavaseg.embed_mode": "hidden"})
    for index, start in enumerate(range(0, rows, shard_size)):
        shard_ids = ids[start : start + shard_size]
        n = len(shard_ids)
        offset = int(rng.integers(0, pool.size - n * tokens * dim + 1))
        values = pool[offset : offset + n * tokens * dim].reshape(n, tokens, dim)
        text = [f"the object number {start + k}, small and round" for k in range(n)]
        columns = {
            "sample_id": shard_ids, "dataset": ["bench"] * n, "split": ["val"] * n,
            "image_path": manifest["image_path"][start : start + n],
            "query": [f"the object number {start + k}" for k in range(n)], "reason_prompt": ["What is it?"] * n,
            "reason_answer": text, "seg_prompt": ["Name the target."] * n, "seg_answer": text, "target": text,
            "attributes": ["small and round"] * n, "parse_status": ["ok"] * n, "seg_text": text,
            "token_ids": [list(range(tokens))] * n, "seg_tokens": [tokens] * n, "generated_tokens": [40] * n,
            "reason_source": ["mllm"] * n, "status": ["ok"] * n, "error": [None] * n,
        }  # fmt: skip
        arrays = [shards.embeddings_to_arrow(list(values), dim) if f.name == "embedding"
                  else pa.array(columns[f.name], type=f.type) for f in schema]  # fmt: skip
        shards.write_shard(pa.Table.from_arrays(arrays, schema=schema), shard_dir / shards.shard_name(index),
                           {"manifest": SPEC, "shard": index, "errors": 0})  # fmt: skip
    marker.write_text(json.dumps(params))
    print(f"built {rows} rows in {len(range(0, rows, shard_size))} shards in {time.perf_counter() - started:.1f}s")
    return manifest_path, shard_dir


def timed(label: str, rows: int, row_bytes: int, work) -> dict:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    work()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    result = {"rows": rows, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
              "rows_per_s": round(rows / wall), "mb_per_s": round(rows * row_bytes / wall / 1e6, 1)}  # fmt: skip
    print(f"{label:14s} {result['rows_per_s']:>9,} rows/s {result['mb_per_s']:>8,.1f} MB/s  "
          f"({wall:.2f}s wall, {cpu:.2f}s CPU)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="work/bench-shard-read")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--embedding-dictionary", action="store_true",
                        help="write the embedding column with a Parquet dictionary (the shard writer before Dec 2026)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--warm-threads", type=int, default=2, help="threads of ShardStore.warm (default 2)")
    args = parser.parse_args()

    import torch

    from stage2_segment.data import ShardStore, Stage2Dataset, Stage2Source, build_index

    torch.set_num_threads(1)
    out = Path(args.out)
    manifest, shard_dir = build_run(out, args.rows, args.shard_size, args.tokens, args.dim, args.embedding_dictionary)
    row_bytes = args.tokens * args.dim * 2  # float16
    on_disk = sum(p.stat().st_size for p in shard_dir.glob("*.parquet"))
    print(f"{args.rows} rows, {len(list(shard_dir.glob('*.parquet')))} shards, {on_disk / 1e6:.0f} MB on disk, "
          f"{args.rows * row_bytes / 1e6:.0f} MB of float16 embeddings ({args.tokens}x{args.dim} a row)")
    results: dict = {"params": vars(args), "load": os.getloadavg(), "cpus": os.cpu_count(),
                     "python": platform.python_version(), "shard_bytes": on_disk}  # fmt: skip

    holder: dict = {}
    results["index"] = timed("index", args.rows, row_bytes,
                             lambda: holder.update(index=build_index([Stage2Source(SPEC, manifest, shard_dir, RUN_KEY)],
                                                                    keep_errors=True)))  # fmt: skip
    index = holder["index"]
    assert len(index) == args.rows, len(index)
    shard_col, row_col = index.table["shard"].to_pylist(), index.table["shard_row"].to_pylist()
    cache = out / "shard_cache"
    shutil.rmtree(cache, ignore_errors=True)

    def read_all(store: ShardStore) -> None:
        total = 0.0
        for shard, row in zip(shard_col, row_col):
            embedding = np.array(store.text_embedding(index.shards[shard], row), dtype=np.float16, copy=True)
            total += embedding.shape[0]
        assert total == args.rows * args.tokens

    results["first_read"] = timed("first read", args.rows, row_bytes, lambda: read_all(ShardStore(cache)))
    shutil.rmtree(cache, ignore_errors=True)

    def warmed_read() -> None:
        store = ShardStore(cache)
        store.warm(index.shards, args.warm_threads)
        read_all(store)

    results["first_read_warmed"] = timed(f"first read, cache warmed by {args.warm_threads} threads", args.rows,
                                         row_bytes, warmed_read)  # fmt: skip
    results["cached_read"] = timed("cached read", args.rows, row_bytes, lambda: read_all(ShardStore(cache)))

    dataset = Stage2Dataset(index, out, image_size=64, store=ShardStore(cache))
    order = np.random.default_rng(0).permutation(args.rows)

    def random_batches() -> None:
        for start in range(0, args.rows, args.batch):
            matrices = [dataset.text_embedding(int(i)) for i in order[start : start + args.batch]]
            longest = max(m.shape[0] for m in matrices)
            padded = np.zeros((len(matrices), longest, args.dim), np.float16)
            for k, matrix in enumerate(matrices):
                padded[k, : matrix.shape[0]] = matrix
            torch.from_numpy(padded)

    results["random_batch"] = timed("random batch", args.rows, row_bytes, random_batches)
    results["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"peak RSS {results['max_rss_mb']} MB; load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
