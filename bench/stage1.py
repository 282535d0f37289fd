"""Stage-1 throughput, measured fairly: vLLM batched vs HF transformers one sample at a time vs HF batched generate.

The same demo-like samples (drawn shapes; phrase and sentence queries) go through both chain-of-thought turns
(``run_chain_of_thought``: turn 2 reads turn 1's answer) on each side, with nothing else varied between sides:

- forced answer lengths on every side, 128 tokens for turn 1 and 64 for turn 2 by default (``--turn-tokens``): vLLM
  ``SamplingParams(min_tokens=N, max_tokens=N, ignore_eos=True, temperature=0)``, transformers
  ``min_new_tokens = max_new_tokens = N``; every answer's token count is checked and reported;
- the same thread count (``--threads``, default 1): each side runs in its own process with ``OMP_NUM_THREADS`` and
  ``torch.set_num_threads``; vLLM runs in that one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) unless
  ``--vllm-multiprocessing``, where its worker gets the same threads unpinned (``VLLM_CPU_OMP_THREADS_BIND=nobind``);
- same prompts, same images (processed inside the timed work on every side), same dtype (float32), greedy.

Sides: ``vllm`` (one batched call per turn), ``hf-sequential`` (what peers do: HF ``generate`` one sample at a time,
``use_cache=True``) and ``hf-batched`` (HF ``generate`` over left-padded batches of ``--batch-size``). Each reports
samples/s, output tokens/s and CPU-seconds per sample (the process and its children), its start (engine or model
load) apart from the work, a 2-sample warm-up apart, and the load average before and after its work. On tiny models
vLLM's KV cache is sized to hold every sequence of a turn at ``--max-model-len`` (``--kv-cache-tokens``; the engine's
own figure is reported); on others vLLM sizes it from ``--gpu-memory-utilization``. ``--embedding`` adds the
hidden-state embedding pass (vLLM pooling engine vs transformers). ``--out`` writes every figure as JSON.

    .venv/bin/python bench/stage1.py --samples 64 --out bench/results/stage1_tiny.json
    .venv/bin/python bench/stage1.py --hidden 512 --layers 4 --samples 32      # a wider random tiny-architecture LLaVA
    .venv/bin/python bench/stage1.py --model /models/llava-1.5-7b-hf --dtype bfloat16 --gpu-memory-utilization 0.9
    .venv/bin/python bench/stage1.py --shape llava-1.5-7b --gpu-memory-utilization 0.9 --skip-transformers

``--shape llava-1.5-7b|llava-1.5-13b`` needs no weights: it writes LLaVA-1.5 at its real shape with random weights
(``stage1_reason.llava_shapes``; bfloat16, 14 / 27 GB of disk) under ``work/models/random-<shape>`` and benchmarks that.
Compare with ``bench/gpu_projection.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("bench.stage1")

SIDES = ("vllm", "hf-sequential", "hf-batched")
BASELINES = ("hf-sequential", "hf-batched")
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "yellow": (240, 200, 30)}
SENTENCES = [
    "Which object in this picture could roll off a table?",
    "What here has exactly three corners?",
    "Which object sits highest in this picture?",
    "Which object has the colour of a ripe tomato?",
]


def demo_samples(count: int, seed: int = 0) -> list:
    """``count`` samples: 2-4 coloured shapes on a grey canvas of varied size; every third query is a sentence."""
    import numpy as np
    from PIL import Image, ImageDraw

    from stage1_reason.engine import Sample

    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        width, height = int(rng.integers(160, 480)), int(rng.integers(120, 360))
        image = Image.new("RGB", (width, height), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        names = []
        for _ in range(int(rng.integers(2, 5))):
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = ("circle", "square")[int(rng.integers(2))]
            x, y = int(rng.integers(0, width - 50)), int(rng.integers(0, height - 50))
            box = (x, y, x + 40, y + 40)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
            names.append(f"the {colour} {shape}")
        if index % 3 == 2:
            samples.append(Sample(f"bench/{index:04d}", SENTENCES[index % len(SENTENCES)], "sentence", image))
        else:
            samples.append(Sample(f"bench/{index:04d}", names[0], "phrase", image))
    return samples


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llava", help="tiny-llava | local model folder | hub id in the cache")
    parser.add_argument("--hidden", type=int, default=128, help="with a tiny model: text hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=2, help="with a tiny model: text layers")
    parser.add_argument("--shape", choices=["llava-1.5-7b", "llava-1.5-13b"],
                        help="instead of --model: LLaVA-1.5 at this real shape with random weights, built locally")
    parser.add_argument("--build-only", action="store_true", help="write the model folder and stop")
    parser.add_argument("--work-dir", default="work", type=Path)
    parser.add_argument("--samples", default=64, type=int)
    parser.add_argument("--turn-tokens", nargs=2, type=int, default=[128, 64], metavar=("TURN1", "TURN2"),
                        help="forced answer lengths of turn 1 (step 1) and turn 2 (the merged answer)")
    parser.add_argument("--threads", default=1, type=int, help="OpenMP / torch threads of every side")
    parser.add_argument("--batch-size", default=16, type=int, help="hf-batched: prompts per generate call")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--skip-transformers", action="store_true", help="only the vLLM side")
    parser.add_argument("--max-model-len", type=int,
                        help="default: 1024 for tiny models (their conversations stay under 400 tokens), else 2048")
    parser.add_argument("--kv-cache-tokens", type=int, help="vLLM KV cache in tokens; 0: vLLM sizes it from "
                        "--gpu-memory-utilization (default: samples x max-model-len for tiny models, else 0)")
    parser.add_argument("--gpu-memory-utilization", default=0.1, type=float)
    parser.add_argument("--vllm-multiprocessing", action="store_true",
                        help="vLLM's engine core and worker in their own processes (its default) instead of in one")
    parser.add_argument("--dtype", help="default: float32; bfloat16 with --shape")
    parser.add_argument("--embedding", action="store_true", help="also the embedding pass (vllm, hf-sequential)")
    parser.add_argument("--max-embed-tokens", default=64, type=int)
    parser.add_argument("--out", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sides = ["vllm"] if args.skip_transformers else [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(args.sides) - set(SIDES))
    if unknown or not args.sides:
        parser.error(f"--sides: unknown {unknown}; choose from {', '.join(SIDES)}")
    args.dtype = args.dtype or ("bfloat16" if args.shape else "float32")
    tiny = not args.shape and args.model.startswith("tiny-llava")
    args.max_model_len = args.max_model_len or (1024 if tiny else 2048)
    if args.kv_cache_tokens is None:
        args.kv_cache_tokens = args.samples * args.max_model_len if tiny else 0
    return args


def resolve_bench_model(args: argparse.Namespace) -> str:
    from stage1_reason.tiny_model import TINY_MODELS, build_tiny_llava, resolve_model, tiny_size_name

    if args.shape:
        from stage1_reason.llava_shapes import build_random_llava

        return str(build_random_llava(args.shape, args.work_dir / "models" / f"random-{args.shape}"))
    if args.model in TINY_MODELS:
        folder = args.work_dir / "models" / tiny_size_name(args.model, args.hidden, args.layers)
        return str(build_tiny_llava(folder, architecture=TINY_MODELS[args.model], hidden_size=args.hidden,
                                    num_layers=args.layers))
    if (args.hidden, args.layers) != (128, 2):
        raise SystemExit("--hidden/--layers size a tiny model only (--model tiny-llava or tiny-llava-next)")
    return resolve_model(args.model, args.work_dir)


def vllm_settings(args: argparse.Namespace, model: str) -> dict:
    from stage1_reason.backends import kv_cache_bytes

    settings = {"gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": True}
    if args.kv_cache_tokens:  # the pipeline's own sizing (stage1.kv_cache_tokens)
        settings["kv_cache_memory_bytes"] = kv_cache_bytes(model, args.kv_cache_tokens, args.dtype or "float32")
    return settings


def engine_info(backend) -> dict:
    """What vLLM made of its settings: KV cache blocks and tokens, batch limits, prefix caching."""
    try:
        config = backend.llm.llm_engine.vllm_config
        cache, scheduler = config.cache_config, config.scheduler_config
        blocks = cache.num_gpu_blocks
        return {"kv_cache_blocks": blocks, "block_size": cache.block_size,
                "kv_cache_tokens": blocks * cache.block_size if blocks else None,
                "kv_cache_memory_bytes": cache.kv_cache_memory_bytes, "max_num_seqs": scheduler.max_num_seqs,
                "max_num_batched_tokens": scheduler.max_num_batched_tokens,
                "prefix_caching": cache.enable_prefix_caching}  # fmt: skip
    except AttributeError as exc:
        return {"unavailable": str(exc)}


def make_side_backend(side: str, args: argparse.Namespace, model: str):
    from stage1_baselines import BatchedTransformersBackend
    from stage1_reason.engine import TransformersBackend, VllmBackend

    common = {"max_model_len": args.max_model_len, "dtype": args.dtype}
    first = args.turn_tokens[0]
    if side == "vllm":
        return VllmBackend(model, first, **common, **vllm_settings(args, model))
    if side == "hf-sequential":
        return TransformersBackend(model, first, **common)
    return BatchedTransformersBackend(model, first, batch_size=args.batch_size, **common)


def run_side(side: str, args: argparse.Namespace, model: str) -> dict:
    """One side in this process: start, warm-up, both turns over the samples (timed, CPU-counted), embedding pass."""
    import torch

    from stage1_baselines import ForcedLengths, cpu_seconds_between, cpu_snapshot, length_check, load_average
    from stage1_reason.engine import run_chain_of_thought

    torch.set_num_threads(args.threads)  # before vLLM's CPU worker turns set_num_threads into a no-op
    samples, warm_up = demo_samples(args.samples), demo_samples(2, seed=1)
    record: dict = {"side": side, "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    cpu, started = cpu_snapshot(), time.perf_counter()
    backend = make_side_backend(side, args, model)
    record.update(start_s=time.perf_counter() - started, start_cpu_s=cpu_seconds_between(cpu, cpu_snapshot()))
    if side == "vllm":
        record["engine"] = engine_info(backend)
    forced = ForcedLengths(backend, tuple(args.turn_tokens))
    started = time.perf_counter()
    run_chain_of_thought(forced, warm_up)
    record["warm_up_s"] = time.perf_counter() - started
    forced.new_chain()
    forced.reset_counts()
    record["load_before"] = load_average()
    cpu, started = cpu_snapshot(), time.perf_counter()
    outputs = run_chain_of_thought(forced, samples)
    record["work_s"] = time.perf_counter() - started
    record["work_cpu_s"] = cpu_seconds_between(cpu, cpu_snapshot())
    record["load_after"] = load_average()
    record["torch_threads"] = torch.get_num_threads()
    record["lengths"] = [length_check(counts, n) for counts, n in zip(forced.counts, args.turn_tokens, strict=True)]
    record["output_tokens"] = sum(sum(counts) for counts in forced.counts)
    record["errors"] = [out.error for out in outputs if out.error]
    record["answers"] = [[out.reason_answer, out.target_attribute_answer] for out in outputs]
    backend.close()
    if args.embedding and side != "hf-batched":
        record.update(run_embedding(side, args, model, samples, outputs))
    return record


def run_embedding(side: str, args: argparse.Namespace, model: str, samples: list, outputs: list) -> dict:
    from stage1_reason.embed import TransformersEmbedder, VllmEmbedder, embed_requests

    requests = embed_requests(samples, outputs)
    started = time.perf_counter()
    if side == "vllm":
        settings = vllm_settings(args, model)
        embedder = VllmEmbedder(model, args.max_embed_tokens, args.max_model_len, args.dtype, **settings)
    else:
        embedder = TransformersEmbedder(model, args.max_embed_tokens, args.max_model_len, args.dtype)
    start_s = time.perf_counter() - started
    embedder.embed(requests[:2])
    started = time.perf_counter()
    embedded = embedder.embed(requests)
    embed_s = time.perf_counter() - started
    if hasattr(embedder, "close"):
        embedder.close()
    return {"embed_start_s": start_s, "embed_s": embed_s, "embed_errors": sum(not r.ok for r in embedded)}


def run_in_subprocess(side: str, argv: list[str], args: argparse.Namespace) -> dict:
    """Run one side in a fresh process with the side's thread environment; return its record."""
    from stage1_baselines import thread_env

    env = {**os.environ, **thread_env(args.threads, args.vllm_multiprocessing)}
    with tempfile.TemporaryDirectory(prefix="bench-stage1-") as folder:
        out = Path(folder) / f"{side}.json"
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--side", side, "--side-out", str(out)]
        logger.info("side %s: %s threads, %s", side, args.threads, "vLLM multiprocess" if args.vllm_multiprocessing
                    and side == "vllm" else "one process")
        completed = subprocess.run(command, env=env, check=False)
        if completed.returncode != 0 or not out.is_file():
            raise SystemExit(f"side {side} failed (exit {completed.returncode}); its log is above")
        return json.loads(out.read_text())


