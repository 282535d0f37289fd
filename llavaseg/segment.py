"""``llavaseg segment``: one image, one query, the whole method interactively.

Stage 1 runs the chain of thought on the configured MLLM (same prompts, engines and embedding as the batch job), stage 2
prompts the trained SAM adapters with the embedding of the target and its attributes. The MLLM's step-1 answer is
returned unchanged beside the mask. Written files (``<out_dir>/<image stem>-<query slug>``)::

    *-mask.png      the predicted mask at the image's size (L mode, 255 = target, 0 = background)
    *-overlay.png   the image with the mask tinted red
    *.json          query, step-1 answer, target, attributes, mask area, the checkpoint used
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.config import PipelineConfig

log = logging.getLogger(__name__)

SENTENCE_MIN_WORDS = 6


@dataclass(frozen=True)
class SegmentResult:
    query: str
    query_kind: str
    reason_answer: str
    target: str
    attributes: str
    parse_status: str
    seg_text: str
    mask_pixels: int
    image_size: tuple[int, int]  # (H, W)
    checkpoint: str
    mask_path: Path
    overlay_path: Path
    json_path: Path

    def describe(self) -> str:
        height, width = self.image_size
        share = 100.0 * self.mask_pixels / max(1, height * width)
        return "\n".join([
            f"query ({self.query_kind}): {self.query}",
            f"answer: {self.reason_answer}",
            f"target: {self.target or '(none parsed)'}",
            f"attributes: {self.attributes or '(none parsed)'}",
            f"mask: {self.mask_pixels} pixels ({share:.1f}% of {width}x{height})",
            f"mask written to {self.mask_path}",
            f"overlay written to {self.overlay_path}",
            f"details written to {self.json_path}",
        ])  # fmt: skip


def guess_query_kind(query: str) -> str:
    """"sentence" for a question or a long description (as ReasonSeg's long queries), else "phrase"."""
    text = query.strip()
    return "sentence" if text.endswith(("?", ".")) or len(text.split()) >= SENTENCE_MIN_WORDS else "phrase"


def default_checkpoint(config: PipelineConfig) -> Path:
    """The final checkpoint ``llavaseg run``/``train`` writes for this config's training data and stage-1 run."""
    from llavaseg.pipeline import ManifestEntry, stage2_sources
    from manifests.registry import manifest_filename
    from stage2_segment.train import train_output_dir

    entries = [ManifestEntry(spec, config.work_dir / "manifests" / manifest_filename(*spec.split("/")))
               for spec in config.data.train]  # fmt: skip
    missing = [str(e.path) for e in entries if not e.path.is_file()]
    if missing:
        raise FileNotFoundError(f"no trained model for this config (manifests missing: {', '.join(missing)}); run "
                                "`llavaseg run` or `llavaseg train` first, or pass --checkpoint DIR")  # fmt: skip
    return train_output_dir(config, stage2_sources(config, entries, config.data.train)) / "final"


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].lower() or "query"


def segment_image(
    config: PipelineConfig,
    image_path: Path,
    query: str,
    checkpoint_dir: Path | None = None,
    out_dir: Path | None = None,
    query_kind: str | None = None,
    backend: Any = None,
    embedder: Any = None,
) -> SegmentResult:
    """Reason about ``query`` on the image, segment what the MLLM names, write mask / overlay / JSON.

    Raises:
        FileNotFoundError: a missing checkpoint folder or model path.
        ValueError: an unreadable image (naming the file), an empty query, a checkpoint that is not complete or not
            loadable, reasoning that produced nothing to segment.

    ``backend``/``embedder``: stage-1 engines already running (see :func:`stage1_reason.single.reason_one`).
    """
    import torch

    from shared.images import load_rgb
    from stage1_reason.single import input_embedding_rows, reason_one
    from stage1_reason.tiny_model import resolve_model
    from stage2_segment.checkpoint import is_complete, load_trained_model
    from stage2_segment.data import collate
    from stage2_segment.infer import inference_device, predict_masks
    from stage2_segment.modeling import get_variant
    from stage2_segment.overlay import PRED_COLOUR, tint
    from stage2_segment.preprocess import preprocess_image

    query = query.strip()
    if not query:
        raise ValueError("the query is empty")
    kind = query_kind or guess_query_kind(query)
    if kind not in ("phrase", "sentence"):
        raise ValueError(f"query kind must be 'phrase' or 'sentence', got {kind!r}")
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint(config)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist; train one with `llavaseg run` or "
                                "`llavaseg train`, or pass --checkpoint DIR")  # fmt: skip
    if not is_complete(checkpoint):
        raise ValueError(f"checkpoint folder {checkpoint} is not a complete checkpoint (no completion marker)")
    image_path = Path(image_path)
    image = load_rgb(image_path)  # ImageLoadError (a ValueError) names the file
    device = inference_device(config)
    model, meta = load_trained_model(checkpoint, device)  # before the MLLM: a bad checkpoint fails fast

    reasoning = reason_one(config, image, query, kind, backend, embedder)
    embedding = reasoning.embedding
    if embedding is None:  # input mode: rows of the input embedding table
        embedding = input_embedding_rows(resolve_model(config.stage1.model, config.work_dir), reasoning.token_ids)
    expected_dim = meta["model"].get("llm_dim")
    if expected_dim is not None and embedding.shape[1] != expected_dim:
        raise ValueError(f"checkpoint {checkpoint} expects {expected_dim}-dim text embeddings, the configured MLLM "
                         f"gives {embedding.shape[1]}: use the checkpoint trained with this stage-1 model")  # fmt: skip
    pixels, input_size = preprocess_image(image, get_variant(meta["model"]["variant"]).image_size)
    batch = collate([{
        "index": 0, "sample_id": "single", "image": pixels, "input_size": input_size,
        "original_size": image.shape[:2], "text_embedding": torch.from_numpy(np.asarray(embedding, np.float16)),
    }])  # fmt: skip
    use_bf16 = config.stage2.precision == "bf16" and device.type == "cuda"
    (mask,), _ = predict_masks(model, batch, device, use_bf16)

    out_dir = Path(out_dir) if out_dir else config.work_dir / "segment"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(image_path.stem)}-{_slug(query)}"
    mask_path, overlay_path, json_path = (out_dir / f"{stem}-mask.png", out_dir / f"{stem}-overlay.png",
                                          out_dir / f"{stem}.json")  # fmt: skip
    Image.fromarray((mask * 255).astype(np.uint8)).save(mask_path)
    Image.fromarray(tint(image, mask, PRED_COLOUR)).save(overlay_path)
    result = SegmentResult(
        query=query, query_kind=kind, reason_answer=reasoning.reason_answer, target=reasoning.target,
        attributes=reasoning.attributes, parse_status=reasoning.parse_status, seg_text=reasoning.seg_text,
        mask_pixels=int(mask.sum()), image_size=(int(image.shape[0]), int(image.shape[1])),
        checkpoint=str(checkpoint.resolve()), mask_path=mask_path, overlay_path=overlay_path, json_path=json_path,
    )  # fmt: skip
    record = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    record["image"] = str(image_path.resolve())
    json_path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result
