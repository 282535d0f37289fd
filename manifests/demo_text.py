"""The demo world's words: queries with their explanatory reference answers, the chain-of-thought answers a model
should give (step 1, merged steps 2+3, step 2 alone), and a checker of the relations an attribute text claims.

Queries never rely on a name that two objects share: a colour clue is asked only when the target's colour is unique,
a shape clue only when its shape is, and in twin scenes the query always carries what tells the twins apart.

The attribute text states only relations that hold, in a small fixed grammar that :func:`claims` reads back and
:func:`singles_out` checks against the scene: "the left one of the two green circles", "the larger of the two ...",
"the one closer to the red square", "in the top left of the picture", "left of / right of / above / below the X".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from manifests.demo_world import RELATIONS, Scene, SceneObject, extreme, region, region_is_clear, relation_holds

# Shape clues: (question, explanation with {colour}); the explanation names the target.
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
        ("What here has exactly three corners?", "The {colour} triangle is the only object with exactly three corners."),
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
        ("What here has six sides, like the nut on a bolt?", "The {colour} hexagon has six sides, like a nut on a bolt."),
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
SHAPE_CLUES = {"circle": "round like a wheel", "square": "shaped like a toy block", "triangle": "shaped like a "
               "slice of pizza", "star": "shaped like a star in the night sky", "diamond": "shaped like a kite",
               "hexagon": "shaped like a honeycomb cell"}  # fmt: skip
COLOUR_CLUES = {"red": "the colour of a ripe tomato", "green": "the colour of fresh grass", "blue": "the colour of "
                "a clear sky", "yellow": "the colour of a banana", "purple": "the colour of grapes",
                "orange": "the colour of a pumpkin"}  # fmt: skip
SHAPE_FEATURES = {"circle": ", round with no corners", "square": " with four equal sides", "triangle": " with three "
                  "corners", "star": " with five points", "diamond": " standing on one tip", "hexagon": " with six sides"}
EXTREME_SENTENCES: dict[str, tuple[str, str]] = {
    "left": ("If you read this picture from left to right, which object would you meet first?",
             "Reading from left to right, the first object is the {name}, at the far left."),
    "right": ("Which object would you reach last when reading this picture from left to right?",
              "The {name} is the rightmost object, so it comes last."),
    "top": ("Which object sits highest in this picture?", "The {name} is closest to the top edge."),
    "bottom": ("Which object is closest to the bottom edge of the picture?", "The {name} is the lowest object."),
}  # fmt: skip
RELATION_OF_SIDE = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}


def _plural(name: str) -> str:
    return name + "s"


def _twin_queries(scene: Scene, sentences: bool) -> list[tuple[str, str]]:
    target, twin, name = scene.target, scene.twin, scene.target.name
    assert twin is not None
    if scene.twin_kind == "side":
        side = "left" if target.cx < twin.cx else "right"
        reason = f"There are two {_plural(name)}; the one asked for is further {side}."
        if sentences:
            return [(f"Of the two {_plural(name)}, which one is further {side}?", reason)]
        return [(f"the {name} on the {side}", reason), (f"the {side} {name}", reason)]
    if scene.twin_kind == "size":
        larger = target.radius > twin.radius
        word, adjective = ("larger", "big") if larger else ("smaller", "small")
        reason = f"There are two {_plural(name)}; the {word} one is asked for."
        if sentences:
            return [(f"Which of the two {_plural(name)} is {'bigger' if larger else 'smaller'}?", reason)]
        return [(f"the {word} {name}", reason), (f"the {adjective} {name}", reason)]
    anchor = scene.anchor
    assert anchor is not None
    reason = f"There are two {_plural(name)}; the one asked for is closer to the {anchor.name}."
    if sentences:
        return [(f"Which {name} is nearer to the {anchor.name}?", reason)]
    return [(f"the {name} closest to the {anchor.name}", reason), (f"the {name} next to the {anchor.name}", reason)]


def _relation_anchor(scene: Scene, side: str) -> SceneObject | None:
    """A uniquely named object R that the target is clearly ``side`` of, and no other object is near that side of R."""
    relation, margin, target = RELATION_OF_SIDE[side], scene.margin, scene.target
    for anchor in scene.others:
        if not scene.unique_name(anchor) or not relation_holds(target, relation, anchor, margin):
            continue
        rivals = [o for o in scene.others if o is not anchor and relation_holds(o, relation, anchor, -margin)]
        if not rivals:
            return anchor
    return None


def queries(scene: Scene, sentences: bool) -> list[tuple[str, str]]:
    """Candidate (query, explanation) pairs that single out the target; sentences or phrases."""
    target, others, margin, name = scene.target, scene.others, scene.margin, scene.target.name
    candidates: list[tuple[str, str]] = []
    if scene.kind == "twin":
        candidates += _twin_queries(scene, sentences)
    if sentences:
        if scene.unique_shape(target):
            candidates += [(q, a.format(colour=target.colour)) for q, a in SHAPE_SENTENCES[target.shape]]
        if scene.unique_colour(target):
            question, answer = COLOUR_SENTENCES[target.colour]
            candidates.append((question, answer.format(shape=target.shape)))
        if scene.unique_name(target):
            shape_clue, colour_clue = SHAPE_CLUES[target.shape], COLOUR_CLUES[target.colour]
            candidates.append((f"Which object is {shape_clue} and {colour_clue}?",
                               f"The {name} is {shape_clue} and {colour_clue}."))  # fmt: skip
        for side, (question, answer) in EXTREME_SENTENCES.items():
            if extreme(target, others, side, margin):
                candidates.append((question, answer.format(name=name)))
        if all(target.radius > 1.15 * other.radius for other in others):
            candidates.append(("Which object takes up the most space in this picture?", f"The {name} is the largest."))
        return candidates
    explanation = f"It is the {name} in the {region(target, scene.width, scene.height)} of the picture."
    if scene.unique_name(target):
        candidates.append((f"the {name}", explanation))
    if scene.unique_shape(target):
        candidates.append((f"the {target.shape}", explanation))
    if scene.unique_colour(target):
        candidates.append((f"the {target.colour} object", explanation))
    for side, relation in RELATION_OF_SIDE.items():
        anchor = _relation_anchor(scene, side)
        if anchor is not None:
            candidates.append((f"the object {relation} the {anchor.name}", f"The {name} is {relation} the {anchor.name}."))
        if side in ("left", "right") and extreme(target, others, side, margin):
            candidates.append((f"the {side}most object", explanation))
    return candidates


def reason_answer(scene: Scene, explanation: str) -> str:
    """The step-1 answer: the target's name, then the reference explanation."""
    return f"It is the {scene.target.name}. {explanation}"


