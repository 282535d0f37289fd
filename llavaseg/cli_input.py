"""The command-line side of the user's own images: ``llavaseg manifest table`` and ``llavaseg infer --input``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.config import PipelineConfig
from shared.console import echo
from shared.object_store import fetch_input


def manifest_table(args: argparse.Namespace, config: PipelineConfig) -> int:
    """``llavaseg manifest table``: the inference manifest of a table or image folder; rejected rows on stderr."""
    from manifests.table import INFERENCE_SPLIT, build_table_manifest, dataset_name, default_root

    if not args.input:
        raise ValueError("manifest table: --input FILE (CSV, JSONL, Parquet) or --input FOLDER --query Q is required")
    if args.split not in (None, INFERENCE_SPLIT):
        raise ValueError(f"manifest table: the split is always {INFERENCE_SPLIT!r}, got --split {args.split}")
    source = fetch_input(args.input, config.work_dir / "inputs")  # an s3:// table or folder: downloaded first
    root = fetch_input(args.root, config.work_dir / "inputs", "--root").resolve() if args.root else default_root(source)
    name = args.name or dataset_name(source)
    out = Path(args.out) if args.out else config.work_dir / "manifests" / f"{name}-{INFERENCE_SPLIT}.parquet"
    built = build_table_manifest(source, root, out, args.query, name)
    for row in built.rejected:
        echo(f"rejected: {row.message}", err=True)
    echo(built.summary())
    echo(f"manifest written to {built.result.path}")
    return 0


def infer_input_command(args: argparse.Namespace, config: PipelineConfig, checkpoint: Path) -> int:
    """``llavaseg infer --input``: manifest, stage 1 and stage 2 for the user's table; prints the summary."""
    import dataclasses

    from llavaseg.infer_input import infer_input

    if args.replicas is not None:
        if args.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
        config = dataclasses.replace(config, ray=dataclasses.replace(config.ray, num_workers=args.replicas),
                                     stage1=dataclasses.replace(config.stage1, replicas=args.replicas))  # fmt: skip
    source = fetch_input(args.input, config.work_dir / "inputs")  # an s3:// table or folder: downloaded first
    root = fetch_input(args.root, config.work_dir / "inputs", "--root") if args.root else None
    summary = infer_input(
        config, source, checkpoint, Path(args.out) if args.out else None, root, args.query,
        Path(args.png) if args.png else None, args.name,
    )  # fmt: skip
    echo(json.dumps(summary, indent=2, default=str))
    return 0
