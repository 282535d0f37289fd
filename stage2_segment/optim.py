"""One stage-2 optimisation step and what it is made of: AdamW from the config, the LR schedule, the loss of a batch,
the cross-worker gradient average and gradient clipping.

``optimizer_step`` accumulates the micro-batches' gradients, averages them over workers, clips their global L2 norm
at ``stage2.grad_clip_norm`` (LISA: 1.0; 0 = off) and steps the optimizer, built by ``build_optimizer`` with
``stage2.adam_betas`` (LISA: (0.9, 0.95)). A NaN or infinite loss or gradient norm raises ``NonFiniteLossError`` before
the optimizer steps; the training loop then records the step in ``diverged.json`` and ``train`` raises
``TrainingDivergedError`` without exporting anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shared.config import Stage2Config
from shared.shards import write_json_atomic
from stage2_segment.loss import MaskLoss, mask_loss
from stage2_segment.modeling import AdaptedSam


def build_optimizer(parameters: Iterable[torch.nn.Parameter], stage2: Stage2Config) -> torch.optim.AdamW:
    """AdamW over the trained parameters with ``stage2.lr``, ``weight_decay`` and ``adam_betas``."""
    beta1, beta2 = stage2.adam_betas
    return torch.optim.AdamW(list(parameters), lr=stage2.lr, betas=(beta1, beta2), weight_decay=stage2.weight_decay)


def lr_schedule(warmup: int, total: int):
    """LambdaLR factor for optimizer step ``k`` (0-based): linear warmup to 1 over ``warmup`` steps, then linear decay
    to 0 at ``total`` (LISA's WarmupDecayLR)."""

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return max(0.0, (total - k) / max(1, total - warmup))

    return factor


def forward_loss(
    model: AdaptedSam, batch: dict[str, Any], stage2: Stage2Config, device: torch.device, use_bf16: bool
) -> MaskLoss:
    """Loss of one collated batch at the padded input resolution (padding is labelled 255 and ignored)."""
    images = batch["images"].to(device, non_blocking=True)
    text = batch["text_embeds"].to(device, non_blocking=True)
    text_mask = batch["text_mask"].to(device, non_blocking=True)
    targets = batch["targets"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        low_res = model(images, text, text_mask)
    return mask_loss(model.upscale_to_input(low_res.float()), targets, stage2.bce_weight, stage2.dice_weight)


def average_gradients(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """Mean of the trained parameters' gradients over workers, in one flat all-reduce (missing gradients count as 0)."""
    if world_size <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        parameter.grad = flat[offset : offset + count].view_as(parameter).clone()
        offset += count


NON_FINITE_KEYS = ("loss", "bce", "dice", "grad_norm")  # checked after every step, named in this order


class NonFiniteLossError(ValueError):
    """A step whose loss or gradient norm is NaN or infinite; raised before the optimizer steps, so the weights (and
    every checkpoint) stay finite. Every worker raises it at the same step: the values are all-reduced first."""

    def __init__(self, step_values: dict[str, float]) -> None:
        shown = ", ".join(f"{key} {value}" for key, value in step_values.items())
        super().__init__(f"non-finite training values ({shown}); check stage2.lr, the loss weights and the data")
        self.values = step_values


def optimizer_step(
    model: AdaptedSam,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[dict[str, Any]],
    stage2: Stage2Config,
    device: torch.device,
    use_bf16: bool = False,
    world_size: int = 1,
) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (gradient accumulation, cross-worker average, clipping at
    ``stage2.grad_clip_norm`` when > 0); returns the mean loss, bce and dice over all workers' samples, the sample
    count and ``grad_norm`` (the averaged gradients' global L2 norm before clipping).

    Raises:
        NonFiniteLossError: the loss or the gradient norm is not finite; the optimizer has not stepped.
    """
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    micro_batches = list(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(4, dtype=torch.float32, device=device)  # sums of loss, bce, dice; samples
    for batch in micro_batches:
        losses = forward_loss(model, batch, stage2, device, use_bf16)
        (losses.total / len(micro_batches)).backward()
        count = len(batch["sample_ids"])
        totals += torch.stack([losses.total.detach(), losses.bce.detach(), losses.dice.detach(),
                               torch.ones((), device=device)]) * count  # fmt: skip
    average_gradients(parameters, world_size)
    if world_size > 1:
        dist.all_reduce(totals)
    loss_sum, bce_sum, dice_sum, samples = totals.tolist()
    result = {"loss": loss_sum / samples, "bce": bce_sum / samples, "dice": dice_sum / samples, "samples": samples}
    gradients = [p for p in parameters if p.grad is not None]
    max_norm = stage2.grad_clip_norm if stage2.grad_clip_norm > 0 else float("inf")
    result["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(gradients, max_norm)) if gradients else 0.0
    if not all(math.isfinite(result[key]) for key in NON_FINITE_KEYS):
        raise NonFiniteLossError({key: result[key] for key in NON_FINITE_KEYS})
    optimizer.step()
    return result


DIVERGED_FILE = "diverged.json"  # in the training's output folder: the step that went non-finite


class TrainingDivergedError(ValueError):
    """A training run stopped at a non-finite step; the last finite checkpoint is kept and nothing was exported."""


def record_divergence(output_dir: Path, step: int, error: NonFiniteLossError, last_checkpoint: Path | None) -> None:
    """Rank 0: write ``diverged.json`` (step, the values, the checkpoint kept) for the driver to raise from."""
    record = {"step": step, "values": error.values,
              "last_checkpoint": str(last_checkpoint) if last_checkpoint else None}
    write_json_atomic(Path(output_dir) / DIVERGED_FILE, record)


def divergence_error(output_dir: Path, name: str) -> TrainingDivergedError | None:
    """The error to raise when the run in ``output_dir`` recorded a non-finite step, else None."""
    path = Path(output_dir) / DIVERGED_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    values = ", ".join(f"{key} {record['values'][key]}" for key in NON_FINITE_KEYS if key in record["values"])
    kept = record["last_checkpoint"] or "none (it diverged before the first checkpoint)"
    return TrainingDivergedError(
        f"stage-2 training {name} stopped at step {record['step']}: non-finite training values ({values}); nothing "
        f"was exported; last finite checkpoint kept: {kept}. Check stage2.lr, the loss weights and the data."
    )
