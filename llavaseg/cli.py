"""`llavaseg` command line: one subcommand per job, all sharing `--config/--profile/key=value`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from shared.config import DEFAULT_CONFIG_NAME, ConfigError, PipelineConfig, load_config

log = logging.getLogger("llavaseg")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG_NAME, help="pipeline TOML file (default: %(default)s)")
    parser.add_argument("--profile", default=None, help="named profile in the config file, e.g. paper-13b")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stage2.lr=3e-4")


def _load(args: argparse.Namespace, check_paths: bool = True) -> PipelineConfig:
    return load_config(args.config, args.profile, args.overrides, check_paths=check_paths)


def cmd_manifest(args: argparse.Namespace) -> int:
    from manifests.registry import build_manifest, manifest_filename

    config = _load(args, check_paths=False)
    root = Path(args.root).resolve() if args.root else config.data_root
    out = Path(args.out) if args.out else config.work_dir / "manifests" / manifest_filename(args.dataset, args.split)
    result = build_manifest(args.dataset, root, args.split, out)
    print(result.summary())
    print(f"manifest written to {result.path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from llavaseg.pipeline import prepare

    prepare(_load(args))
    return 0


def cmd_reason(args: argparse.Namespace) -> int:
    from llavaseg.pipeline import prepare, reason

    config = _load(args)
    manifests = prepare(config, build_models=False)
    reason(config, manifests, overwrite=args.overwrite)
    return 0


def _stage2_inputs(args: argparse.Namespace):
    from llavaseg.pipeline import prepare, stage2_sources

    config = _load(args)
    manifests = prepare(config, build_models=False)
    return config, manifests, stage2_sources


def cmd_train(args: argparse.Namespace) -> int:
    from stage2_segment.train import train

    config, manifests, sources = _stage2_inputs(args)
    result = train(config, sources(config, manifests, config.data.train))
    print(f"trained to step {result.final_step} (final loss {result.final_loss}); checkpoint: {result.checkpoint_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from stage2_segment.evaluate import evaluate, metrics_markdown

    config, manifests, sources = _stage2_inputs(args)
    metrics = evaluate(config, sources(config, manifests, config.data.eval), Path(args.checkpoint))
    print(metrics_markdown(metrics))
    print(f"evaluation written to {config.work_dir / 'eval' / metrics['name']} (metrics.json, metrics.md, overlays/)")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from stage2_segment.infer import infer

    config, manifests, sources = _stage2_inputs(args)
    out = Path(args.out) if args.out else config.work_dir / "predictions"
    summary = infer(config, sources(config, manifests, config.data.eval), Path(args.checkpoint), out)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from llavaseg.segment import segment_image

    config = _load(args)
    result = segment_image(
        config,
        Path(args.image),
        args.query,
        Path(args.checkpoint) if args.checkpoint else None,
        Path(args.out) if args.out else None,
        None if args.query_kind == "auto" else args.query_kind,
    )
    print(result.describe())
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from llavaseg.ablate import run_ablation

    path, _ = run_ablation(args.config, args.profile, args.overrides)
    print(path.read_text(encoding="utf-8"))
    print(f"ablation table written to {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from llavaseg.pipeline import run_all

    run_all(_load(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llavaseg",
        description="Reasoning segmentation with a frozen multimodal LLM (LLaVASeg): cached CoT reasoning, SAM adapters.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("manifest", help="build one dataset's manifest Parquet from its on-disk format")
    p.add_argument("dataset", help="reasonseg, refcoco, refcoco+, refcocog, refclef, ade20k, cocostuff, paco_lvis, pascal_part")
    p.add_argument("--root", default=None, help="data root in LISA's layout (default: [paths].data_root)")
    p.add_argument("--split", required=True, help="train, val, test, testA, ... as the dataset has them")
    p.add_argument("--out", default=None, help="output Parquet (default: <work_dir>/manifests/<dataset>-<split>.parquet)")
    _add_config_args(p)
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("prepare", help="demo data (if configured), every configured manifest, tiny models")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("reason", help="stage 1: chain-of-thought reasoning through vLLM into Parquet shards")
    p.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    _add_config_args(p)
    p.set_defaults(func=cmd_reason)

    p = sub.add_parser("train", help="stage 2: train the SAM adapters from stage-1 shards on Ray Train")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="stage 2: gIoU/cIoU of a checkpoint on the eval manifests")
    p.add_argument("--checkpoint", required=True, help="a trained checkpoint folder (e.g. <work_dir>/stage2/<name>/final)")
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("infer", help="stage 2: offline inference over the eval manifests' shards -> RLE predictions")
    p.add_argument("--checkpoint", required=True, help="a trained checkpoint folder")
    p.add_argument("--out", default=None, help="output folder (default: <work_dir>/predictions)")
    _add_config_args(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("segment", help="one image + one query: the MLLM's answer, target, attributes and a mask")
    p.add_argument("--image", required=True, help="an image file (JPEG, PNG, ...)")
    p.add_argument("--query", required=True, help='e.g. "where should the piano player sit?"')
    p.add_argument("--checkpoint", default=None,
                   help="trained stage-2 checkpoint folder (default: the one `llavaseg run` trains for this config)")
    p.add_argument("--out", default=None, help="output folder (default: <work_dir>/segment)")
    p.add_argument("--query-kind", default="auto", choices=("auto", "phrase", "sentence"),
                   help="phrase (referring) or sentence (reasoning); auto: a question or 6+ words is a sentence")
    _add_config_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("ablate", help="paper Table 3: CoT steps, single- vs multi-scale adapters, with/without ReasonSeg")
    _add_config_args(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("run", help="the whole pipeline on the configured data: stage 1, training, evaluation, report")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions, ...: the message names the file
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
