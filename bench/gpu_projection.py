"""Stage 1 on one H100: FLOPs per chain-of-thought sample and the samples/s the hardware allows (a projection).

Arithmetic only, from the model shapes of ``stage1_reason.llava_shapes`` (the configs the random-weight benchmark
models are built from): nothing is run. Per sample, as stage 1 runs it (the paper profiles: prompt v2, LLaVA-1.5's own
conversation format):

1. turn 1: CLIP ViT-L/14-336 over 577 tokens (only the layers up to ``vision_feature_layer`` = -2 run: 23 of 24), the
   projector over 576 image tokens, the prefill of 576 image tokens + the turn-1 prompt text, then the step-1 answer
   (N tokens = the prefill's logits + N-1 decode steps);
2. turn 2 (merged steps 2+3): the prompt repeats turn 1 and its answer; the prefix cache holds turn 1 and the answer
   (rounded down to 16-token blocks), so only the rest is prefilled and the image is not encoded again; then the
   merged answer is decoded;
3. the embedding pass: a second (pooling) engine with its own empty cache prefills the whole conversation + the merged
   answer again, image included, without an LM head.

Time per sample: prefill FLOPs / (989 TFLOP/s x prefill utilisation); each decode step of a batch of B sequences takes
max((weight bytes + the B sequences' KV-cache bytes) / (3.35 TB/s x bandwidth utilisation), its FLOPs / (989 TFLOP/s x
prefill utilisation)) and is shared by B samples. B is what the KV cache holds at the longest context.

    .venv/bin/python bench/gpu_projection.py                      # markdown table, default assumptions
    .venv/bin/python bench/gpu_projection.py --step1-tokens 96 --merged-tokens 80 --prefill-utilisation 0.6
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage1_reason import prompts  # noqa: E402
from stage1_reason.llava_conventions import render_llava_v1  # noqa: E402
from stage1_reason.llava_shapes import SHAPES, llava_config, parameter_count  # noqa: E402

DEFAULT_QUERY = "What part of this kitchen would someone use to keep milk and vegetables cold for several days?"
ANSWER_SENTINEL = "\x00ANSWER\x00"


@dataclass(frozen=True)
class Hardware:
    name: str = "H100 SXM 80 GB"
    peak_flops: float = 989e12  # dense bf16 tensor cores
    bandwidth: float = 3.35e12  # HBM3, bytes/s
    memory_bytes: float = 80e9


@dataclass(frozen=True)
class Assumptions:
    step1_tokens: int = 128
    merged_tokens: int = 64
    prefill_utilisation: float = 0.5  # share of 989 TFLOP/s a prefill (and a decode step's matmuls) reaches
    bandwidth_utilisation: float = 1.0  # share of 3.35 TB/s a decode step reaches: 1.0 = the hardware limit
    bytes_per_value: int = 2  # bf16 weights and KV cache
    gpu_memory_utilization: float = 0.9  # vLLM's default share of GPU memory
    reserve_bytes: float = 4e9  # activations, CUDA graphs, workspace: not weights, not KV cache
    block_size: int = 16  # vLLM's KV-cache block; prefix hits are whole blocks
    max_batch: int = 256
    chars_per_token: float = 4.0  # prompt text -> tokens, when no tokenizer is given


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_layers_run: int
    vision_intermediate: int
    vision_tokens: int  # patches + CLS
    patch: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def image_tokens(self) -> int:
        return self.vision_tokens - 1  # the "default" feature strategy drops CLS


def shape_from_config(config: Any) -> Shape:
    text, vision = config.text_config, config.vision_config
    layer = config.vision_feature_layer
    run = layer + 1 if layer >= 0 else vision.num_hidden_layers + 1 + layer
    return Shape(text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.num_attention_heads,
                 text.num_key_value_heads, text.vocab_size, vision.hidden_size, run, vision.intermediate_size,
                 (vision.image_size // vision.patch_size) ** 2 + 1, vision.patch_size)


def text_layer_flops(s: Shape, new: int, cached: int) -> float:
    """One decoder layer over ``new`` tokens after ``cached`` ones: q/k/v/o and SwiGLU matmuls (2 FLOPs a
    multiply-add), plus causal attention (QK^T and AV: 4 x hidden per query-key pair; token i sees cached + i keys).
    Norms, RoPE, softmax and residual adds (< 1%) are left out."""
    matmul = 2 * new * (2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_dim + 3 * s.hidden * s.intermediate)
    pairs = new * cached + new * (new + 1) / 2
    return matmul + 4 * s.hidden * pairs


def text_flops(s: Shape, new: int, cached: int = 0, logits: int = 1) -> float:
    return s.layers * text_layer_flops(s, new, cached) + logits * 2 * s.hidden * s.vocab


def image_flops(s: Shape) -> float:
    """Patch conv + the vision layers that run (full attention over 577 tokens) + the 2-layer projector."""
    n, d = s.vision_tokens, s.vision_hidden
    patch = 2 * s.image_tokens * 3 * s.patch**2 * d
    layer = 2 * n * (4 * d * d + 2 * d * s.vision_intermediate) + 4 * d * n * n
    projector = 2 * s.image_tokens * (d * s.hidden + s.hidden * s.hidden)
    return patch + s.vision_layers_run * layer + projector


def _count(text: str, a: Assumptions, tokenizer: Any) -> int:
    if tokenizer is not None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return math.ceil(len(text) / a.chars_per_token)


def prompt_tokens(s: Shape, a: Assumptions, query: str = DEFAULT_QUERY, prompt_version: str = "v2",
                  tokenizer: Any = None) -> dict[str, int]:
    """Token counts of one sample: turn-1 prompt, turn-2 prompt (with the step-1 answer wherever it appears), the
    cached prefix, the turn-2 tokens to prefill, and the embedding pass's prompt. 1 BOS; the image is 576 tokens."""
    question = prompts.reason_question(query, "sentence", prompt_version)

    def tokens(messages: list) -> int:
        text = render_llava_v1(messages, image_token="")
        answers = text.count(ANSWER_SENTINEL)
        return 1 + s.image_tokens + _count(text.replace(ANSWER_SENTINEL, ""), a, tokenizer) + answers * a.step1_tokens

    turn1 = tokens(prompts.reason_messages(question))
    turn2 = tokens(prompts.target_attribute_messages(question, ANSWER_SENTINEL, prompt_version))
    cached = min(turn2, (turn1 + a.step1_tokens) // a.block_size * a.block_size)
    return {"turn1_prompt": turn1, "turn2_prompt": turn2, "turn2_cached": cached, "turn2_new": turn2 - cached,
            "embed_prompt": turn2 + a.merged_tokens, "longest_context": turn2 + a.merged_tokens}


def _decode_seconds(s: Shape, hw: Hardware, a: Assumptions, start: int, tokens: int, batch: int,
                    weight_bytes: float, kv_token_bytes: float) -> tuple[float, float, float]:
    """Seconds per sample, FLOPs and bytes per sample of the ``tokens - 1`` decode steps after a prefill of
    ``start`` tokens, at ``batch`` sequences a step."""
    seconds = flops = bytes_read = 0.0
    for step in range(tokens - 1):
        context = start + step  # tokens in the cache; the new token attends these and itself
        step_flops = text_flops(s, 1, context)
        step_bytes = weight_bytes / batch + kv_token_bytes * (context + 1)
        memory_s = batch * step_bytes / (hw.bandwidth * a.bandwidth_utilisation)
        compute_s = batch * step_flops / (hw.peak_flops * a.prefill_utilisation)
        seconds += max(memory_s, compute_s) / batch
        flops += step_flops
        bytes_read += step_bytes
    return seconds, flops, bytes_read


def project(shape_name: str, a: Assumptions = Assumptions(), hw: Hardware = Hardware(), batch: int | None = None,
            tokenizer: Any = None, prompt_version: str = "v2") -> dict[str, Any]:
    config = llava_config(shape_name)
    s = shape_from_config(config)
    params = parameter_count(config)
    tok = prompt_tokens(s, a, prompt_version=prompt_version, tokenizer=tokenizer)
    # decode reads the layers and the LM head; of the input embedding table only the rows it looks up
    weight_bytes = a.bytes_per_value * (params["text"] - s.vocab * s.hidden)
    kv_token_bytes = 2 * s.layers * s.kv_dim * a.bytes_per_value
    kv_capacity = a.gpu_memory_utilization * hw.memory_bytes - a.bytes_per_value * params["total"] - a.reserve_bytes
    batch_fits = min(a.max_batch, int(kv_capacity // (kv_token_bytes * tok["longest_context"])))
    batch = batch or batch_fits
    flops = {
        "image (vision tower + projector), x2": 2 * image_flops(s),
        "turn-1 prefill": text_flops(s, tok["turn1_prompt"]),
        "turn-2 prefill (after the cached prefix)": text_flops(s, tok["turn2_new"], tok["turn2_cached"]),
        "embedding-pass prefill": text_flops(s, tok["embed_prompt"], logits=0),
    }
    prefill_flops = sum(flops.values())
    prefill_s = prefill_flops / (hw.peak_flops * a.prefill_utilisation)

    def decode(run_batch: int) -> tuple[float, float, float]:
        one = _decode_seconds(s, hw, a, tok["turn1_prompt"], a.step1_tokens, run_batch, weight_bytes, kv_token_bytes)
        two = _decode_seconds(s, hw, a, tok["turn2_prompt"], a.merged_tokens, run_batch, weight_bytes, kv_token_bytes)
        return one[0] + two[0], one[1] + two[1], one[2] + two[2]

    decode_s, decode_flops, decode_bytes = decode(batch)
    flops["decode (both answers)"] = decode_flops
    total_flops = prefill_flops + decode_flops
    sequential_decode_s = decode(1)[0]
    back_to_back = 1 / (prefill_s + decode_s)
    overlap = 1 / max(total_flops / (hw.peak_flops * a.prefill_utilisation),
                      decode_bytes / (hw.bandwidth * a.bandwidth_utilisation))
    sequential = 1 / (prefill_s + sequential_decode_s)
    return {
        "shape": shape_name, "params": params, "tokens": tok, "flops": flops, "total_flops": total_flops,
        "weight_bytes_per_step": weight_bytes, "kv_bytes_per_token": kv_token_bytes, "kv_capacity_bytes": kv_capacity,
        "batch": batch, "decode_bytes_per_sample": decode_bytes, "prefill_s": prefill_s, "decode_s": decode_s,
        "samples_per_s": back_to_back, "samples_per_s_overlap": overlap, "sequential_samples_per_s": sequential,
        "batched_over_sequential": back_to_back / sequential,
    }


def _tf(value: float) -> str:
    return f"{value / 1e12:.2f}"


def markdown(results: list[dict[str, Any]], a: Assumptions, hw: Hardware) -> str:
    head = "| | " + " | ".join(r["shape"].replace("llava-1.5-", "LLaVA-1.5-").upper().replace("LLAVA", "LLaVA")
                               for r in results) + " |"
    rows = [head, "|---|" + "---:|" * len(results)]

    def row(label: str, values: list[str]) -> None:
        rows.append(f"| {label} | " + " | ".join(values) + " |")

    row("parameters (text + vision + projector)", [f"{r['params']['total'] / 1e9:.3f} B" for r in results])
    row("turn-1 prompt tokens (576 image + text)", [str(r["tokens"]["turn1_prompt"]) for r in results])
    row(f"turn-2 prompt tokens / cached prefix / prefilled (step-1 answer {a.step1_tokens})",
        [f"{r['tokens']['turn2_prompt']} / {r['tokens']['turn2_cached']} / {r['tokens']['turn2_new']}"
         for r in results])
    row(f"embedding-pass prompt tokens (+ merged answer {a.merged_tokens})",
        [str(r["tokens"]["embed_prompt"]) for r in results])
    for label in results[0]["flops"]:
        row(f"TFLOP: {label}", [_tf(r["flops"][label]) for r in results])
    row("**TFLOP per CoT sample**", [f"**{_tf(r['total_flops'])}**" for r in results])
    row("weight bytes read per decode step (GB)", [f"{r['weight_bytes_per_step'] / 1e9:.2f}" for r in results])
    row("KV cache per token (MB)", [f"{r['kv_bytes_per_token'] / 1e6:.3f}" for r in results])
    row("decode batch (KV cache room / longest context)",
        [f"{r['batch']} ({r['kv_capacity_bytes'] / 1e9:.1f} GB / {r['tokens']['longest_context']} tok)"
         for r in results])
    row("decode bytes read per sample (GB; weights / batch + KV)",
        [f"{r['decode_bytes_per_sample'] / 1e9:.1f}" for r in results])
    row(f"prefill ms per sample (at {a.prefill_utilisation:.0%} of {hw.peak_flops / 1e12:.0f} TFLOP/s)",
        [f"{1e3 * r['prefill_s']:.1f}" for r in results])
    row(f"decode ms per sample (at {a.bandwidth_utilisation:.0%} of {hw.bandwidth / 1e12:.2f} TB/s)",
        [f"{1e3 * r['decode_s']:.1f}" for r in results])
    row("**samples/s, prefill and decode back to back**", [f"**{r['samples_per_s']:.1f}**" for r in results])
    row("samples/s if prefill hid under decode (upper bound)", [f"{r['samples_per_s_overlap']:.1f}" for r in results])
    row("GPU-hours per 100k samples (back to back)", [f"{1e5 / r['samples_per_s'] / 3600:.2f}" for r in results])
    row("samples/s, one sample at a time (batch 1 bound)", [f"{r['sequential_samples_per_s']:.2f}" for r in results])
    row("batched / one at a time (bounds)", [f"{r['batched_over_sequential']:.1f}x" for r in results])
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Assumptions()
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: both")
    parser.add_argument("--step1-tokens", type=int, default=defaults.step1_tokens)
    parser.add_argument("--merged-tokens", type=int, default=defaults.merged_tokens)
    parser.add_argument("--prefill-utilisation", type=float, default=defaults.prefill_utilisation)
    parser.add_argument("--bandwidth-utilisation", type=float, default=defaults.bandwidth_utilisation)
    parser.add_argument("--batch", type=int, help="decode batch; default: what the KV cache holds (at most 256)")
    parser.add_argument("--prompt-version", default="v2", choices=sorted(prompts.PROMPTS))
    parser.add_argument("--tokenizer", help="a local tokenizer folder to count prompt tokens (default: 4 chars/token)")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    args = parser.parse_args()
    a = Assumptions(step1_tokens=args.step1_tokens, merged_tokens=args.merged_tokens,
                    prefill_utilisation=args.prefill_utilisation, bandwidth_utilisation=args.bandwidth_utilisation)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    hw = Hardware()
    results = [project(name, a, hw, args.batch, tokenizer, args.prompt_version) for name in args.shape or SHAPES]
    print(markdown(results, a, hw))
    if args.json:
        args.json.write_text(json.dumps({"assumptions": asdict(a), "hardware": asdict(hw), "results": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
