"""Train the mini LLaVA on the demo world and write it as a complete Hugging Face model folder.

Three phases, deterministic for a seed (same seed and thread count -> the same weights on the same machine):

1. **Vision alignment** (``VISION_STEPS``): the CLIP tower learns, from the second-to-last layer LLaVA reads, the colour
   and shape of the object under each image patch (two linear heads, dropped afterwards). Cheap: no decoder pass.
   Colour is learnt at once, shape slowly (read right on 31% of val object patches after 200 steps, 84% after 1000),
   and the decoder cannot bind a shape the tower does not encode: with 200 steps the model named the right colour
   with the wrong shape ("the red object" -> "the red circle" for a red triangle).
2. **Grounding** (``GROUND_STEPS`` of ``GROUND_BATCH``): the whole LLaVA on the bare query -> "It is the X." plus the
   attribute sentences (the ``ground`` task). Short sequences whose loss falls on the words that depend on the image:
   here the model learns to find the object a query means. Trained on the paper's long prompts from the start, the
   same model learnt the templates and still named the right target at chance after 1500 steps.
3. **Instruction tuning** (``STEPS``): the whole LLaVA (tower, projector, decoder) on the world's chain-of-thought
   conversations (``mini_llava_data``), teacher forcing, loss on the assistant's tokens only, the grounding task
   still in the mix. Every batch holds one task (step 1, merged steps 2+3, step 2 alone, grounding) so that sequences
   of a batch have similar lengths.

Phases 2 and 3 share one schedule (warm-up, cosine); ``stop_after`` ends a run early on the same schedule and
``cooldown`` lowers the rate early (see ``_cooled``). The loss weights the grounding words ``KEY_WEIGHT`` times.

Every example is a fresh train-split scene of ``data.demo_seed`` 0; val and test scenes are never seen. The summary
(returned, and written to ``mini_llava.json`` in the folder) holds the losses of every logged step and the
teacher-forced loss, token accuracy and grounding-word accuracy on val conversations, before, during and after.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from shared.console import progress as tqdm  # tqdm on a terminal, plain lines in a log

from manifests.demo import render_scene
from manifests.demo_text import queries
from stage1_reason import prompts
from stage1_reason.mini_llava_data import (
    COLOUR_CLASSES,
    IGNORE,
    KEY_WORDS,
    SHAPE_CLASSES,
    TASK_WEIGHTS,
    TASKS,
    collate,
    conversation,
    patch_labels,
    random_conversation,
)
from stage1_reason.mini_llava_model import make_config, make_processor, new_model, save_model, tokenizer_corpus, \
    train_tokenizer  # fmt: skip

logger = logging.getLogger(__name__)

MINI_LLAVA_FORMAT = 1
SUMMARY_NAME = "mini_llava.json"
STEPS = 1500  # the instruction-tuning schedule's length (warm-up, cosine)
STOP_AFTER = None
COOLDOWN = None
BATCH = 8
VISION_STEPS = 2000  # patch-level shape accuracy on val: 0.31 after 200 steps, 0.84 after 1000
VISION_BATCH = 24
GROUND_STEPS = 500  # grounding phase: the "ground" task alone, before the task mix
GROUND_BATCH = 32
LR = 1e-3
VISION_LR = 2e-3
WARMUP = 30
LOG_EVERY = 10
VAL_EVERY = 250  # teacher-forced val figures every this many steps (in the summary's "val_curve")
VAL_CONVERSATIONS = 36
# The words that ground an answer (the target's colour and shape, what tells twins apart) carry KEY_WEIGHT times the
# loss of a template word: without it the templates, most of every answer's tokens, dominate the gradient.
KEY_WEIGHT = 4.0
VISION_SCENE_OFFSET = 1_000_000  # vision-phase scenes: train split, indices far from the instruction-tuning ones


def _log_every(steps: int) -> int:
    """Mean loss every LOG_EVERY steps; every step in short runs."""
    return LOG_EVERY if steps >= 2 * LOG_EVERY else 1


def _lr_at(step: int, total: int, peak: float) -> float:
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, total - WARMUP)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _cooled(lr: float, step: int, cooldown: tuple[int, int] | None) -> float:
    """``cooldown = (start, length)``: from step ``start`` on, the scheduled rate falls linearly to 10% of itself
    over ``length`` steps (an early stop that still ends on a low learning rate)."""
    if cooldown is None or step < cooldown[0]:
        return lr
    return lr * max(0.1, 1.0 - 0.9 * (step - cooldown[0] + 1) / cooldown[1])


def _vision_phase(model: Any, processor: Any, steps: int, progress: bool) -> list[dict]:
    """Patch-level colour and shape classification on the tower's feature layer; returns the logged losses."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({
        "colour": torch.nn.Linear(width, len(COLOUR_CLASSES)), "shape": torch.nn.Linear(width, len(SHAPE_CLASSES)),
    })  # fmt: skip
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=VISION_LR, weight_decay=0.01)
    layer = model.config.vision_feature_layer
    logged, window = [], []
    for step in tqdm(range(steps), desc="mini-llava vision", unit="step", disable=not progress):
        samples = [render_scene("train", VISION_SCENE_OFFSET + step * VISION_BATCH + i, 0) for i in range(VISION_BATCH)]
        pixels = processor.image_processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
        labels = [patch_labels(s) for s in samples]
        colours = torch.from_numpy(np.stack([c for c, _ in labels])).flatten()
        shapes = torch.from_numpy(np.stack([s for _, s in labels])).flatten()
        features = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]  # BxNxC, CLS dropped
        features = features.reshape(-1, width)
        loss = torch.nn.functional.cross_entropy(heads["colour"](features), colours) + \
            torch.nn.functional.cross_entropy(heads["shape"](features), shapes)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, VISION_LR)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % _log_every(steps) == 0 or step + 1 == steps:
            logged.append({"step": step + 1, "loss": round(sum(window) / len(window), 5)})
            window = []
    return logged


