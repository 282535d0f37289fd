"""The demo world's promises: ambiguous names are disambiguated by attributes that are true of the target and false of
its twin; queries never lean on a shared colour or shape; the attribute grammar is read back exactly."""

from __future__ import annotations

import collections

import pytest

from manifests.demo import render_scene
from manifests.demo_text import (
    COLOUR_SENTENCES,
    SHAPE_SENTENCES,
    attribute_sentences,
    claim_holds,
    claims,
    reason_answer,
    singles_out,
    target_answer,
    target_attribute_answer,
)
from manifests.demo_world import relation_holds

SCENES = [render_scene(split, index, seed=3) for split in ("train", "val") for index in range(150)]


def test_scene_kinds_and_twin_kinds_all_occur():
    kinds = collections.Counter(sample.scene.kind for sample in SCENES)
    twin_kinds = collections.Counter(sample.scene.twin_kind for sample in SCENES if sample.scene.kind == "twin")
    assert all(kinds[kind] > 0.15 * len(SCENES) for kind in ("plain", "distractor", "twin"))
    assert all(twin_kinds[kind] > 0.2 * kinds["twin"] for kind in ("side", "size", "anchor"))


def test_twins_share_the_name_and_attributes_single_out_the_target_not_the_twin():
    twins = [sample.scene for sample in SCENES if sample.scene.kind == "twin"]
    assert len(twins) > 60
    for scene in twins:
        assert scene.twin.name == scene.target.name and scene.twin is not scene.target
        assert len(scene.named(scene.target.name)) == 2
        text = " ".join(attribute_sentences(scene))
        stated = claims(text)
        assert stated, text
        assert all(claim_holds(scene, scene.target, claim) for claim in stated), text
        assert any(not claim_holds(scene, scene.twin, claim) for claim in stated), text
        assert singles_out(scene, text) and not singles_out(scene, text, scene.twin)
        if scene.twin_kind == "side":  # flipping the side claim points at the twin instead
            side = "left" if scene.target.cx < scene.twin.cx else "right"
            flipped = text.replace(f"the {side} one", f"the {'right' if side == 'left' else 'left'} one")
            assert not singles_out(scene, flipped)


def test_twin_queries_name_the_disambiguating_attribute():
    for sample in SCENES:
        scene = sample.scene
        if scene.kind != "twin":
            continue
        word = {"side": ("left", "right"), "size": ("larger", "smaller", "big", "small", "bigger"),
                "anchor": (scene.anchor.name if scene.anchor else "?",)}[scene.twin_kind]  # fmt: skip
        # every query that names the target's shape in a twin scene carries the attribute that tells the twins apart
        for query in sample.annotation["text"]:
            if scene.target.shape in query:
                assert any(w in query for w in word), query


def test_clue_queries_are_asked_only_when_the_clue_is_unique():
    colour_questions = {question: colour for colour, (question, _) in COLOUR_SENTENCES.items()}
    shape_questions = {q: shape for shape, pairs in SHAPE_SENTENCES.items() for q, _ in pairs}
    seen_colour = seen_shape = 0
    for sample in SCENES:
        scene = sample.scene
        for query in sample.annotation["text"]:
            if query in colour_questions:
                seen_colour += 1
                assert colour_questions[query] == scene.target.colour and scene.unique_colour(scene.target)
            if query in shape_questions:
                seen_shape += 1
                assert shape_questions[query] == scene.target.shape and scene.unique_shape(scene.target)
            if query == f"the {scene.target.name}":
                assert scene.unique_name(scene.target)
    assert seen_colour > 10 and seen_shape > 10


def test_distractor_scenes_share_colour_or_shape_with_the_target():
    distractors = [sample.scene for sample in SCENES if sample.scene.kind == "distractor"]
    assert distractors
    for scene in distractors:
        assert not (scene.unique_colour(scene.target) and scene.unique_shape(scene.target))
        assert scene.unique_name(scene.target)


def test_every_query_has_an_explanation_and_the_answers_name_the_target():
    for sample in SCENES:
        scene = sample.scene
        assert len(sample.explanations) == len(sample.annotation["text"]) >= 1
        for record in sample.explanations:
            assert record["outputs"].strip()
            assert reason_answer(scene, record["outputs"]).startswith(f"It is the {scene.target.name}. ")
        assert target_answer(scene) == f"The user wants the {scene.target.name} from the image."
        merged = target_attribute_answer(scene)
        assert merged.startswith(f"The target entity in the image is the {scene.target.name}. It is a ")
        assert all(claim_holds(scene, scene.target, claim) for claim in claims(merged))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It is the left one of the two green circles.", [("side", "left", "")]),
        ("It is the smaller of the two red stars. It is above the blue square.",
         [("size", "smaller", ""), ("relation", "above", "blue square")]),
        ("Of the two red stars, it is the one closer to the blue square. It is in the bottom right of the picture.",
         [("closer", "closer", "blue square"), ("region", "bottom right", "")]),
        ("It is in the centre of the picture.", [("region", "centre", "")]),
        ("It is a green circle, round with no corners.", []),
    ],
)  # fmt: skip
def test_claims_are_read_back(text, expected):
    assert [(c.kind, c.value, c.anchor) for c in claims(text)] == expected


def test_relation_holds_needs_the_margin_and_the_dominant_axis():
    from manifests.demo_world import SceneObject

    a, b = SceneObject("circle", "red", 10, 50, 5), SceneObject("square", "blue", 60, 60, 5)
    assert relation_holds(a, "left of", b) and relation_holds(a, "left of", b, margin=49)
    assert not relation_holds(a, "left of", b, margin=50) and not relation_holds(a, "above", b)
    assert relation_holds(b, "right of", a) and not relation_holds(b, "below", a)
