"""Stage-2 checkpoints: only the trained parts, plus everything needed to rebuild the model and continue training.

A checkpoint is a folder::

    trainable.safetensors   projector, adapters and mask decoder (``AdaptedSam.trainable_state_dict()``)
    checkpoint.json         step, model build args, frozen SAM checkpoint path + sha256 (null for a random tiny SAM),
                            data sampler position, sources, last metrics
    resolved_config.json    the configuration that produced it
    training_state.pt       optimizer and LR-scheduler state dicts (absent from the exported ``final`` folder)
    COMPLETE                written last: the only proof the folder is whole

Folders are written under a temporary name and renamed, and ``COMPLETE`` is written before the rename, so a killed
writer never leaves a folder that looks complete. ``training_state.pt`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.config import PipelineConfig
from shared.shards import write_json_atomic
from stage2_segment.modeling import AdaptedSam, build_adapted_sam, sha256_of

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "trainable.safetensors"
META_FILE = "checkpoint.json"
TRAINING_STATE_FILE = "training_state.pt"
COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_FORMAT = "llavaseg-stage2-checkpoint-v1"
_STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, of another format, or does not match its model or SAM weights."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file() and (Path(folder) / META_FILE).is_file()


def write_checkpoint(
    folder: Path,
    model: AdaptedSam,
    meta: dict[str, Any],
    config: PipelineConfig,
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint folder at ``folder`` (replacing one that is there); returns ``folder``."""
    folder = Path(folder)
    temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.trainable_state_dict().items()}
    save_file(state, str(temporary / WEIGHTS_FILE))
    meta = dict(meta, format=CHECKPOINT_FORMAT, trainable_keys=len(state))
    write_json_atomic(temporary / META_FILE, meta)
    config.write_resolved(temporary)
    if training_state is not None:
        torch.save(training_state, temporary / TRAINING_STATE_FILE)
    write_json_atomic(temporary / COMPLETE_MARKER, {"step": meta.get("step")})
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder


# Keys of checkpoint.json that loading needs, with their types; checked so that a hand-edited file fails naming them.
META_KEYS = {"format": str, "step": int, "train_name": str, "model": dict}
MODEL_KEYS = {"variant": str, "llm_dim": int, "adapter_blocks": list, "seed": int}
RANDOM_SAM_VARIANTS = ("tiny",)  # the only variant that may be built without frozen SAM weights


def read_meta(folder: Path) -> dict[str, Any]:
    """``checkpoint.json`` of a complete checkpoint; raises CheckpointError naming the file and the key when it is
    incomplete, not JSON, of another format, lacks a key the model needs, or names a SAM variant without weights."""
    folder = Path(folder)
    if not is_complete(folder):
        raise CheckpointError(f"{folder}: not a complete stage-2 checkpoint (no {COMPLETE_MARKER} marker)")
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{folder}: format {meta.get('format')!r}, this code reads {CHECKPOINT_FORMAT!r}")
    for keys, node, prefix in ((META_KEYS, meta, ""), (MODEL_KEYS, meta.get("model"), "model.")):
        for key, kind in keys.items():
            value = node.get(key) if isinstance(node, dict) else None
            if not isinstance(value, kind) or isinstance(value, bool):
                found = "missing" if not isinstance(node, dict) or key not in node else f"{value!r}"
                raise CheckpointError(f"{path}: key {prefix}{key} is {found}, expected {kind.__name__}")
    variant, sam = meta["model"]["variant"], meta.get("sam_checkpoint")
    if variant not in RANDOM_SAM_VARIANTS and not (isinstance(sam, dict) and sam.get("path") and sam.get("sha256")):
        raise CheckpointError(f"{path}: key sam_checkpoint is {sam!r}, but model.variant {variant!r} needs its frozen "
                              "SAM weights (path and sha256); refusing to evaluate with random weights")  # fmt: skip
    return meta