def target_answer(scene: Scene) -> str:
    """The step-2-only answer."""
    return f"The user wants the {scene.target.name} from the image."


def _nearest_relation(scene: Scene) -> tuple[str, SceneObject] | None:
    """The clearest relation of the target to the nearest uniquely named object, if one holds by the margin."""
    for anchor in sorted(scene.others, key=scene.target.distance):
        if anchor is scene.twin or not scene.unique_name(anchor):
            continue
        for relation in RELATIONS:
            if relation_holds(scene.target, relation, anchor, scene.margin):
                return relation, anchor
    return None


def attribute_sentences(scene: Scene) -> list[str]:
    """Colour and shape, what singles it out from a twin, its region, a relation to its nearest neighbour."""
    target = scene.target
    sentences = [f"It is a {target.name}{SHAPE_FEATURES[target.shape]}."]
    if scene.kind == "twin":
        twin, plural = scene.twin, _plural(target.name)
        if scene.twin_kind == "side":
            sentences.append(f"It is the {'left' if target.cx < twin.cx else 'right'} one of the two {plural}.")
        elif scene.twin_kind == "size":
            sentences.append(f"It is the {'larger' if target.radius > twin.radius else 'smaller'} of the two {plural}.")
        else:
            sentences.append(f"Of the two {plural}, it is the one closer to the {scene.anchor.name}.")
    if region_is_clear(target, scene.width, scene.height):
        sentences.append(f"It is in the {region(target, scene.width, scene.height)} of the picture.")
    nearest = _nearest_relation(scene)
    if nearest is not None:
        sentences.append(f"It is {nearest[0]} the {nearest[1].name}.")
    return sentences


def target_attribute_answer(scene: Scene) -> str:
    """The merged step-2/3 answer."""
    return " ".join([f"The target entity in the image is the {scene.target.name}.", *attribute_sentences(scene)])


# --- reading claims back -------------------------------------------------------------------------------------------

_NAME = r"(\w+) (circle|square|triangle|star|diamond|hexagon)"
_CLAIM_PATTERNS = [
    ("side", re.compile(r"\bthe (left|right) one of the two\b")),
    ("size", re.compile(r"\bthe (larger|smaller) of the two\b")),
    ("closer", re.compile(r"\bthe one closer to the " + _NAME)),
    ("region", re.compile(r"\bin the (top|middle|bottom) (left|centre|right) of the picture|\bin the (centre) of the")),
    ("relation", re.compile(r"\b(left of|right of|above|below) the " + _NAME)),
]


@dataclass(frozen=True)
class Claim:
    kind: str  # side | size | closer | region | relation
    value: str  # "left", "larger", "top left", "left of"
    anchor: str = ""  # "red square" for closer/relation


def claims(text: str) -> list[Claim]:
    """The relations an attribute text states, in the grammar of :func:`attribute_sentences`."""
    found = []
    for kind, pattern in _CLAIM_PATTERNS:
        for match in pattern.finditer(text.lower()):
            groups = [g for g in match.groups() if g]
            if kind in ("closer", "relation"):
                value, anchor = ("closer", " ".join(groups)) if kind == "closer" else (groups[0], " ".join(groups[1:]))
                found.append(Claim(kind, value, anchor))
            else:
                found.append(Claim(kind, " ".join(groups)))
    return found


def claim_holds(scene: Scene, obj: SceneObject, claim: Claim) -> bool:
    """Whether ``claim`` is true of ``obj`` (comparisons are against the object of the same name)."""
    same_name = [o for o in scene.named(obj.name) if o is not obj]
    if claim.kind in ("side", "size"):
        if len(same_name) != 1:
            return False
        other = same_name[0]
        if claim.kind == "side":
            return obj.cx < other.cx if claim.value == "left" else obj.cx > other.cx
        return obj.radius > other.radius if claim.value == "larger" else obj.radius < other.radius
    if claim.kind == "region":
        return region(obj, scene.width, scene.height) == claim.value
    anchors = scene.named(claim.anchor)
    if len(anchors) != 1 or anchors[0] is obj:
        return False
    if claim.kind == "closer":
        return len(same_name) == 1 and obj.distance(anchors[0]) < same_name[0].distance(anchors[0])
    return relation_holds(obj, claim.value, anchors[0])


def singles_out(scene: Scene, text: str, obj: SceneObject | None = None) -> bool:
    """Twin scenes: whether ``text`` picks ``obj`` (default the target) over its twin: every claim it states is
    true of ``obj``, and at least one of them is false of the other object of the same name."""
    obj = scene.target if obj is None else obj
    twins = [o for o in scene.named(obj.name) if o is not obj]
    stated = claims(text)
    if len(twins) != 1 or not stated:
        return False
    return all(claim_holds(scene, obj, c) for c in stated) and any(not claim_holds(scene, twins[0], c) for c in stated)
