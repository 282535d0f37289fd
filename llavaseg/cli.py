"""`llavaseg` command line: one subcommand per job, all sharing `--config/--profile/key=value`.

Config overrides (``section.key=value``) and ``-v``/``-q`` are accepted anywhere on the line, before or after the
subcommand's options. Exit codes: 0 ok, 2 usage, config or input error, 1 runtime error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from importlib import metadata
from pathlib import Path

from llavaseg.cli_overrides import split_overrides
from llavaseg.cli_tasks import add_task_args, job_slice
from shared.config import DEFAULT_CONFIG_NAME, ConfigError, PipelineConfig, load_config
from shared.console import echo

log = logging.getLogger("llavaseg")


EPILOG = (
    "config overrides: section.key=value anywhere on the line, e.g. stage2.lr=3e-4 ray.num_workers=8\n"
    "exit codes: 0 ok, 2 usage/config/input error, 1 runtime error, 130 interrupted"
)


def _version() -> str:
    try:
        return metadata.version("llavaseg")
    except metadata.PackageNotFoundError:
        return "unknown"


def _add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="only the summary and errors")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG_NAME, help="pipeline TOML file (default: %(default)s)")
    parser.add_argument("--profile", default=None, help="named profile in the config file, e.g. paper-13b")
    _add_verbosity(parser, argparse.SUPPRESS)  # also after the subcommand; the top-level default stands otherwise


def _checkpoint(args: argparse.Namespace, config: PipelineConfig) -> Path:
    """``--checkpoint`` or, without it, the final checkpoint that `llavaseg train` makes for this config."""
    from llavaseg.segment import default_checkpoint

    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(config)
    if not checkpoint.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {checkpoint} does not exist; train it with `llavaseg train` (or `llavaseg run`) "
            "for this config, or pass --checkpoint DIR"
        )
    return checkpoint


def _load(args: argparse.Namespace, check_paths: bool = True) -> PipelineConfig:
    return load_config(args.config, args.profile, args.overrides, check_paths=check_paths)


def cmd_manifest(args: argparse.Namespace) -> int:
    from manifests.registry import build_manifest, manifest_filename

    config = _load(args, check_paths=False)
    if args.dataset == "table":
        from llavaseg.cli_input import manifest_table

        return manifest_table(args, config)
    root = Path(args.root).resolve() if args.root else config.data_root
    if args.split is None:
        raise ValueError(f"manifest {args.dataset}: --split is required")
    out = Path(args.out) if args.out else config.work_dir / "manifests" / manifest_filename(args.dataset, args.split)
    result = build_manifest(args.dataset, root, args.split, out)
    echo(result.summary())
    echo(f"manifest written to {result.path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from llavaseg.pipeline import prepare

    prepare(_load(args))
    return 0


def cmd_reason(args: argparse.Namespace) -> int:
    from llavaseg.pipeline import prepare, reason

    job, config = job_slice(args, "reason"), _load(args)
    manifests = prepare(config, build_models=False)
    reason(config, manifests, overwrite=args.overwrite, job=job)
    return 0


def _stage2_inputs(args: argparse.Namespace):
    from llavaseg.pipeline import prepare, stage2_sources

    config = _load(args)
    manifests = prepare(config, build_models=False)
    return config, manifests, stage2_sources


def cmd_train(args: argparse.Namespace) -> int:
    from stage2_segment.train import train

    config, manifests, sources = _stage2_inputs(args)
    result = train(config, sources(config, manifests, config.data.train), allow_partial=args.allow_partial)
    echo(f"trained to step {result.final_step} (final loss {result.final_loss}); checkpoint: {result.checkpoint_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from stage2_segment.evaluate import evaluate, metrics_markdown

    config, manifests, sources = _stage2_inputs(args)
    metrics = evaluate(config, sources(config, manifests, config.data.eval), _checkpoint(args, config),
                       text_blind=args.text_blind)
    echo(metrics_markdown(metrics))
    echo(f"evaluation written to {config.work_dir / 'eval' / metrics['name']} (metrics.json, metrics.md, overlays/)")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from stage2_segment.infer import infer

    job = job_slice(args, "infer")
    if args.input:
        from llavaseg.cli_input import infer_input_command

        config = _load(args, check_paths=False)
        return infer_input_command(args, config, _checkpoint(args, config))  # a missing checkpoint fails first
    if args.root or args.query or args.png or args.name:
        raise ValueError("infer: --root, --query, --png and --name go with --input")
    config, manifests, sources = _stage2_inputs(args)
    out = Path(args.out) if args.out else config.work_dir / "predictions"
    summary = infer(config, sources(config, manifests, config.data.eval), _checkpoint(args, config), out, job=job)
    echo(json.dumps(summary, indent=2, default=str))
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
    echo(result.describe())
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from llavaseg.ablate import run_ablation

    path, _ = run_ablation(args.config, args.profile, args.overrides, prompt_versions=args.prompt_versions)
    echo(path.read_text(encoding="utf-8"))
    echo(f"ablation table written to {path}")
    return 0


def cmd_build_mini_models(args: argparse.Namespace) -> int:
    from llavaseg.mini_models import build_mini_models, describe

    models = ("mini-llava", "mini-sam") if args.only == "all" else (args.only,)
    steps = {"mini-llava": args.llava_steps, "mini-sam": args.sam_steps}
    summary = build_mini_models(Path(args.out), models, args.seed, steps, not args.no_progress, args.threads)
    echo(describe(summary))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from llavaseg.status import collect_status

    echo(collect_status(_load(args, check_paths=False)).describe())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from llavaseg.pipeline import run_all

    run_all(_load(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llavaseg",
        description="Reasoning segmentation with a frozen multimodal LLM (LLaVASeg): cached CoT reasoning, SAM adapters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llavaseg {_version()}")
    _add_verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = sub.add_parser

    def command(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's own keyword
        description = help[0].upper() + help[1:] + "."
        return add_parser(name, help=help, description=description, epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip

    p = command("manifest", "build one dataset's manifest Parquet from its on-disk format")
    p.add_argument("dataset", help="reasonseg, refcoco, refcoco+, refcocog, refclef, ade20k, cocostuff, paco_lvis, "
                   "pascal_part; or table: your own images and queries (--input), no masks, split 'inference'")
    p.add_argument("--root", default=None, help="data root in LISA's layout (default: [paths].data_root); for table "
                   "the folder the image paths are under (default: the table's folder, or the image folder)")
    p.add_argument("--split", default=None, help="train, val, test, testA, ... as the dataset has them (required, "
                   "except for table)")
    p.add_argument("--input", default=None, help="table: a CSV, JSONL or Parquet file with columns image, query "
                   "(optional id, query_kind), or a folder of images with --query")
    p.add_argument("--query", default=None, help="table: the query for every image of an --input folder")
    p.add_argument("--name", default=None, help="table: the manifest's dataset name (default: from the input's name)")
    p.add_argument("--out", default=None, help="output Parquet (default: <work_dir>/manifests/<dataset>-<split>.parquet)")
    _add_config_args(p)
    p.set_defaults(func=cmd_manifest)

    p = command("prepare", "demo data (if configured), every configured manifest, tiny models")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = command("reason", "stage 1: chain-of-thought reasoning through vLLM into Parquet shards")
    p.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    add_task_args(p)
    _add_config_args(p)
    p.set_defaults(func=cmd_reason)

    p = command("train", "stage 2: train the SAM adapters from stage-1 shards on Ray Train")
    _add_config_args(p)
    p.add_argument("--allow-partial", action="store_true",
                   help="train although stage 1 has not finished every train shard (default: refuse)")
    p.set_defaults(func=cmd_train)

    p = command("evaluate", "stage 2: gIoU/cIoU of a checkpoint on the eval manifests")
    p.add_argument("--checkpoint", default=None,
                   help="a trained checkpoint folder (default: the one `llavaseg train` makes for this config)")
    p.add_argument("--text-blind", action="store_true",
                   help="control: each sample gets the text embedding of another image's sample (seeded by "
                        "stage2.seed); written as <name>-textblind beside the normal evaluation")
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("infer", "offline inference -> RLE predictions: over the eval manifests' shards, or with --input over "
                "your own images and queries (stage 1, then stage 2)")
    p.add_argument("--checkpoint", default=None,
                   help="a trained checkpoint folder (default: the one `llavaseg train` makes for this config)")
    p.add_argument("--out", default=None, help="output folder (default: <work_dir>/predictions)")
    p.add_argument("--input", default=None, help="a CSV, JSONL or Parquet table (columns image, query; optional id, "
                   "query_kind), or a folder of images with --query")
    p.add_argument("--root", default=None, help="with --input: the folder the image paths are under (default: the "
                   "table's folder, or the image folder itself)")
    p.add_argument("--query", default=None, help="with an --input folder: the query for every image")
    p.add_argument("--png", default=None, metavar="DIR", help="with --input: also write mask and overlay PNGs here")
    p.add_argument("--name", default=None, help="with --input: the manifest's name (default: from the input's name)")
    p.add_argument("--replicas", type=int, default=None,
                   help="with --input: Ray Data actors for stage 2 and stage-1 engine replicas (default: ray.num_workers)")
    add_task_args(p)
    _add_config_args(p)
    p.set_defaults(func=cmd_infer)

    p = command("segment", "one image + one query: the MLLM's answer, target, attributes and a mask")
    p.add_argument("--image", required=True, help="an image file (JPEG, PNG, ...)")
    p.add_argument("--query", required=True, help='e.g. "where should the piano player sit?"')
    p.add_argument("--checkpoint", default=None,
                   help="trained stage-2 checkpoint folder (default: the one `llavaseg run` trains for this config)")
    p.add_argument("--out", default=None, help="output folder (default: <work_dir>/segment)")
    p.add_argument("--query-kind", default="auto", choices=("auto", "phrase", "sentence"),
                   help="phrase (referring) or sentence (reasoning); auto: a question or 6+ words is a sentence")
    _add_config_args(p)
    p.set_defaults(func=cmd_segment)

    p = command("ablate", "paper Table 3: CoT steps, single- vs multi-scale adapters, with/without ReasonSeg")
    p.add_argument("--prompt-versions", nargs="+", default=[], metavar="VERSION",
                   help="also compare these stage1.prompt_version values, e.g. v1 v2")
    _add_config_args(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("build-mini-models", help="train the demo world's mini LLaVA and mini SAM; update SHA256SUMS")
    p.add_argument("--out", default="weights", help="weights folder (default: %(default)s)")
    p.add_argument("--only", default="all", choices=("all", "mini-llava", "mini-sam"), help="build one model only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llava-steps", type=int, default=None, help="mini LLaVA training steps (default: its own)")
    p.add_argument("--sam-steps", type=int, default=None, help="mini SAM pretraining steps (default: its own)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads; the weights depend on it (default: those of the committed weights, "
                        "2 for the mini LLaVA, 1 for the mini SAM)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build_mini_models)

    p = command("status", "what exists and what is done for this config: manifests, stage-1 shards, training, scores")
    _add_config_args(p)
    p.set_defaults(func=cmd_status)

    p = command("run", "the whole pipeline on the configured data: stage 1, training, evaluation, report")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``section.key=value`` overrides may stand anywhere and end up in ``args.overrides``."""
    parser = build_parser()
    rest, overrides = split_overrides(parser, list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    args.overrides = overrides
    return args


def _work_dir(args: argparse.Namespace) -> Path | None:
    """Where this command's log file goes; None for commands that only read (status) or that cannot load the config."""
    if args.command == "status":
        return None
    try:
        return load_config(args.config, args.profile, args.overrides, check_paths=False).work_dir
    except (ConfigError, FileNotFoundError, ValueError, OSError):
        return None  # the command reports the error itself


def main(argv: list[str] | None = None) -> int:
    from llavaseg import stopping
    from llavaseg.logs import route_output
    from shared.processes import STOPPING

    stopping.install(None)
    args = parse_args(argv)
    log_file = route_output(_work_dir(args), args.command, args.verbose, args.quiet)
    stopping.install(log_file)
    where = f" (full log: {log_file})" if log_file else ""
    try:
        code = args.func(args)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM through our handler
        code = 143 if isinstance(stop, stopping.Terminated) else 130
    except SystemExit as stop:
        if stop.code != signal.SIGTERM:  # Ray's driver turns SIGTERM into sys.exit(15)
            raise
        code = 143
    except Exception as err:
        if STOPPING.is_set():  # the job's engine failing because SIGTERM ended it: not an error of its own
            logging.getLogger("traceback").info("after SIGTERM: %s", err, exc_info=True)
            code = 143
        elif isinstance(err, ConfigError):
            echo(f"error: {err}", err=True)
            code = 2
        elif isinstance(err, (FileNotFoundError, ValueError)):
            echo(f"error: {err}{where}", err=True)
            code = 2
        elif isinstance(err, OSError):  # disk full, permissions, ...: the message names the file
            echo(f"error: {err}{where}", err=True)
            code = 1
        elif not log_file:
            raise
        else:  # an unexpected failure: one line here, the traceback in the log file
            logging.getLogger("traceback").error("%s failed", args.command, exc_info=True)  # not ours: file only
            echo(f"error: {type(err).__name__}: {err}{where}", err=True)
            code = 1
    if STOPPING.is_set():  # terminated, even where the signal's exception was lost inside a library
        code = 143
    if code in (130, 143):
        code = stopping.stopped(code)
    if log_file:
        echo(f"log: {log_file}", err=True)
    stopping.main_done()
    return code


if __name__ == "__main__":
    sys.exit(main())
