"""Demo dataset in ReasonSeg's on-disk format: small drawn scenes with reasoning and referring queries.

``generate_demo_dataset(data_root)`` writes ``<data_root>/reason_seg/ReasonSeg/{train,val}/demo_<split>_<nnnn>.jpg`` and
``.json`` (``text``, ``is_sentence``, ``shapes``) plus ``explanatory/{train,val}.json``, exactly the layout the
``reasonseg`` adapter reads. Each scene is a background with 3-5 objects of distinct shapes and colours; one is the
target (label ``target``). Some scenes have a partly hidden object labelled ``ignore`` and some a stray ``flag`` shape,
as real ReasonSeg files do. Queries are sentences ("Which object in this picture could roll off a table?") or phrases
("the red circle"); an image's queries share one kind, as ``is_sentence`` is per file.

The output is a pure function of (index, split, seed): a rerun writes the same bytes. A marker file written last records
the parameters; a rerun with the same parameters returns at once.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

logger = logging.getLogger(__name__)

DEMO_VERSION = 1
REASONSEG_DIR = Path("reason_seg") / "ReasonSeg"
MARKER_NAME = ".demo_complete.json"
FILE_PREFIX = "demo_"
JPEG_QUALITY = 92

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "yellow": (240, 200, 30),
    "purple": (148, 73, 189),
    "orange": (255, 127, 14),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")

# (question, explanation); explanations are formatted with the target's colour.
SHAPE_SENTENCES: dict[str, list[tuple[str, str]]] = {
    "circle": [
        ("Which object in this picture could roll off a table?",
         "The {colour} circle could roll off a table: it is perfectly round, while the other objects have flat sides."),
        ("What in this image is shaped like a coin or a wheel?",
         "The {colour} circle is shaped like a coin or a wheel; it is the only round object in the picture."),
    ],
    "square": [
        ("What would you use to build a tower of toy blocks in this picture?",
         "The {colour} square: like a toy block it has flat sides and straight edges, so it stacks well."),
        ("Which object here has four equal sides and four right angles?",
         "The {colour} square has four equal sides and four right angles."),
    ],
    "triangle": [
        ("Which object in this picture is shaped like a slice of pizza?",
         "The {colour} triangle looks like a slice of pizza: it has three sides and a pointed tip."),
        ("What here has exactly three corners?",
         "The {colour} triangle is the only object with exactly three corners."),
    ],
    "star": [
        ("What in this image looks like something you would see in the night sky?",
         "The {colour} star looks like a star in the night sky, with its five pointed arms."),
        ("Which object would you put on top of a holiday tree?",
         "The {colour} star: a star is the traditional decoration on top of a holiday tree."),
    ],
    "diamond": [
        ("Which object here looks like a kite flying in the wind?",
         "The {colour} diamond looks like a kite: it is a tall rhombus standing on one tip."),
        ("What in this picture has the shape of the diamonds on a playing card?",
         "The {colour} diamond has the rhombus shape of the diamonds on a playing card."),
    ],
    "hexagon": [
        ("Which object in this picture matches one cell of a honeycomb?",
         "The {colour} hexagon matches a honeycomb cell: both have six equal sides."),
        ("What here has six sides, like the nut on a bolt?",
         "The {colour} hexagon has six sides, like a nut on a bolt."),
    ],
}  # fmt: skip
COLOUR_SENTENCES: dict[str, tuple[str, str]] = {
    "red": ("Which object has the colour of a ripe tomato?", "The red {shape} has the colour of a ripe tomato."),
    "green": ("What in this picture is the colour of fresh grass?", "The green {shape} is the colour of fresh grass."),
    "blue": ("Which object shares its colour with a clear summer sky?", "The blue {shape} is sky blue."),
    "yellow": ("What here is as yellow as a ripe banana?", "The yellow {shape} is as yellow as a ripe banana."),
    "purple": ("Which object has the colour of a bunch of grapes?", "The purple {shape} has the colour of grapes."),
    "orange": ("What in this picture is the colour of a pumpkin?", "The orange {shape} is the colour of a pumpkin."),
}
EXTREME_SENTENCES: dict[str, tuple[str, str]] = {
    "left": ("If you read this picture from left to right, which object would you meet first?",
             "Reading from left to right, the first object is the {colour} {shape}, at the far left."),
    "right": ("Which object would you reach last when reading this picture from left to right?",
              "The {colour} {shape} is the rightmost object, so it comes last."),
    "top": ("Which object sits highest in this picture?", "The {colour} {shape} is closest to the top edge."),
    "bottom": ("Which object is closest to the bottom edge of the picture?",
               "The {colour} {shape} is the lowest object in the picture."),
}  # fmt: skip
RELATION_WORDS = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def polygon(self) -> list[tuple[float, float]]:
        return shape_polygon(self.shape, self.cx, self.cy, self.radius)


def shape_polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Polygon vertices (x, y) of ``shape`` centred at (cx, cy), inside the square of half-side ``radius``."""
    if shape == "circle":
        return _regular(cx, cy, radius, 32, 0.0)
    if shape == "square":
        half = radius * 0.85
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return _regular(cx, cy + radius * 0.15, radius, 3, -math.pi / 2)
    if shape == "star":
        return [
            (cx + (radius if k % 2 == 0 else radius * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
             cy + (radius if k % 2 == 0 else radius * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
    if shape == "diamond":
        return [(cx, cy - radius), (cx + radius * 0.65, cy), (cx, cy + radius), (cx - radius * 0.65, cy)]
    if shape == "hexagon":
        return _regular(cx, cy, radius, 6, 0.0)
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _regular(cx: float, cy: float, radius: float, sides: int, phase: float) -> list[tuple[float, float]]:
    angles = [phase + 2 * math.pi * k / sides for k in range(sides)]
    return [(cx + radius * math.cos(angle), cy + radius * math.sin(angle)) for angle in angles]


def _place_objects(rng: random.Random, width: int, height: int) -> list[SceneObject]:
    """3-5 objects of distinct shapes and colours whose bounding squares do not overlap."""
    count = rng.randint(3, 5)
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    scale = min(width, height)
    while True:
        placed: list[SceneObject] = []
        for shape, colour in zip(shapes, colours):
            for _ in range(200):
                radius = rng.uniform(0.09, 0.15) * scale
                cx = rng.uniform(radius + 3, width - radius - 3)
                cy = rng.uniform(radius + 3, height - radius - 3)
                if all(max(abs(cx - o.cx), abs(cy - o.cy)) > radius + o.radius + 6 for o in placed):
                    placed.append(SceneObject(shape, colour, cx, cy, radius))
                    break
            else:
                break
        if len(placed) == count:
            return placed
        count -= 1  # crowded: drop one object and retry (3 always fit at these sizes)
        if count < 1:
            raise ValueError(f"cannot place objects in a {width}x{height} scene")
        shapes, colours = shapes[:count], colours[:count]


def _extreme(target: SceneObject, others: list[SceneObject], side: str, margin: float) -> bool:
    """Whether ``target`` is clearly the most ``side`` (left/right/top/bottom) object."""
    key = {"left": lambda o: -o.cx, "right": lambda o: o.cx, "top": lambda o: -o.cy, "bottom": lambda o: o.cy}[side]
    return all(key(target) > key(other) + margin for other in others)


def _relation_anchor(target: SceneObject, others: list[SceneObject], side: str, margin: float) -> SceneObject | None:
    """An object R such that ``target`` is clearly on ``side`` of R and roughly in line with it (same row for
    left/right, same column for above/below), and no other object is anywhere near that position."""
    sign = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[side]

    def offset(obj: SceneObject, anchor: SceneObject) -> float:
        return sign[0] * (obj.cx - anchor.cx) + sign[1] * (obj.cy - anchor.cy)

    def across(obj: SceneObject, anchor: SceneObject) -> float:
        return abs(sign[1] * (obj.cx - anchor.cx) + sign[0] * (obj.cy - anchor.cy))

    for anchor in others:
        if not (offset(target, anchor) > margin and across(target, anchor) < target.radius + anchor.radius):
            continue
        rivals = [
            o for o in others
            if o is not anchor and offset(o, anchor) > -margin and across(o, anchor) < o.radius + anchor.radius + margin
        ]  # fmt: skip
        if not rivals:
            return anchor
    return None


def _region(obj: SceneObject, width: int, height: int) -> str:
    horizontal = "left" if obj.cx < width / 3 else "right" if obj.cx > 2 * width / 3 else "centre"
    vertical = "top" if obj.cy < height / 3 else "bottom" if obj.cy > 2 * height / 3 else "middle"
    return "centre" if (horizontal, vertical) == ("centre", "middle") else f"{vertical} {horizontal}"


def _queries(
    target: SceneObject, others: list[SceneObject], sentences: bool, width: int, height: int
) -> list[tuple[str, str]]:
    """Candidate (query, explanation) pairs that single out ``target``; sentences or phrases."""
    margin = 0.05 * min(width, height)
    fill = {"colour": target.colour, "shape": target.shape}
    candidates: list[tuple[str, str]] = []
    if sentences:
        candidates += [(q, a.format(**fill)) for q, a in SHAPE_SENTENCES[target.shape]]
        question, answer = COLOUR_SENTENCES[target.colour]
        candidates.append((question, answer.format(**fill)))
        for side, (question, answer) in EXTREME_SENTENCES.items():
            if _extreme(target, others, side, margin):
                candidates.append((question, answer.format(**fill)))
        if all(target.radius > 1.15 * other.radius for other in others):
            candidates.append(
                ("Which object takes up the most space in this picture?", f"The {target.name} is the largest object.")
            )
        return candidates
    where = _region(target, width, height)
    explanation = f"It is the {target.name} in the {where} of the picture."
    candidates += [(f"the {target.name}", explanation), (f"the {target.shape}", explanation)]
    candidates.append((f"the {target.colour} object", explanation))
    for side, word in RELATION_WORDS.items():
        anchor = _relation_anchor(target, others, side, margin)
        if anchor is not None:
            relation = f"{word} the {anchor.name}"
            candidates.append((f"the object {relation}", f"The {target.name} is {relation}."))
        if _extreme(target, others, side, margin) and side in ("left", "right"):
            candidates.append((f"the {side}most object", explanation))
    return candidates


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


def render_scene(split: str, index: int, seed: int) -> tuple[Image.Image, dict, list[dict]]:
    """One demo scene: (image, ReasonSeg annotation dict, explanation records without the image name)."""
    rng = random.Random(f"llavaseg-demo-v{DEMO_VERSION}-{seed}-{split}-{index}")
    width, height = rng.randint(160, 256), rng.randint(160, 256)
    objects = _place_objects(rng, width, height)
    target = rng.choice(objects)
    others = [o for o in objects if o is not target]

    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        outline = tuple(max(0, c - 70) for c in COLOURS[obj.colour])
        draw.polygon(obj.polygon(), fill=COLOURS[obj.colour], outline=outline)

    shapes = [_shape_record("target", _points(target.polygon()))]
    if rng.random() < 0.4:  # an ambiguous, partly hidden object: excluded from evaluation
        hidden = rng.choice(others)
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
    candidates = _queries(target, others, sentences, width, height)
    n_queries = 2 if split == "train" else rng.randint(1, 2)
    chosen = rng.sample(candidates, min(n_queries, len(candidates)))
    annotation = {"text": [query for query, _ in chosen], "is_sentence": sentences, "shapes": shapes}
    explanations = [{"query": query, "outputs": answer} for query, answer in chosen]
    return image, annotation, explanations


def _check_foreign_files(root: Path) -> None:
    """Refuse to write demo files beside files the generator did not write (e.g. the real ReasonSeg)."""
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        foreign = sorted(p.name for p in split_dir.iterdir() if not p.name.startswith((FILE_PREFIX, ".")))
        if foreign:
            raise FileExistsError(
                f"{split_dir} holds files the demo generator did not write (e.g. {foreign[0]}); "
                "point data_root elsewhere or turn demo generation off"
            )


def generate_demo_dataset(data_root: Path, n_train: int = 48, n_val: int = 16, seed: int = 0) -> Path:
    """Write the demo dataset under ``data_root`` and return its ``reason_seg/ReasonSeg`` folder.

    Idempotent: when the completion marker records the same parameters, nothing is rewritten.

    Raises:
        ValueError: negative image counts.
        FileExistsError: the split folders hold files not written by this generator.
    """
    if n_train < 0 or n_val < 0:
        raise ValueError(f"demo image counts must be >= 0, got n_train={n_train}, n_val={n_val}")
    root = Path(data_root) / REASONSEG_DIR
    marker = root / MARKER_NAME
    params = {"version": DEMO_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                logger.info("demo dataset already complete at %s (%s)", root, params)
                return root
        except (OSError, ValueError):
            pass
    _check_foreign_files(root)
    marker.unlink(missing_ok=True)
    for split in ("train", "val"):
        for stale in (root / split).glob(f"{FILE_PREFIX}*") if (root / split).is_dir() else []:
            stale.unlink()

    (root / "explanatory").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("val", n_val)):
        split_dir = root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        explanatory = []
        for index in tqdm(range(count), desc=f"demo {split}", unit="image"):
            name = f"{FILE_PREFIX}{split}_{index:04d}"
            image, annotation, explanations = render_scene(split, index, seed)
            image.save(split_dir / f"{name}.jpg", format="JPEG", quality=JPEG_QUALITY, optimize=False, subsampling=0)
            (split_dir / f"{name}.json").write_text(json.dumps(annotation, indent=1) + "\n", encoding="utf-8")
            explanatory += [{"image": f"{name}.jpg", **record} for record in explanations]
        (root / "explanatory" / f"{split}.json").write_text(json.dumps(explanatory, indent=1) + "\n", encoding="utf-8")
    marker.write_text(json.dumps(params) + "\n")
    logger.info("demo dataset written to %s: %d train, %d val images", root, n_train, n_val)
    return root
