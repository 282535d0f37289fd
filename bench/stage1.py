"""Stage-1 throughput: vLLM batched generation vs the sequential transformers loop, plus the embedding pass.

The same demo-like samples (drawn shapes; phrase and sentence queries) go through both chain-of-thought turns with
each backend on the same model, then through the hidden-state embedding pass (vLLM pooling engine vs transformers). One
engine is alive at a time. It also counts how many answers the two backends wrote identically (float32 greedy).

    .venv/bin/python bench/stage1.py --samples 64            # tiny LLaVA built under work/models
    .venv/bin/python bench/stage1.py --model /models/llava-1.5-7b-hf --dtype bfloat16 --gpu-memory-utilization 0.9
    .venv/bin/python bench/stage1.py --shape llava-1.5-7b --gpu-memory-utilization 0.9 --skip-transformers

``--shape llava-1.5-7b|llava-1.5-13b`` needs no weights: it writes LLaVA-1.5 at its real shape with random weights
(``stage1_reason.llava_shapes``; bfloat16, 14 / 27 GB of disk) under ``work/models/random-<shape>`` and benchmarks that.
Its answers are random words and always run to ``--max-new-tokens``; compare with ``bench/gpu_projection.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("bench.stage1")

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


def _timed(label: str, func, *args, **kwargs):
    started = time.perf_counter()
    value = func(*args, **kwargs)
    seconds = time.perf_counter() - started
    logger.info("%s: %.2f s", label, seconds)
    return value, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llava", help="tiny-llava | local model folder | hub id in the cache")
    parser.add_argument("--shape", choices=["llava-1.5-7b", "llava-1.5-13b"],
                        help="instead of --model: LLaVA-1.5 at this real shape with random weights, built locally")
    parser.add_argument("--build-only", action="store_true", help="with --shape: write the model folder and stop")
    parser.add_argument("--work-dir", default="work", type=Path)
    parser.add_argument("--samples", default=64, type=int)
    parser.add_argument("--max-new-tokens", default=48, type=int)
    parser.add_argument("--max-model-len", default=2048, type=int)
    parser.add_argument("--max-embed-tokens", default=64, type=int)
    parser.add_argument("--dtype", help="default: float32; bfloat16 with --shape")
    parser.add_argument("--gpu-memory-utilization", default=0.1, type=float)
    parser.add_argument("--skip-transformers", action="store_true", help="only the vLLM side")
    parser.add_argument("--out", type=Path, help="also write the summary as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from stage1_reason.embed import TransformersEmbedder, VllmEmbedder, embed_requests
    from stage1_reason.engine import TransformersBackend, VllmBackend, run_chain_of_thought
    from stage1_reason.tiny_model import resolve_model

    if args.shape:
        from stage1_reason.llava_shapes import build_random_llava

        args.dtype = args.dtype or "bfloat16"
        model = str(build_random_llava(args.shape, args.work_dir / "models" / f"random-{args.shape}"))
        if args.build_only:
            print(model)
            return
    else:
        model = resolve_model(args.model, args.work_dir)
    args.dtype = args.dtype or "float32"
    samples = demo_samples(args.samples)
    common = {"max_model_len": args.max_model_len, "dtype": args.dtype}
    vllm_settings = {**common, "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": True}
    warm_up = demo_samples(2, seed=1)  # first engine calls pay one-off costs; time them apart
    summary: dict = {
        "model": model, "samples": len(samples), "max_new_tokens": args.max_new_tokens, "dtype": args.dtype
    }

    backend, summary["vllm_start_s"] = _timed("vLLM generation engine start", VllmBackend, model,
                                               args.max_new_tokens, **vllm_settings)
    _, summary["vllm_first_call_s"] = _timed("vLLM warm-up (2 samples)", run_chain_of_thought, backend, warm_up)
    vllm_out, summary["vllm_generate_s"] = _timed("vLLM both turns", run_chain_of_thought, backend, samples)
    backend.close()
    requests = embed_requests(samples, vllm_out)
    embedder, summary["vllm_embed_start_s"] = _timed("vLLM pooling engine start", VllmEmbedder, model,
                                                      args.max_embed_tokens, **vllm_settings)
    _, summary["vllm_embed_first_call_s"] = _timed("vLLM embedding warm-up (2 rows)", embedder.embed, requests[:2])
    vllm_embedded, summary["vllm_embed_s"] = _timed("vLLM embedding pass", embedder.embed, requests)
    embedder.close()
    summary["generated_tokens"] = sum(out.generated_tokens for out in vllm_out)
    summary["errors"] = sum(out.status == "error" for out in vllm_out) + sum(not r.ok for r in vllm_embedded)
    summary["vllm_samples_per_s"] = len(samples) / summary["vllm_generate_s"]
    summary["vllm_embed_samples_per_s"] = len(samples) / summary["vllm_embed_s"]

    if not args.skip_transformers:
        hf_backend = TransformersBackend(model, args.max_new_tokens, **common)
        run_chain_of_thought(hf_backend, warm_up)
        reference, summary["hf_generate_s"] = _timed(
            "transformers both turns (sequential)", run_chain_of_thought, hf_backend, samples
        )
        hf_backend.close()
        hf_embedder = TransformersEmbedder(model, args.max_embed_tokens, args.max_model_len, args.dtype)
        hf_embedder.embed(requests[:2])
        _, summary["hf_embed_s"] = _timed("transformers embedding pass", hf_embedder.embed, requests)
        summary["hf_samples_per_s"] = len(samples) / summary["hf_generate_s"]
        summary["generation_speedup"] = summary["hf_generate_s"] / summary["vllm_generate_s"]
        summary["embed_speedup"] = summary["hf_embed_s"] / summary["vllm_embed_s"]
        summary["identical_answers"] = sum(
            (a.reason_answer, a.target_attribute_answer) == (b.reason_answer, b.target_attribute_answer)
            for a, b in zip(vllm_out, reference, strict=True)
        )

    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}, indent=2))
    line = (f"vLLM {summary['vllm_samples_per_s']:.1f} samples/s (both turns), embedding pass "
            f"{summary['vllm_embed_s']:.2f} s = {100 * summary['vllm_embed_s'] / summary['vllm_generate_s']:.0f}% "
            f"of generation")
    if "hf_samples_per_s" in summary:
        line += (f"; transformers {summary['hf_samples_per_s']:.2f} samples/s;"
                 f" vLLM x{summary['generation_speedup']:.1f}; identical answers"
                 f" {summary['identical_answers']}/{len(samples)}")
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
