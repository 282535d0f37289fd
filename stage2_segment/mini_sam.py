"""Promptable, class-agnostic pretraining of the ``mini`` SAM on scenes of the demo world (no text).

The analogue of SAM's own pretraining at a small size: segment-anything's ``ImageEncoderViT``, ``PromptEncoder`` and
``MaskDecoder`` (the ``mini`` variant of ``stage2_segment.modeling.build``) learn to turn a box or a few points on an
object into that object's mask. Scenes come from ``manifests.demo.generate_demo_dataset``, read back through its
on-disk ReasonSeg format: every shape of a scene (except ``flag`` and ``ignore`` ones) is an object, rasterised alone
with ``shared.masks.reasonseg_mask``. Training uses SAM's input preprocessing, the project's BCE + DICE mask loss on
the single-mask output (the output stage 2 uses) plus an MSE loss on the IoU prediction head; box prompts get SAM's
coordinate noise (std 10% of the side, at most 20 px). Validation: mIoU of tight-box and one-point prompts on the val
split's objects, at the original image resolution (logits > 0), as stage 2 predicts.

``build_mini_sam(out_dir)`` writes ``out_dir/mini_sam.safetensors`` (keys ``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``, as official SAM checkpoints) and ``out_dir/mini_sam.json`` (settings, quality figures, losses), and
returns the figures. Everything is seeded: with the same seed, steps and thread count a rerun writes the same tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from shared.console import progress as tqdm  # tqdm on a terminal, plain lines in a log

from manifests.demo import REASONSEG_DIR, generate_demo_dataset
from shared.images import load_rgb
from shared.masks import reasonseg_mask
from stage2_segment.loss import mask_loss
from stage2_segment.modeling.build import build_sam_parts, get_variant
from stage2_segment.preprocess import IGNORE_LABEL, preprocess_image, preprocess_mask

logger = logging.getLogger(__name__)

VARIANT = "mini"
WEIGHTS_FILE = "mini_sam.safetensors"
INFO_FILE = "mini_sam.json"
DEFAULT_STEPS = 900
DEFAULT_TRAIN_SCENES = 2000
DEFAULT_VAL_SCENES = 100
BATCH_SIZE = 16
LR = 1e-3
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 30
SKIPPED_LABELS = ("flag", "ignore")


@dataclass
class ObjectSet:
    """Objects of one split. ``images`` Nx3xSxS (float16, preprocessed), per object: the image index, the SxS uint8
    target (1 object, 0 rest, 255 padding), the tight box (x0, y0, x1, y1) in input pixels, and what the original
    image and mask were (for evaluation at the original size)."""

    images: torch.Tensor
    image_of: list[int]
    targets: list[torch.Tensor]
    boxes: list[np.ndarray]
    input_sizes: list[tuple[int, int]]
    original_masks: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.image_of)


def scene_objects(scene_json: Path) -> tuple[Path, list[dict]]:
    """(image path, the object shapes) of one ReasonSeg-format scene file."""
    annotation = json.loads(scene_json.read_text(encoding="utf-8"))
    shapes = [s for s in annotation["shapes"] if not any(word in s["label"].lower() for word in SKIPPED_LABELS)]
    return scene_json.with_suffix(".jpg"), shapes


def load_objects(split_dir: Path, image_size: int) -> ObjectSet:
    """Every object of every scene in ``split_dir`` (sorted by file name), preprocessed for a SAM of ``image_size``."""
    images, image_of, targets, boxes, input_sizes, originals = [], [], [], [], [], []
    for scene_json in sorted(split_dir.glob("*.json")):
        image_path, shapes = scene_objects(scene_json)
        if not shapes:
            continue
        rgb = load_rgb(image_path)
        height, width = rgb.shape[:2]
        pixels, input_size = preprocess_image(rgb, image_size)
        scale = input_size[1] / width, input_size[0] / height
        for shape in shapes:
            mask = reasonseg_mask({"shapes": [shape]}, height, width)
            ys, xs = np.nonzero(mask == 1)
            if ys.size == 0:
                continue
            image_of.append(len(images))
            targets.append(preprocess_mask(mask, image_size, pad_label=IGNORE_LABEL))
            boxes.append(np.array([xs.min() * scale[0], ys.min() * scale[1],
                                   (xs.max() + 1) * scale[0], (ys.max() + 1) * scale[1]], np.float32))  # fmt: skip
            input_sizes.append(input_size)
            originals.append(mask == 1)
        images.append(pixels.half())
    if not images:
        raise ValueError(f"{split_dir}: no scene with an object")
    return ObjectSet(torch.stack(images), image_of, targets, boxes, input_sizes, originals)


def build_mini_parts(seed: int) -> torch.nn.ModuleDict:
    """The ``mini`` SAM's three modules, randomly initialised from ``seed`` (as ``build_adapted_sam`` does)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_encoder, prompt_encoder, mask_decoder = build_sam_parts(get_variant(VARIANT))
        torch.nn.init.trunc_normal_(image_encoder.pos_embed, std=0.02)
    return torch.nn.ModuleDict(
        {"image_encoder": image_encoder, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder}
    )


