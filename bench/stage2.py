"""Stage-2 training throughput on CPU and where a step's time goes: frozen SAM encoder vs the trained parts.

One training step = projector -> adapted encoder -> per-row mask decoder -> upsample + BCE/DICE -> backward -> AdamW,
on a synthetic batch (float16 text as stored in shards). Throughput comes from plain steps. The split comes from the
same step cut into pieces at detached boundaries (projector | encoder | decoder | upsample + loss | optimizer), each
timed forward and backward (the gradients are those of the uncut step; CPU execution is synchronous, so wall-clock
intervals are exact); inside the encoder, module hooks split the frozen blocks from the adapters. The frozen encoder's
share counts its forward and the backward that flows through its blocks after the first adapter (needed for the
adapters' gradients). Also times the data path per sample on the demo dataset: image decode +
resize/normalise + mask rasterisation + mask resize.

    .venv/bin/python bench/stage2.py                          # tiny SAM, batch 4, 1 thread (a Ray worker's share)
    .venv/bin/python bench/stage2.py --threads 2 --batch 8
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from stage2_segment.loss import mask_loss
from stage2_segment.modeling import AdaptedSam, build_adapted_sam

logger = logging.getLogger("bench.stage2")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--llm-dim", type=int, default=128, help="128 = the tiny LLaVA's hidden size")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data-samples", type=int, default=32, help="demo samples for the data-path timing; 0 = skip")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args()


class EncoderTimer:
    """Forward and backward wall time of the encoder's frozen modules vs its adapters (module hooks; every call inside
    the encoder passes its tensors positionally, so full backward hooks see them)."""

    def __init__(self, model: AdaptedSam) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[tuple[int, str], float] = {}
        first_adapter = min(model.adapter_blocks)
        encoder = model.image_encoder
        self._watch(encoder.patch_embed, "frozen encoder, before the first adapter (no grad)")
        for index, block in enumerate(encoder.blocks):
            before = index <= first_adapter
            self._watch(block, "frozen encoder, before the first adapter (no grad)" if before else
                        "frozen encoder, after the first adapter")  # fmt: skip
        self._watch(encoder.neck, "frozen encoder, after the first adapter")
        for adapter in model.adapters.values():
            self._watch(adapter, "adapters (trained)")

    def _watch(self, module: nn.Module, group: str) -> None:
        key = id(module)

        def start(kind: str):
            def hook(*_):
                self._started[(key, kind)] = time.perf_counter()

            return hook

        def stop(kind: str):
            def hook(*_):
                self.seconds[f"{group}|{kind}"] += time.perf_counter() - self._started.pop((key, kind))

            return hook

        module.register_forward_pre_hook(start("forward"))
        module.register_forward_hook(stop("forward"))
        module.register_full_backward_pre_hook(start("backward"))
        module.register_full_backward_hook(stop("backward"))


def timed_step(model, optimizer, batch, timer: EncoderTimer, seconds: dict[str, float]) -> float:
    """One training step cut into separately timed pieces at detached boundaries (projector | encoder | decoder |
    upsample + loss | optimizer); the gradients are exactly those of the uncut step."""
    images, text, text_mask, targets = batch

    def clock(name: str, work):
        started = time.perf_counter()
        out = work()
        seconds[name] += time.perf_counter() - started
        return out

    prompts = clock("projector (trained)|forward", lambda: model.project_text(text))
    prompts_for_encoder = prompts.detach().requires_grad_()
    prompts_for_decoder = prompts.detach().requires_grad_()
    embedding = clock("encoder|forward", lambda: model.encode_image(images, prompts_for_encoder, text_mask))
    embedding_leaf = embedding.detach().requires_grad_()
    low_res = clock("mask decoder (trained)|forward",
                    lambda: model.decode_masks(embedding_leaf, prompts_for_decoder, text_mask))  # fmt: skip
    low_res_leaf = low_res.detach().requires_grad_()
    loss = clock("upsample + BCE/DICE|forward",
                 lambda: mask_loss(model.upscale_to_input(low_res_leaf), targets).total)  # fmt: skip
    clock("upsample + BCE/DICE|backward", loss.backward)
    clock("mask decoder (trained)|backward", lambda: low_res.backward(low_res_leaf.grad))
    clock("encoder|backward", lambda: embedding.backward(embedding_leaf.grad))
    clock("projector (trained)|backward",
          lambda: prompts.backward(prompts_for_encoder.grad + prompts_for_decoder.grad))  # fmt: skip
    clock("optimizer (AdamW)|step", optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def time_data_path(samples: int) -> float | None:
    """Seconds per sample to decode, resize and normalise an image and rasterise + resize its mask (demo data)."""
    if samples <= 0:
        return None
    from manifests.demo import generate_demo_dataset
    from manifests.registry import build_manifest
    from shared.images import load_rgb
    from shared.masks import rasterize
    from stage2_segment.preprocess import preprocess_image, preprocess_mask

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as folder:
        data_root = Path(folder) / "data"
        generate_demo_dataset(data_root, n_train=max(1, samples // 2), n_val=0)
        manifest = build_manifest("reasonseg", data_root, "train", Path(folder) / "train.parquet").path
        rows = pq.read_table(manifest).to_pylist()[:samples]
        started = time.perf_counter()
        for row in rows:
            preprocess_image(load_rgb(data_root / row["image_path"]), 256)
            preprocess_mask(rasterize(row["mask"], row["height"], row["width"], data_root), 256)
        return (time.perf_counter() - started) / len(rows)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = build_adapted_sam(args.variant, args.llm_dim, seed=0)
    model.train()
    optimizer = torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-4, weight_decay=1e-4)
    size = model.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    text = torch.randn(args.batch, args.text_tokens, args.llm_dim, generator=generator).half()
    text_mask = torch.ones(args.batch, args.text_tokens, dtype=torch.bool)
    text_mask[:, args.text_tokens * 3 // 4 :] = False
    targets = torch.zeros(args.batch, size, size, dtype=torch.uint8)
    targets[:, size // 4 : size // 2, size // 4 : size // 2] = 1
    targets[:, :, size * 3 // 4 :] = 255
    batch = (images, text, text_mask, targets)

    def plain_step() -> float:
        loss = mask_loss(model.upscale_to_input(model(images, text, text_mask)), targets).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        plain_step()
    started = time.perf_counter()
    losses = [plain_step() for _ in range(args.steps)]
    total = time.perf_counter() - started

    timer = EncoderTimer(model)
    pieces: dict[str, float] = defaultdict(float)
    timed_step(model, optimizer, batch, timer, defaultdict(float))
    timer.seconds.clear()
    started = time.perf_counter()
    for _ in range(args.steps):
        timed_step(model, optimizer, batch, timer, pieces)
    timed_total = time.perf_counter() - started
    parts = {name: value for name, value in pieces.items() if not name.startswith("encoder|")}
    parts.update(timer.seconds)
    for kind in ("forward", "backward"):
        inside = sum(value for name, value in timer.seconds.items() if name.endswith(kind))
        parts[f"encoder glue (position embedding, reshapes)|{kind}"] = pieces[f"encoder|{kind}"] - inside
    parts["python between the pieces|remainder"] = timed_total - sum(pieces.values())
    frozen = sum(seconds for name, seconds in parts.items() if name.startswith(("frozen", "encoder glue")))
    data_s = time_data_path(args.data_samples)
    summary = {
        "variant": args.variant,
        "threads": args.threads,
        "batch": args.batch,
        "samples_per_s": args.batch * args.steps / total,
        "step_ms": 1000 * total / args.steps,
        "timed_step_ms": 1000 * timed_total / args.steps,
        "frozen_encoder_share": frozen / timed_total,
        "trained_parts_share": 1 - frozen / timed_total,
        "parts_share": {name: seconds / timed_total for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1])},
        "data_ms_per_sample": 1000 * data_s if data_s else None,
        "loss": [losses[0], losses[-1]],
    }
    print(f"stage2 train step, {args.variant} SAM, batch {args.batch}, {args.threads} thread(s), CPU: "
          f"{summary['samples_per_s']:.1f} samples/s ({summary['step_ms']:.0f} ms/step)")  # fmt: skip
    print(f"time split of the same step cut at detached boundaries ({summary['timed_step_ms']:.0f} ms/step):")
    for name, share in summary["parts_share"].items():
        group, kind = name.split("|")
        print(f"  {100 * share:5.1f}%  {group} [{kind}]")
    print(f"  frozen encoder (forward + backward through it) {100 * summary['frozen_encoder_share']:.1f}% of the step; "
          f"trained parts, loss and optimizer {100 * summary['trained_parts_share']:.1f}%")  # fmt: skip
    if data_s:
        print(f"data path (decode + resize + rasterise, 1 process): {1000 * data_s:.1f} ms/sample = "
              f"{1 / data_s:.0f} samples/s")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
