"""Stage-1 generation: the ``openai`` backend against a ``vllm serve`` vs the in-process vLLM engine, same rows.

Both sides run the chain of thought (both turns) on the same demo samples with the same model and settings, and each
side's time includes one engine start: the in-process side creates ``VllmBackend`` (and closes it), the server side
starts ``vllm serve`` on 127.0.0.1, waits until ``/health`` answers, generates through the chat completions endpoint
(``max_concurrency`` requests in flight), then stops the server. Answers are compared row by row.

    .venv/bin/python bench/stage1_openai.py --samples 64                  # tiny LLaVA built under work/models
    .venv/bin/python bench/stage1_openai.py --samples 64 --concurrency 16 --model /models/llava-1.5-7b-hf
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the in-process engine's workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def process_tree_cpu(pid: int) -> float:
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            cpu = process.cpu_times()
            total += cpu.user + cpu.system
    except psutil.NoSuchProcess:
        pass
    return total


def in_process(model: str, samples: list, max_new_tokens: int) -> dict:
    from stage1_reason.chain import run_chain_of_thought
    from stage1_reason.engine import VllmBackend

    cpu, started = cpu_seconds(), time.perf_counter()
    backend = VllmBackend(model, max_new_tokens=max_new_tokens, dtype="float32", max_model_len=2048,
                          enforce_eager=True, gpu_memory_utilization=0.1, seed=0)  # fmt: skip
    ready = time.perf_counter()
    outputs = run_chain_of_thought(backend, samples)
    generated = time.perf_counter()
    backend.close()
    return {"start_s": ready - started, "generate_s": generated - ready, "total_s": time.perf_counter() - started,
            "cpu_s_this_process_and_reaped_children": cpu_seconds() - cpu, "outputs": outputs}  # fmt: skip


def through_server(model: str, samples: list, max_new_tokens: int, concurrency: int, log: Path) -> dict:
    from stage1_reason.chain import run_chain_of_thought
    from stage1_reason.openai_backend import OpenAIBackend
    from vllm_server import VllmServer

    cpu, started = cpu_seconds(), time.perf_counter()
    server = VllmServer(Path(model), log).start()
    try:
        server.wait_ready()
        ready = time.perf_counter()
        backend = OpenAIBackend(model, server.url, max_new_tokens, max_concurrency=concurrency)
        outputs = run_chain_of_thought(backend, samples)
        generated = time.perf_counter()
        server_cpu = process_tree_cpu(server.process.pid)
        backend.close()
    finally:
        server.stop()
    return {"start_s": ready - started, "generate_s": generated - ready, "total_s": time.perf_counter() - started,
            "cpu_s_client": cpu_seconds() - cpu, "cpu_s_server_tree": server_cpu, "outputs": outputs}  # fmt: skip


def main() -> None:
    from stage1 import demo_samples  # bench/stage1.py
    from stage1_reason.tiny_model import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8, help="openai backend: requests in flight")
    parser.add_argument("--out", default="work/bench/stage1_openai.json")
    args = parser.parse_args()
    model = resolve_model(args.model, Path("work"))
    samples = demo_samples(args.samples)
    local = in_process(model, samples, args.max_new_tokens)
    served = through_server(model, samples, args.max_new_tokens, args.concurrency, Path(args.out).with_suffix(".log"))
    same = sum(a.reason_answer == b.reason_answer and a.target_attribute_answer == b.target_attribute_answer
               for a, b in zip(local.pop("outputs"), served.pop("outputs"), strict=True))  # fmt: skip
    result = {"samples": args.samples, "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency,
              "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "in_process": local,
              "openai_server": served, "identical_answers": same}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