def side_figures(record: dict, samples: int) -> dict:
    figures = {k: v for k, v in record.items() if k != "answers"}
    figures["samples_per_s"] = samples / record["work_s"]
    figures["output_tokens_per_s"] = record["output_tokens"] / record["work_s"]
    figures["cpu_s_per_sample"] = record["work_cpu_s"] / samples
    return figures


def identical(first: list, second: list) -> dict:
    pairs = list(zip(first, second, strict=True))
    return {"both_turns": sum(a == b for a, b in pairs), "turn_1": sum(a[0] == b[0] for a, b in pairs),
            "of": len(pairs)}  # fmt: skip


def code_state() -> dict:
    """The commit measured and the files that differed from it (a benchmark of uncommitted code says so)."""
    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", *command], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": changed}


def summarise(args: argparse.Namespace, model: str, records: dict) -> dict:
    config = json.loads((Path(model) / "config.json").read_text())
    text = config.get("text_config", config)
    summary: dict = {
        "model": model, "text_hidden": text.get("hidden_size"), "text_layers": text.get("num_hidden_layers"),
        "samples": args.samples, "turn_tokens": args.turn_tokens, "threads": args.threads, "dtype": args.dtype,
        "batch_size": args.batch_size, "max_model_len": args.max_model_len, "kv_cache_tokens": args.kv_cache_tokens,
        "vllm_multiprocessing": args.vllm_multiprocessing, "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "code": code_state(),
        "sides": {side: side_figures(record, args.samples) for side, record in records.items()},
    }
    vllm = summary["sides"].get("vllm")
    for baseline in BASELINES:
        other = summary["sides"].get(baseline)
        if vllm and other:
            summary[f"vllm_over_{baseline}"] = {
                "samples_per_s": vllm["samples_per_s"] / other["samples_per_s"],
                "cpu_s_per_sample": other["cpu_s_per_sample"] / vllm["cpu_s_per_sample"],
            }
    for first, second in (("vllm", "hf-sequential"), ("hf-batched", "hf-sequential"), ("vllm", "hf-batched")):
        if first in records and second in records:
            summary[f"identical_{first}_{second}"] = identical(records[first]["answers"], records[second]["answers"])
    return summary