def load_mini_parts(path: Path) -> torch.nn.ModuleDict:
    """The mini SAM's three modules with the weights of a ``mini_sam.safetensors`` (or any mini SAM checkpoint)."""
    from stage2_segment.modeling.build import load_sam_state_dict

    parts = build_mini_parts(0)
    parts.load_state_dict(load_sam_state_dict(Path(path)), strict=True)
    return parts


def sample_prompt(
    objects: ObjectSet, k: int, rng: np.random.Generator, image_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A training prompt for object ``k``: half the time a noisy box (1x4), else 1-3 positive points (1xNx2, 1xN)."""
    box = objects.boxes[k]
    if rng.random() < 0.5:
        sides = np.array([box[2] - box[0], box[3] - box[1]] * 2, np.float32)
        noise = np.clip(rng.normal(0.0, 0.1, 4) * sides, -20.0, 20.0)
        noisy = np.clip(box + noise, 0, image_size)
        noisy = np.array([min(noisy[0], noisy[2]), min(noisy[1], noisy[3]),
                          max(noisy[0], noisy[2]), max(noisy[1], noisy[3])], np.float32)  # fmt: skip
        return torch.from_numpy(noisy)[None], None
    ys, xs = np.nonzero(objects.targets[k].numpy() == 1)
    picks = rng.integers(0, ys.size, size=int(rng.integers(1, 4)))
    points = np.stack([xs[picks] + 0.5, ys[picks] + 0.5], axis=1).astype(np.float32)
    return None, torch.from_numpy(points)[None]


def decode(
    parts: torch.nn.ModuleDict, image_embedding: torch.Tensor, box: torch.Tensor | None, points: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One object: 1xPxhxw embedding + a box (1x4) or points (1xNx2, all positive) -> (1x1x4hx4w logits, 1x1 IoU)."""
    point_arg = None if points is None else (points, torch.ones(points.shape[:2], dtype=torch.int64))
    sparse, dense = parts["prompt_encoder"](points=point_arg, boxes=box, masks=None)
    return parts["mask_decoder"](
        image_embeddings=image_embedding,
        image_pe=parts["prompt_encoder"].get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )


def training_loss(
    parts: torch.nn.ModuleDict, objects: ObjectSet, batch: np.ndarray, rng: np.random.Generator, image_size: int
) -> dict[str, torch.Tensor]:
    """Mask loss (BCE + 0.5 DICE at the input resolution) + IoU-head MSE over the objects ``batch``."""
    image_ids = [objects.image_of[k] for k in batch]
    embeddings = parts["image_encoder"](objects.images[image_ids].float())
    logits, iou_predictions = [], []
    for row, k in enumerate(batch):
        box, points = sample_prompt(objects, int(k), rng, image_size)
        row_logits, row_iou = decode(parts, embeddings[row : row + 1], box, points)
        logits.append(row_logits)
        iou_predictions.append(row_iou[:, 0])
    logits = F.interpolate(torch.cat(logits), (image_size, image_size), mode="bilinear", align_corners=False)
    targets = torch.stack([objects.targets[int(k)] for k in batch])
    losses = mask_loss(logits, targets)
    with torch.no_grad():
        valid = targets != IGNORE_LABEL
        predicted, truth = (logits[:, 0] > 0) & valid, (targets == 1)
        actual_iou = (predicted & truth).flatten(1).sum(1) / ((predicted | truth).flatten(1).sum(1).clamp(min=1))
    iou_loss = F.mse_loss(torch.cat(iou_predictions), actual_iou.float())
    return {"loss": losses.total + iou_loss, "mask": losses.total, "iou_head": iou_loss, "train_iou": actual_iou.mean()}


@torch.no_grad()
def prompt_miou(parts: torch.nn.ModuleDict, objects: ObjectSet, image_size: int, seed: int) -> dict[str, float]:
    """mIoU on ``objects`` at the original resolution, with the tight box and with one random positive point."""
    parts.eval()
    rng = np.random.default_rng([seed, 1])
    ious: dict[str, list[float]] = {"box": [], "point": []}
    for k in range(len(objects)):
        embedding = parts["image_encoder"](objects.images[objects.image_of[k] : objects.image_of[k] + 1].float())
        ys, xs = np.nonzero(objects.targets[k].numpy() == 1)
        pick = int(rng.integers(ys.size))
        point = torch.tensor([[[xs[pick] + 0.5, ys[pick] + 0.5]]], dtype=torch.float32)
        for kind, (box, points) in {"box": (torch.from_numpy(objects.boxes[k])[None], None), "point": (None, point)}.items():
            low_res, _ = decode(parts, embedding, box, points)
            truth = objects.original_masks[k]
            height, width = objects.input_sizes[k]
            upscaled = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
            full = F.interpolate(upscaled[..., :height, :width], truth.shape, mode="bilinear", align_corners=False)
            predicted = full[0, 0].numpy() > 0
            union = np.logical_or(predicted, truth).sum()
            ious[kind].append(float(np.logical_and(predicted, truth).sum() / union) if union else 1.0)
    parts.train()
    return {f"{kind}_miou": float(np.mean(values)) for kind, values in ious.items()} | {"val_objects": len(objects)}


def _lr_factor(step: int, total: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def save_weights(parts: torch.nn.ModuleDict, path: Path, metadata: dict[str, str]) -> None:
    """SAM-checkpoint keys (``image_encoder.*`` ...) as safetensors, written to a temporary name and renamed."""
    from safetensors.torch import save_file

    state = {key: tensor.detach().contiguous().clone() for key, tensor in parts.state_dict().items()}
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(state, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def build_mini_sam(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
    train_scenes: int = DEFAULT_TRAIN_SCENES,
    val_scenes: int = DEFAULT_VAL_SCENES,
    scenes_dir: Path | None = None,
) -> dict[str, Any]:
    """Pretrain the mini SAM and write ``out_dir/mini_sam.safetensors`` and ``out_dir/mini_sam.json``.

    Args:
        out_dir: folder for the two files (created).
        seed: seeds the initialisation, the object draws and the prompts (the scenes are the demo world's, seed 0).
        steps: optimizer steps (batch ``BATCH_SIZE`` objects); None = ``DEFAULT_STEPS``.
        progress: tqdm bars.
        train_scenes, val_scenes: scenes generated per split.
        scenes_dir: where to generate the scenes; None = a temporary folder, removed afterwards.
    Returns:
        ``{"box_miou", "point_miou", "val_objects", "train_objects", "steps", "seconds", "losses": [{"step", "loss",
        ...}], "weights": path, ...}``, also written to ``mini_sam.json``.
    """
    started = time.perf_counter()
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_size = get_variant(VARIANT).image_size
    with tempfile.TemporaryDirectory(prefix="mini-sam-scenes-") as temporary:
        root = generate_demo_dataset(Path(scenes_dir or temporary), n_train=train_scenes, n_val=val_scenes)
        train_objects = load_objects(root / "train", image_size)
        val_objects = load_objects(root / "val", image_size)
    logger.info("mini SAM: %d train objects, %d val objects", len(train_objects), len(val_objects))

    parts = build_mini_parts(seed)
    parameters = [p for p in parts.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: _lr_factor(k, steps))
    draw_rng = np.random.default_rng([seed, 0])
    losses = []
    bar = tqdm(range(steps), desc="mini SAM pretraining", unit="step", disable=not progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in bar:
            batch = draw_rng.integers(0, len(train_objects), size=BATCH_SIZE)
            terms = training_loss(parts, train_objects, batch, draw_rng, image_size)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            record = {"step": step + 1, **{name: round(float(value.detach()), 5) for name, value in terms.items()}}
            losses.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", iou=f"{record['train_iou']:.3f}")
    quality = prompt_miou(parts, val_objects, image_size, seed)
    summary = {
        "variant": VARIANT,
        **quality,
        "train_objects": len(train_objects),
        "train_scenes": train_scenes,
        "val_scenes": val_scenes,
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "weights": str(out_dir / WEIGHTS_FILE),
    }
    reproducible = {key: value for key, value in summary.items() if key not in ("seconds", "weights")}
    # One metadata key: safetensors writes several in hash order, which would change the file's bytes run to run.
    save_weights(parts, out_dir / WEIGHTS_FILE, {"mini_sam": json.dumps(reproducible, sort_keys=True)})
    recorded = {**summary, "weights": WEIGHTS_FILE, "losses": losses}  # the file name: the folder may move
    (out_dir / INFO_FILE).write_text(json.dumps(recorded, indent=1) + "\n", encoding="utf-8")
    logger.info("mini SAM: box mIoU %.4f, point mIoU %.4f on %d val objects; %.0f s",
                quality["box_miou"], quality["point_miou"], quality["val_objects"], summary["seconds"])  # fmt: skip
    return {**summary, "losses": losses}
