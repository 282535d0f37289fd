"""Stage-2 training-step benchmark: SAM (ViT-H by default) with language-aware adapters, frozen encoder, bf16.

Needs only torch, segment-anything and this repository's ``stage2_segment`` on PYTHONPATH:

    PYTHONPATH=. python bench/stage2_gpu.py                                # one GPU, ViT-H, batch 4, random weights
    PYTHONPATH=. python bench/stage2_gpu.py --batch 8 --grad-checkpointing
    PYTHONPATH=. python bench/stage2_gpu.py --sam-checkpoint sam_vit_h_4b8939.pth
    PYTHONPATH=. python bench/stage2_gpu.py --device cpu --variant tiny     # smoke check on CPU

Each step is a full training step on synthetic data (projector -> adapted encoder -> decoder -> BCE+DICE at the padded
input resolution -> backward -> AdamW). FLOPs of one step are counted with ``torch.utils.flop_counter`` (matmuls,
convolutions and attention, forward and backward, including the backward through the frozen blocks that sit between
adapters); model FLOP utilisation = counted FLOPs per second / ``--peak-tflops`` (H100 SXM bf16 dense: 989).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stage2_segment.loss import mask_loss
from stage2_segment.modeling import build_adapted_sam

logger = logging.getLogger("bench.stage2_gpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="vit_h", choices=["vit_h", "vit_l", "vit_b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4, help="samples (image + query) per step")
    parser.add_argument("--llm-dim", type=int, default=5120, help="MLLM hidden size (5120 = LLaVA-13B)")
    parser.add_argument("--text-tokens", type=int, default=48, help="padded text length; rows use 50-100%% of it")
    parser.add_argument("--adapter-blocks", type=int, nargs="*", default=None, help="default: global-attention blocks")
    parser.add_argument("--sam-checkpoint", type=Path, default=None, help="official SAM weights; default random")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks after the first adapter")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for --precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the summary as JSON here")
    return parser.parse_args()


def synthetic_batch(
    batch: int, image_size: int, tokens: int, llm_dim: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bx3xSxS images, BxNxD float16 text (as stored in shards), BxN text mask, Bx1xSxS labels (255 = padding)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    text = torch.randn(batch, tokens, llm_dim, generator=generator).half()
    lengths = torch.randint(max(1, tokens // 2), tokens + 1, (batch,), generator=generator)
    text_mask = torch.arange(tokens)[None, :] < lengths[:, None]
    targets = torch.zeros(batch, 1, image_size, image_size, dtype=torch.uint8)
    for row in range(batch):
        top, left = torch.randint(0, image_size // 2, (2,), generator=generator).tolist()
        targets[row, 0, top : top + image_size // 3, left : left + image_size // 4] = 1
        targets[row, 0, :, image_size * 3 // 4 :] = 255  # a resized 4:3 image leaves the right quarter as padding
    return images.to(device), text.to(device), text_mask.to(device), targets.to(device)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args()
    device = torch.device(args.device)
    use_bf16 = args.precision == "bf16"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    started = time.perf_counter()
    model = build_adapted_sam(
        args.variant, args.llm_dim, adapter_blocks=args.adapter_blocks, sam_checkpoint=args.sam_checkpoint,
        seed=args.seed, device=device,
    )
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    build_s = time.perf_counter() - started
    trainable = sum(p.numel() for p in model.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "%s: %.1fM parameters, %.1fM trainable, adapters at blocks %s, built in %.1f s",
        args.variant, total / 1e6, trainable / 1e6, model.adapter_blocks, build_s,
    )

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=args.lr, weight_decay=1e-4)
    images, text, text_mask, targets = synthetic_batch(
        args.batch, model.image_size, args.text_tokens, args.llm_dim, device, args.seed
    )

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    def train_step() -> float:
        with autocast():
            low_res = model(images, text, text_mask)
            logits = model.upscale_to_input(low_res)
        loss = mask_loss(logits.float(), targets).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        train_step()
    synchronize()

    with FlopCounterMode(display=False) as counter:
        train_step()
    step_flops = counter.get_total_flops()
    with torch.no_grad(), autocast(), FlopCounterMode(display=False) as forward_counter:
        model(images, text, text_mask)
    forward_flops = forward_counter.get_total_flops()
    synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    started = time.perf_counter()
    for _ in range(args.steps):
        losses.append(train_step())
    synchronize()
    elapsed = time.perf_counter() - started

    step_s = elapsed / args.steps
    achieved_tflops = step_flops / step_s / 1e12
    if device.type == "cuda":
        peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        memory_kind = "cuda max_memory_allocated"
    else:
        peak_memory_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        memory_kind = "process max RSS"
    summary = {
        "variant": args.variant,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "batch": args.batch,
        "text_tokens": args.text_tokens,
        "llm_dim": args.llm_dim,
        "adapter_blocks": model.adapter_blocks,
        "grad_checkpointing": args.grad_checkpointing,
        "trainable_params": trainable,
        "total_params": total,
        "steps": args.steps,
        "step_s": step_s,
        "samples_per_s": args.batch / step_s,
        "step_tflop": step_flops / 1e12,
        "forward_tflop": forward_flops / 1e12,
        "achieved_tflops": achieved_tflops,
        "peak_tflops": args.peak_tflops,
        "mfu": achieved_tflops / args.peak_tflops,
        "peak_memory_gib": peak_memory_gib,
        "memory_kind": memory_kind,
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
    }
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"stage2 {args.variant} {summary['device']} {args.precision} batch {args.batch}: "
        f"{summary['samples_per_s']:.2f} samples/s ({step_s * 1000:.0f} ms/step), "
        f"{summary['step_tflop']:.4g} TFLOP/step (forward {summary['forward_tflop']:.4g}), "
        f"{achieved_tflops:.4g} TFLOPS = {100 * summary['mfu']:.3g}% of {args.peak_tflops:g}, "
        f"peak memory {peak_memory_gib:.2f} GiB ({memory_kind}), loss {summary['first_loss']:.4f} -> "
        f"{summary['last_loss']:.4f}"
    )


if __name__ == "__main__":
    main()
