"""Demo dataset in ReasonSeg's on-disk format: drawn scenes with reasoning and referring queries (world v2).

``generate_demo_dataset(data_root)`` writes ``<data_root>/reason_seg/ReasonSeg/{train,val,test}/demo_<split>_<nnnn>.jpg``
and ``.json`` (``text``, ``is_sentence``, ``shapes``) plus ``explanatory/<split>.json``, exactly the layout the
``reasonseg`` adapter reads. Each scene (``manifests.demo_world``) is a background with 3-5 objects, one of them the
target (label ``target``); some scenes hold distractors sharing the target's colour or shape, and some a twin with the
target's very name, told apart only by an attribute. Queries and their explanatory reference answers come from
``manifests.demo_text``: knowledge sentences ("Which object in this picture could roll off a table?"), extremes and
relations, and phrases ("the larger green circle"); an image's queries share one kind, as ``is_sentence`` is per file.
Some scenes have a partly hidden object labelled ``ignore`` and some a stray ``flag`` shape, as real ReasonSeg files do.

The output is a pure function of (index, split, seed): a rerun writes the same bytes, and a new ``seed`` (config
``data.demo_seed``) gives fresh scenes. A marker file written last records the parameters; a rerun with the same
parameters returns at once.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from shared.console import progress as tqdm  # tqdm on a terminal, plain lines in a log

from manifests.demo_text import queries
from manifests.demo_world import COLOURS, Scene, compose_scene

logger = logging.getLogger(__name__)

DEMO_VERSION = 2
REASONSEG_DIR = Path("reason_seg") / "ReasonSeg"
MARKER_NAME = ".demo_complete.json"
FILE_PREFIX = "demo_"
JPEG_QUALITY = 92
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DemoSample:
    """One generated scene: its picture, ReasonSeg annotation, chosen (query, explanation) pairs and geometry."""

    image: Image.Image
    annotation: dict
    explanations: list[dict]
    scene: Scene


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """A vertical gradient between two light colours, HxWx3 uint8."""
    top = np.array([rng.randint(185, 245) for _ in range(3)], dtype=np.float64)
    bottom = np.array([rng.randint(150, 230) for _ in range(3)], dtype=np.float64)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = top * (1 - ramp) + bottom * ramp
    pixels = np.broadcast_to(pixels, (height, width, 3))
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")


def _points(polygon: list[tuple[float, float]]) -> list[list[float]]:
    return [[round(x, 2), round(y, 2)] for x, y in polygon]


def _shape_record(label: str, points: list[list[float]]) -> dict:
    return {"label": label, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}}


def render_scene(split: str, index: int, seed: int) -> DemoSample:
    """One demo scene: picture, ReasonSeg annotation, (query, explanation) records without the image name, geometry."""
    rng = random.Random(f"llavaseg-demo-v{DEMO_VERSION}-{seed}-{split}-{index}")
    width, height = rng.randint(160, 256), rng.randint(160, 256)
    scene = compose_scene(rng, width, height)
    target = scene.target

    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        outline = tuple(max(0, c - 70) for c in COLOURS[obj.colour])
        draw.polygon(obj.polygon(), fill=COLOURS[obj.colour], outline=outline)

    shapes = [_shape_record("target", _points(target.polygon()))]
    # An ambiguous, partly hidden object, excluded from evaluation; never the twin or an anchor a query names.
    hideable = [o for o in scene.others if o is not scene.twin and o is not scene.anchor]
    if hideable and rng.random() < 0.35:
        hidden = rng.choice(hideable)
        x0, y0 = hidden.cx - hidden.radius, hidden.cy - hidden.radius
        x1, y1 = hidden.cx + hidden.radius, hidden.cy + hidden.radius
        cover = rng.choice([(hidden.cx, y0, x1, y1), (x0, y0, hidden.cx, y1), (x0, hidden.cy, x1, y1)])
        overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
        ImageDraw.Draw(overlay).rectangle(cover, fill=(120, 120, 120, 190))
        image = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
        shapes.append(_shape_record("ignore", _points(hidden.polygon())))
    if rng.random() < 0.2:  # a stray deprecated annotation, as in real files
        x, y = rng.uniform(5, width - 15), rng.uniform(5, height - 15)
        shapes.append(_shape_record("flag", _points([(x, y), (x + 8, y), (x + 4, y + 8)])))

    sentences = index % 2 == 0
    candidates = queries(scene, sentences)
    if not candidates:  # no sentence fits (e.g. every clue shared): ask with phrases instead
        sentences = False
        candidates = queries(scene, sentences)
    n_queries = 2 if split == "train" else rng.randint(1, 2)
    chosen = rng.sample(candidates, min(n_queries, len(candidates)))
    annotation = {"text": [query for query, _ in chosen], "is_sentence": sentences, "shapes": shapes}
    explanations = [{"query": query, "outputs": answer} for query, answer in chosen]
    return DemoSample(image, annotation, explanations, scene)


def _check_foreign_files(root: Path) -> None:
    """Refuse to write demo files beside files the generator did not write (e.g. the real ReasonSeg)."""
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        foreign = sorted(p.name for p in split_dir.iterdir() if not p.name.startswith((FILE_PREFIX, ".")))
        if foreign:
            raise FileExistsError(
                f"{split_dir} holds files the demo generator did not write (e.g. {foreign[0]}); "
                "point data_root elsewhere or turn demo generation off"
            )


def generate_demo_dataset(
    data_root: Path, n_train: int = 48, n_val: int = 16, seed: int = 0, n_test: int = 0
) -> Path:
    """Write the demo dataset under ``data_root`` and return its ``reason_seg/ReasonSeg`` folder.

    Idempotent: when the completion marker records the same parameters, nothing is rewritten.

    Raises:
        ValueError: negative image counts.
        FileExistsError: the split folders hold files not written by this generator.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if min(counts.values()) < 0:
        raise ValueError(f"demo image counts must be >= 0, got n_train={n_train}, n_val={n_val}, n_test={n_test}")
    root = Path(data_root) / REASONSEG_DIR
    marker = root / MARKER_NAME
    params = {"version": DEMO_VERSION, "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                logger.info("demo dataset already complete at %s (%s)", root, params)
                return root
        except (OSError, ValueError):
            pass
    _check_foreign_files(root)
    marker.unlink(missing_ok=True)
    for split in SPLITS:
        for stale in (root / split).glob(f"{FILE_PREFIX}*") if (root / split).is_dir() else []:
            stale.unlink()

    (root / "explanatory").mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        split_dir = root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        explanatory = []
        for index in tqdm(range(count), desc=f"demo {split}", unit="image"):
            name = f"{FILE_PREFIX}{split}_{index:04d}"
            sample = render_scene(split, index, seed)
            sample.image.save(
                split_dir / f"{name}.jpg", format="JPEG", quality=JPEG_QUALITY, optimize=False, subsampling=0
            )
            (split_dir / f"{name}.json").write_text(json.dumps(sample.annotation, indent=1) + "\n", encoding="utf-8")
            explanatory += [{"image": f"{name}.jpg", **record} for record in sample.explanations]
        (root / "explanatory" / f"{split}.json").write_text(json.dumps(explanatory, indent=1) + "\n", encoding="utf-8")
    marker.write_text(json.dumps(params) + "\n")
    logger.info("demo dataset written to %s: %d train, %d val, %d test images", root, n_train, n_val, n_test)
    return root