def _val_batches(processor: Any, prompt_versions: list[str]) -> list[dict]:
    """Fixed val conversations (every task, the first query of each scene), batched by task."""
    batches = []
    for task in TASKS:
        convos = []
        for index in range(VAL_CONVERSATIONS // len(TASKS)):
            sample = render_scene("val", index, 0)
            query, explanation = (queries(sample.scene, True) + queries(sample.scene, False))[0]
            convos.append(conversation(sample, query, explanation, task, prompt_versions[index % len(prompt_versions)]))
        batches.append(collate(processor, convos))
    return batches


def key_token_ids(processor: Any) -> torch.Tensor:
    """Token ids of the ``KEY_WORDS`` as they follow a space (each is one token of the trained tokenizer)."""
    ids = set()
    for word in KEY_WORDS:
        pieces = processor.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:
            ids.add(pieces[0])
    return torch.tensor(sorted(ids), dtype=torch.long)


def _token_losses(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token cross-entropy, next-token predictions, labels) over the assistant tokens of a batch."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    losses = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="none")
    return losses, logits.argmax(-1)[mask], labels[mask]


def weighted_loss(model: Any, batch: dict, key_ids: torch.Tensor, key_weight: float = KEY_WEIGHT) -> torch.Tensor:
    """Mean cross-entropy over the assistant tokens, the key words weighted ``key_weight``."""
    losses, _, labels = _token_losses(model, batch)
    weights = 1.0 + (key_weight - 1.0) * torch.isin(labels, key_ids).float()
    return (losses * weights).sum() / weights.sum()


@torch.no_grad()
def _val_figures(model: Any, batches: list[dict], key_ids: torch.Tensor) -> dict:
    """Teacher-forced loss and next-token accuracy over the val conversations' assistant tokens; the accuracy on the
    key words, over all tasks and over the step-1 task alone (where nothing earlier in the conversation names them)."""
    model.eval()
    total_loss = correct = count = 0.0
    key = {"all": [0, 0], "reason": [0, 0]}
    for task, batch in zip(TASKS, batches):
        losses, predicted, labels = _token_losses(model, batch)
        total_loss += losses.sum().item()
        correct += (predicted == labels).sum().item()
        count += labels.numel()
        is_key = torch.isin(labels, key_ids)
        hits = (predicted[is_key] == labels[is_key]).sum().item()
        for name in ("all", task):
            if name in key:
                key[name][0] += hits
                key[name][1] += is_key.sum().item()
    model.train()
    return {
        "val_loss": round(total_loss / count, 5), "val_token_accuracy": round(correct / count, 5),
        "val_key_accuracy": round(key["all"][0] / max(1, key["all"][1]), 5),
        "val_step1_key_accuracy": round(key["reason"][0] / max(1, key["reason"][1]), 5),
    }  # fmt: skip


def _train_phase(model: Any, processor: Any, steps: int, batch_size: int, seed: int, progress: bool,
                 prompt_versions: list[str], val_batches: list[dict], stop_after: int | None = None,
                 cooldown: tuple[int, int] | None = None, ground: tuple[int, int] = (0, 0),
                 ) -> tuple[list[dict], dict]:  # fmt: skip
    """``ground = (steps, batch)``: that many steps of the ``ground`` task alone come first; then ``steps`` steps of
    the task mix. One schedule (warm-up, cosine) spans both."""
    rng = random.Random(f"mini-llava-{seed}")
    ground_steps, ground_batch = ground
    steps = ground_steps + steps
    stop_after = None if stop_after is None else ground_steps + stop_after
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    key_ids = key_token_ids(processor)
    before = _val_figures(model, val_batches, key_ids)
    logged, window, curve = [], [], []
    model.train()
    for step in tqdm(range(steps), desc="mini-llava train", unit="step", disable=not progress):
        if stop_after is not None and step >= stop_after:
            break
        grounding = step < ground_steps
        task = "ground" if grounding else rng.choices(TASKS, weights=TASK_WEIGHTS)[0]
        size = ground_batch if grounding else batch_size
        first = step * ground_batch if grounding else ground_steps * ground_batch + (step - ground_steps) * batch_size
        convos = [random_conversation(rng, first + i, 0, prompt_versions, task) for i in range(size)]
        batch = collate(processor, convos)
        for group in optimizer.param_groups:
            group["lr"] = _cooled(_lr_at(step, steps, LR), step, cooldown)
        loss = weighted_loss(model, batch, key_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % _log_every(steps) == 0 or step + 1 in (steps, stop_after):
            logged.append({"step": step + 1, "loss": round(sum(window) / len(window), 5)})
            logger.debug("mini-llava step %d: loss %.4f", step + 1, logged[-1]["loss"])
            window = []
        if (step + 1) % VAL_EVERY == 0:
            curve.append({"step": step + 1, **_val_figures(model, val_batches, key_ids)})
            logger.info("mini-llava step %d: %s", step + 1, curve[-1])
    after = _val_figures(model, val_batches, key_ids)
    return logged, {"before": before, "after": after, "curve": curve}


def training_prompt_versions() -> list[str]:
    """Every prompt version in ``prompts.PROMPTS``: the model learns to answer each of them."""
    return sorted(prompts.PROMPTS)


def build_mini_llava(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: bool = True,
    batch_size: int = BATCH,
    stop_after: int | None = None,
    cooldown: tuple[int, int] | None = None,
) -> dict:
    """Train the mini LLaVA (``steps`` instruction-tuning steps of ``batch_size`` conversations, default ``STEPS`` x
    ``BATCH``, after the grounding steps; the vision and grounding phases scale with ``steps``) and write the model folder to ``out_dir`` (staged in a sibling
    temporary folder, then renamed). Returns the summary: recipe, parameter count, seconds, logged losses of both
    phases, val figures before and after.

    ``stop_after`` ends instruction tuning after that many steps of the ``steps``-long schedule, and ``cooldown =
    (start, length)`` lowers the rate linearly from step ``start`` (see ``_cooled``); the committed weights were made
    with ``COOLDOWN`` and no early stop (weights/README.md)."""
    torch.manual_seed(seed)
    if steps is None:  # the recipe of the committed weights
        steps, stop_after, cooldown = STEPS, STOP_AFTER if stop_after is None else stop_after, cooldown or COOLDOWN
    default = steps == STEPS and batch_size == BATCH
    vision_steps = VISION_STEPS if default else max(1, round(steps * VISION_STEPS / STEPS))
    ground = (GROUND_STEPS, GROUND_BATCH) if default else (max(1, round(steps * GROUND_STEPS / STEPS)), 4 * batch_size)
    versions = training_prompt_versions()
    started = time.perf_counter()
    processor = make_processor(train_tokenizer(tokenizer_corpus(seed=0)))
    model = new_model(make_config(processor), seed)
    model.train()
    vision_losses = _vision_phase(model, processor, vision_steps, progress)
    vision_seconds = time.perf_counter() - started
    val_batches = _val_batches(processor, versions)
    losses, val = _train_phase(model, processor, steps, batch_size, seed, progress, versions, val_batches,
                               stop_after, cooldown, ground)  # fmt: skip
    model.eval()
    summary = {
        "format": MINI_LLAVA_FORMAT,
        "seed": seed,
        "steps": steps,
        "vision_steps": vision_steps,
        "ground_steps": ground[0],
        "ground_batch": ground[1],
        "stop_after": stop_after,
        "cooldown": list(cooldown) if cooldown else None,
        "batch": batch_size,
        "vision_batch": VISION_BATCH,
        "lr": LR,
        "prompt_versions": versions,
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision_seconds": round(vision_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "vision_losses": vision_losses,
        "key_weight": KEY_WEIGHT,
        "losses": losses,
        "val_curve": val["curve"],
        **{f"{name}_before": value for name, value in val["before"].items()},
        **val["after"],
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_model(model, processor, staging)
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "mini-llava: %d steps in %.0f s, loss %.3f -> %.3f, val loss %.3f, val token accuracy %.3f -> %s",
        steps, summary["seconds"], losses[0]["loss"], losses[-1]["loss"], summary["val_loss"],
        summary["val_token_accuracy"], out_dir,
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m stage1_reason.mini_llava OUT_DIR [--seed N] [--steps N] [--stop-after N] [--cooldown S L]
    [--threads N]``; without options, the recipe of the committed weights."""
    import argparse

    parser = argparse.ArgumentParser(description="train the mini LLaVA on the demo world")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--stop-after", type=int, default=None, help="end after this many steps of the schedule")
    parser.add_argument("--cooldown", type=int, nargs=2, default=None, metavar=("START", "LENGTH"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the recorded weights used 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = build_mini_llava(args.out_dir, seed=args.seed, steps=args.steps, stop_after=args.stop_after,
                               cooldown=tuple(args.cooldown) if args.cooldown else None)  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("losses")}, indent=1))


if __name__ == "__main__":
    main()