def report_lines(summary: dict) -> list[str]:
    lines = ["| side | start s | work s | samples/s | out tok/s | CPU s/sample | tokens exact | errors | load |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for side, fig in summary["sides"].items():
        exact = "yes" if all(check["exact"] for check in fig["lengths"]) else "NO"
        lines.append(f"| {side} | {fig['start_s']:.1f} | {fig['work_s']:.2f} | {fig['samples_per_s']:.2f} | "
                     f"{fig['output_tokens_per_s']:.0f} | {fig['cpu_s_per_sample']:.3f} | {exact} | "
                     f"{len(fig['errors'])} | {fig['load_before'][0]:.2f} / {fig['load_after'][0]:.2f} |")
    for baseline in BASELINES:
        if f"vllm_over_{baseline}" in summary:
            ratio = summary[f"vllm_over_{baseline}"]
            lines.append(f"vLLM over {baseline}: x{ratio['samples_per_s']:.2f} samples/s, "
                         f"x{ratio['cpu_s_per_sample']:.2f} less CPU per sample")
    for key, same in summary.items():
        if key.startswith("identical_"):
            lines.append(f"{key}: {same['both_turns']}/{same['of']} both turns, {same['turn_1']}/{same['of']} turn 1")
    return lines


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model = resolve_bench_model(args)
    if args.build_only:
        print(model)
        return
    if args.side:  # a child process: one side
        record = run_side(args.side, args, model)
        args.side_out.write_text(json.dumps(record) + "\n")
        return
    records = {side: run_in_subprocess(side, argv, args) for side in args.sides}
    summary = summarise(args, model, records)
    print(json.dumps({k: v for k, v in summary.items() if k != "sides"}, indent=2))
    print("\n".join(report_lines(summary)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
