"""Stage-1 shard bytes per sample for the `hidden` and `input` embedding modes, and a storage estimate at 13B scale.

Runs stage 1 on the configured manifests twice (embed_mode hidden, then input) into a scratch work dir and measures the
Parquet bytes per row. The 13B estimate scales the measured embedding payload to LLaVA-1.5-13B's 5120-dim hidden states
with the measured zstd ratio of float16 hidden states and the measured mean embedded tokens per sample.

    .venv/bin/python bench/shard_bytes.py --config pipeline.toml
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq

# Public sizes of the referring datasets (expressions), the bulk of the paper's non-semantic training mix.
REFER_EXPRESSIONS = {"refcoco": 142_210, "refcoco+": 141_564, "refcocog (umd)": 104_560, "refclef": 130_525}


def measure(config, manifests) -> dict:
    from stage1_reason.run import run_stage1

    summary = run_stage1(config, manifests)
    files = sorted(summary.run_dir.rglob("[0-9]*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    total = sum(f.stat().st_size for f in files)
    embedding_bytes = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        for group in range(meta.num_row_groups):
            for col in range(meta.num_columns):
                column = meta.row_group(group).column(col)
                if column.path_in_schema.startswith("embedding"):
                    embedding_bytes += column.total_compressed_size
    tokens = sum(json.loads(p.read_text())["embedded_tokens"] for p in summary.run_dir.rglob("*.done.json"))
    return {
        "rows": rows, "bytes": total, "bytes_per_sample": total / rows, "embedding_bytes_per_sample": embedding_bytes / rows,
        "tokens_per_sample": tokens / rows, "run_dir": str(summary.run_dir),
    }


def main() -> None:
    from llavaseg.pipeline import prepare
    from shared.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pipeline.toml")
    parser.add_argument("--work-dir", default="work/bench-shard-bytes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {}
    for mode in ("hidden", "input"):
        config = load_config(args.config, overrides=[*args.overrides, f"paths.work_dir={json.dumps(args.work_dir)}",
                                                      f"stage1.embed_mode={json.dumps(mode)}"])
        manifests = [(m.spec, m.path) for m in prepare(config)]
        results[mode] = measure(config, manifests)
        first = next(Path(results[mode]["run_dir"]).rglob("[0-9]*.parquet"))
        dim = int(pq.read_schema(first).metadata[b"llavaseg.embedding_dim"])
        results[mode]["dim"] = dim
    hidden, token_only = results["hidden"], results["input"]
    raw_fp16 = hidden["tokens_per_sample"] * hidden["dim"] * 2
    ratio = hidden["embedding_bytes_per_sample"] / raw_fp16
    per_sample_13b = hidden["tokens_per_sample"] * 5120 * 2 * ratio + token_only["bytes_per_sample"]
    results["estimate_13b"] = {
        "zstd_ratio_fp16_hidden": ratio,
        "tokens_per_sample": hidden["tokens_per_sample"],
        "hidden_bytes_per_sample": per_sample_13b,
        "input_bytes_per_sample": token_only["bytes_per_sample"],
        "refer_datasets_GB_hidden": {k: v * per_sample_13b / 1e9 for k, v in REFER_EXPRESSIONS.items()},
        "refer_datasets_MB_input": {k: v * token_only["bytes_per_sample"] / 1e6 for k, v in REFER_EXPRESSIONS.items()},
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