def list_complete(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete ``step_NNNNNN`` folder, by step."""
    found = []
    if Path(checkpoints_dir).is_dir():
        for folder in Path(checkpoints_dir).iterdir():
            match = _STEP_DIR_RE.match(folder.name)
            if match and is_complete(folder):
                found.append((int(match.group(1)), folder))
    return sorted(found)


def find_latest(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_complete(checkpoints_dir)
    return found[-1][1] if found else None


def prune(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Keep the ``keep`` newest complete checkpoints; drop older ones and leftovers of killed writers. Returns the
    complete checkpoints it dropped."""
    dropped = [folder for _, folder in (list_complete(checkpoints_dir)[:-keep] if keep > 0 else [])]
    for folder in dropped:
        shutil.rmtree(folder, ignore_errors=True)
    for leftover in Path(checkpoints_dir).glob("step_*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return dropped


def publish_checkpoint(store: Any, folder: Path, metrics_path: Path | None = None, dropped: list[Path] = ()) -> None:
    """With an object-store work dir (``store``, else nothing): upload a written checkpoint, its ``COMPLETE`` marker
    last, then the metrics so far, and delete the checkpoints ``prune`` dropped."""
    if store is None:
        return
    store.push_tree(folder, last=COMPLETE_MARKER)
    if metrics_path is not None and metrics_path.is_file():
        store.push(metrics_path)
    for old in dropped:
        store.delete_tree(old)


def sam_provenance(sam_checkpoint: str | Path | None) -> dict[str, str] | None:
    """{"path", "sha256"} of the frozen SAM weights, or None for a random (tiny) SAM."""
    if not sam_checkpoint:
        return None
    path = Path(sam_checkpoint).resolve()
    return {"path": str(path), "sha256": sha256_of(path)}


def verify_sam_weights(meta: dict[str, Any]) -> None:
    """Raise CheckpointError unless the frozen SAM weights a checkpoint names exist with the recorded sha256."""
    sam = meta.get("sam_checkpoint")
    if not sam:
        return
    path = Path(sam["path"])
    if not path.is_file():
        raise CheckpointError(f"the frozen SAM weights this checkpoint was trained with are missing: {path}")
    digest = sha256_of(path)
    if digest != sam["sha256"]:
        raise CheckpointError(f"{path}: sha256 {digest} differs from the checkpoint's {sam['sha256']}")


def build_model_from_meta(meta: dict[str, Any], verify_sam: bool = True) -> AdaptedSam:
    """Rebuild the model a checkpoint was trained with (on CPU; frozen SAM parts from the recorded weights, or from the
    recorded seed for a random SAM), without its trained weights."""
    args = meta["model"]
    sam = meta.get("sam_checkpoint")
    if verify_sam:
        verify_sam_weights(meta)
    return build_adapted_sam(
        args["variant"],
        llm_dim=int(args["llm_dim"]),
        adapter_blocks=list(args["adapter_blocks"]),
        sam_checkpoint=sam["path"] if sam else None,
        seed=int(args["seed"]),
        device="cpu",
        projector_hidden_dim=args.get("projector_hidden_dim"),
    )


def load_trained_model(
    folder: Path, device: torch.device | str = "cpu", verify_sam: bool = True
) -> tuple[AdaptedSam, dict[str, Any]]:
    """(model with the checkpoint's trained weights, in eval mode on ``device``; the checkpoint's meta)."""
    meta = read_meta(folder)
    if not verify_sam and meta.get("sam_checkpoint") and not Path(meta["sam_checkpoint"]["path"]).is_file():
        raise CheckpointError(f"{Path(folder) / META_FILE}: the frozen SAM weights it names are missing: "
                              f"{meta['sam_checkpoint']['path']}")  # fmt: skip
    model = build_model_from_meta(meta, verify_sam)
    load_trainable_into(model, folder)
    return model.to(device).eval(), meta


def load_training_state(folder: Path) -> dict[str, Any]:
    """Optimizer and scheduler state dicts of a (non-final) checkpoint."""
    path = Path(folder) / TRAINING_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {TRAINING_STATE_FILE}; an exported final folder cannot resume training")
    try:
        with path.open("rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"{path}: refused to load ({err})") from None
    except (RuntimeError, EOFError) as err:  # truncated or not a torch file
        raise CheckpointError(f"{path}: unreadable training state ({err})") from None


def load_trainable_into(model: AdaptedSam, folder: Path) -> None:
    """Load ``trainable.safetensors`` into ``model``; raises CheckpointError naming the file (and the keys) when it
    is unreadable or does not match the model that ``checkpoint.json`` describes."""
    path = Path(folder) / WEIGHTS_FILE
    try:
        state = load_file(str(path), device="cpu")
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable trained weights ({err})") from None
    try:
        model.load_trainable_state_dict(state)
    except KeyError as err:
        raise CheckpointError(f"{path}: does not match the model in {META_FILE}: {err.args[0]}") from None


def load_state(model: AdaptedSam, optimizer: Any, scheduler: Any, folder: Path) -> dict[str, Any]:
    """Load a step checkpoint's trained parts, optimizer and scheduler state; returns its meta."""
    load_trainable_into(model, folder)
    state = load_training_state(folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return read_meta(folder)


def restore_newest(
    model: AdaptedSam, optimizer: Any, scheduler: Any, checkpoints_dir: Path
) -> tuple[int, str | None, dict[str, Any]]:
    """Load the newer of Ray's restored checkpoint and the stable folder's newest; returns (step, where from, its
    meta), or (0, None, {}) for a fresh start."""
    import ray.train

    ray_checkpoint = ray.train.get_checkpoint()
    ray_step = 0
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:
            ray_step = read_meta(Path(folder))["step"] if is_complete(Path(folder)) else 0
    stable = find_latest(checkpoints_dir)
    stable_step = read_meta(stable)["step"] if stable is not None else 0
    if ray_step == stable_step == 0:
        return 0, None, {}
    if ray_step > stable_step:
        with ray_checkpoint.as_directory() as folder:
            meta, origin = load_state(model, optimizer, scheduler, Path(folder)), "ray"
    else:
        meta, origin = load_state(model, optimizer, scheduler, stable), "stable"
    logger.info("resuming from step %d (%s checkpoint)", meta["step"], origin)
    return meta["step"], origin, meta
