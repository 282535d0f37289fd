"""The demo world's scenes: coloured shapes on a background, composed so that names alone are sometimes ambiguous.

A scene holds 3-5 objects, one of them the target, and is one of three kinds:

- ``plain``: every object has its own colour and shape (as in world v1);
- ``distractor``: other objects share the target's colour or its shape, so a colour or shape alone does not name it;
- ``twin``: a second object has the target's colour *and* shape ("two green circles"); only an attribute tells them
  apart, and the scene is built so that one does: ``side`` (clearly further left or right), ``size`` (clearly larger or
  smaller) or ``anchor`` (clearly closer to a third object).

Everything here is geometry and truth: :func:`relation_holds` decides whether a stated relation is true of an object,
and the text module (``manifests.demo_text``) only states relations that hold. A scene is a pure function of its seed
string.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "yellow": (240, 200, 30),
    "purple": (148, 73, 189),
    "orange": (255, 127, 14),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SCENE_KINDS = ("plain", "distractor", "twin")
SCENE_KIND_WEIGHTS = (0.25, 0.35, 0.40)
TWIN_KINDS = ("side", "size", "anchor")
RELATIONS = ("left of", "right of", "above", "below")
MARGIN_FRACTION = 0.08  # a relation is stated only when it holds by this fraction of the scene's shorter side


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

    def distance(self, other: SceneObject) -> float:
        return math.hypot(self.cx - other.cx, self.cy - other.cy)


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[SceneObject, ...]
    target: SceneObject
    kind: str  # plain | distractor | twin
    twin: SceneObject | None = None  # twin scenes: the other object with the target's name
    twin_kind: str | None = None  # side | size | anchor
    anchor: SceneObject | None = None  # twin_kind "anchor": the object the target is closer to
    extra: dict = field(default_factory=dict)

    @property
    def margin(self) -> float:
        return MARGIN_FRACTION * min(self.width, self.height)

    @property
    def others(self) -> list[SceneObject]:
        return [o for o in self.objects if o is not self.target]

    def named(self, name: str) -> list[SceneObject]:
        return [o for o in self.objects if o.name == name]

    def unique_name(self, obj: SceneObject) -> bool:
        return len(self.named(obj.name)) == 1

    def unique_colour(self, obj: SceneObject) -> bool:
        return sum(o.colour == obj.colour for o in self.objects) == 1

    def unique_shape(self, obj: SceneObject) -> bool:
        return sum(o.shape == obj.shape for o in self.objects) == 1


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


def relation_holds(obj: SceneObject, relation: str, anchor: SceneObject, margin: float = 0.0) -> bool:
    """Whether ``obj`` is ``relation`` ("left of", "right of", "above", "below") ``anchor``, by more than ``margin``
    along that axis and more along it than across it."""
    dx, dy = obj.cx - anchor.cx, obj.cy - anchor.cy
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > margin and along > abs(across)


def region(obj: SceneObject, width: int, height: int) -> str:
    """"top left", "middle right", "centre", ... by thirds of the picture."""
    horizontal = "left" if obj.cx < width / 3 else "right" if obj.cx > 2 * width / 3 else "centre"
    vertical = "top" if obj.cy < height / 3 else "bottom" if obj.cy > 2 * height / 3 else "middle"
    return "centre" if (horizontal, vertical) == ("centre", "middle") else f"{vertical} {horizontal}"


def region_is_clear(obj: SceneObject, width: int, height: int, slack: float = 0.05) -> bool:
    """The centre is not within ``slack`` (fraction of the side) of a third line, so the region is unambiguous."""
    fx, fy = obj.cx / width, obj.cy / height
    return all(abs(f - line) > slack for f in (fx, fy) for line in (1 / 3, 2 / 3))


def extreme(target: SceneObject, others: list[SceneObject], side: str, margin: float) -> bool:
    """Whether ``target`` is clearly the most ``side`` (left/right/top/bottom) object."""
    key = {"left": lambda o: -o.cx, "right": lambda o: o.cx, "top": lambda o: -o.cy, "bottom": lambda o: o.cy}[side]
    return all(key(target) > key(other) + margin for other in others)


def _fits(cx: float, cy: float, radius: float, placed: list[SceneObject]) -> bool:
    return all(max(abs(cx - o.cx), abs(cy - o.cy)) > radius + o.radius + 6 for o in placed)


def _place(rng: random.Random, specs: list[tuple[str, str, float]], width: int, height: int) -> list[SceneObject] | None:
    """Objects for (shape, colour, radius) specs at random non-overlapping positions, or None when crowded."""
    placed: list[SceneObject] = []
    for shape, colour, radius in specs:
        for _ in range(200):
            cx = rng.uniform(radius + 3, width - radius - 3)
            cy = rng.uniform(radius + 3, height - radius - 3)
            if _fits(cx, cy, radius, placed):
                placed.append(SceneObject(shape, colour, cx, cy, radius))
                break
        else:
            return None
    return placed


def _names(rng: random.Random, kind: str, count: int) -> list[tuple[str, str]]:
    """(shape, colour) of each object, the target first (twin scenes: the twin second)."""
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    names = [(shape, colour)]
    if kind == "twin":
        names.append((shape, colour))
    elif kind == "distractor":
        shares = rng.choice(("colour", "shape", "both"))
        if shares in ("colour", "both"):
            names.append((rng.choice([s for s in SHAPES if s != shape]), colour))
        if shares in ("shape", "both"):
            names.append((shape, rng.choice([c for c in sorted(COLOURS) if c != colour])))
    used_shapes = {s for s, _ in names}
    used_colours = {c for _, c in names}
    while len(names) < count:  # the rest: a new colour and a new shape each (distinct names, never the target's)
        free_shapes = [s for s in SHAPES if s not in used_shapes] or [s for s in SHAPES if s != shape]
        free_colours = [c for c in sorted(COLOURS) if c not in used_colours] or [c for c in COLOURS if c != colour]
        new = (rng.choice(free_shapes), rng.choice(free_colours))
        if new in names:
            continue
        names.append(new)
        used_shapes.add(new[0])
        used_colours.add(new[1])
    return names


def _twin_ok(scene_objects: list[SceneObject], twin_kind: str, margin: float) -> SceneObject | None | bool:
    """For a twin scene (target, twin first): whether ``twin_kind`` clearly tells them apart; for ``anchor`` the
    anchor object (or None)."""
    target, twin = scene_objects[0], scene_objects[1]
    if twin_kind == "side":
        return abs(target.cx - twin.cx) > 2 * margin
    if twin_kind == "size":
        return max(target.radius, twin.radius) > 1.4 * min(target.radius, twin.radius)
    for anchor in sorted(scene_objects[2:], key=target.distance):
        if target.distance(anchor) < 0.6 * twin.distance(anchor):
            return anchor
    return None


def compose_scene(rng: random.Random, width: int, height: int) -> Scene:
    """A random scene of a random kind; retries placement until the kind's promise holds."""
    kind = rng.choices(SCENE_KINDS, weights=SCENE_KIND_WEIGHTS)[0]
    scale = min(width, height)
    margin = MARGIN_FRACTION * scale
    twin_kind = rng.choice(TWIN_KINDS) if kind == "twin" else None
    count = rng.randint(3, 5)
    names = _names(rng, kind, count)
    for attempt in range(400):
        if attempt and attempt % 100 == 0 and len(names) > 3:
            names = names[:-1]  # crowded: drop an object
        radii = [rng.uniform(0.09, 0.15) * scale for _ in names]
        if twin_kind == "size":
            big, small = rng.uniform(0.13, 0.16) * scale, rng.uniform(0.07, 0.085) * scale
            radii[0], radii[1] = (big, small) if rng.random() < 0.5 else (small, big)
        placed = _place(rng, [(s, c, r) for (s, c), r in zip(names, radii)], width, height)
        if placed is None:
            continue
        if kind != "twin":
            return Scene(width, height, tuple(_shuffled(rng, placed)), placed[0], kind)
        found = _twin_ok(placed, twin_kind, margin)
        if found is False or found is None:
            continue
        anchor = found if twin_kind == "anchor" else None
        return Scene(width, height, tuple(_shuffled(rng, placed)), placed[0], kind, placed[1], twin_kind, anchor)
    raise ValueError(f"cannot compose a {kind} scene in {width}x{height}")


def _shuffled(rng: random.Random, objects: list[SceneObject]) -> list[SceneObject]:
    order = list(objects)
    rng.shuffle(order)
    return order
