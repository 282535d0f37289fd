"""Target/attribute extraction from merged step-2/3 answers in the shapes LLaVA writes them."""

from __future__ import annotations

import pytest

from stage1_reason.parsing import PARSE_FALLBACK, PARSE_OK, parse_merged_answer

CASES = [
    pytest.param(
        "(1) The user wants the fire from the image. (2) The fire can be discriminated from the image by its bright "
        "orange color and the fact that it is emitting heat and light.",
        "the fire",
        "The fire can be discriminated from the image by its bright orange color and the fact that it is emitting heat "
        "and light.",
        id="paper-numbered-parens",
    ),
    pytest.param(
        "1. The asker wants the red cup on the table.\n2. The red cup is small, cylindrical, and located to the left "
        "of the laptop.",
        "the red cup on the table",
        "The red cup is small, cylindrical, and located to the left of the laptop.",
        id="numbered-dots-newlines",
    ),
    pytest.param(
        "Target: the yellow star\nAttributes: bright yellow, five-pointed, at the top right corner above the red ring.",
        "the yellow star",
        "bright yellow, five-pointed, at the top right corner above the red ring.",
        id="labels",
    ),
    pytest.param(
        "**Target entity:** the dog\n**Visual attributes:** brown fur, lying on the sofa",
        "the dog",
        "brown fur, lying on the sofa",
        id="markdown-labels",
    ),
    pytest.param(
        "Target: the cat. Attributes: black, curled up on the left cushion.",
        "the cat",
        "black, curled up on the left cushion.",
        id="labels-one-line",
    ),
    pytest.param(
        "The user wants the umbrella from the image. The umbrella can be discriminated by its blue color, its dome "
        "shape, and its position above the woman.",
        "the umbrella",
        "The umbrella can be discriminated by its blue color, its dome shape, and its position above the woman.",
        id="paper-prose",
    ),
    pytest.param(
        "The target is the wooden chair. It is brown, has four legs and stands next to the window.",
        "the wooden chair",
        "It is brown, has four legs and stands next to the window.",
        id="target-is",
    ),
    pytest.param(
        "(1) The distinct physical object that the user wants is the knife. (2) The knife is silver with a black "
        "handle, lying on the cutting board.",
        "the knife",
        "The knife is silver with a black handle, lying on the cutting board.",
        id="distinct-object-is",
    ),
    pytest.param(
        "1) Sink 2) The sink is white, rectangular and below the mirror.",
        "Sink",
        "The sink is white, rectangular and below the mirror.",
        id="numbered-paren-bare-target",
    ),
    pytest.param(
        "(1) The user is looking for the traffic light in this picture. (2) It is green and rectangular, hanging above "
        "the road. (3) It is to the right of the bus.",
        "the traffic light",
        "It is green and rectangular, hanging above the road. It is to the right of the bus.",
        id="three-items",
    ),
    pytest.param(
        "The user wants the person on the left. The person is wearing a red shirt and holds a phone.",
        "the person on the left",
        "The person is wearing a red shirt and holds a phone.",
        id="wants-without-image-phrase",
    ),
    pytest.param(
        "(1) It is the lamp next to the bed. (2) The lamp is tall, with a white shade, to the right of the bed.",
        "the lamp next to the bed",
        "The lamp is tall, with a white shade, to the right of the bed.",
        id="numbered-it-is",
    ),
    pytest.param(
        "The asker is asking for the 1.5 m tall plant in the photo. It is green, leafy and stands in a pot in the "
        "corner.",
        "the 1.5 m tall plant",
        "It is green, leafy and stands in a pot in the corner.",
        id="decimal-is-not-a-marker",
    ),
    pytest.param(
        "(1) Target: the bottle. (2) Attributes: green glass, on the top shelf, between the two jars.",
        "the bottle",
        "green glass, on the top shelf, between the two jars.",
        id="numbered-labels",
    ),
    pytest.param(
        "Sure! 1. The user wants the blue square from the picture.\n\n2. Visual attributes: it is blue, square, and "
        "to the left of the green triangle.",
        "the blue square",
        "it is blue, square, and to the left of the green triangle.",
        id="preamble-numbered-label-in-item-2",
    ),
]


@pytest.mark.parametrize(("answer", "target", "attributes"), CASES)
def test_recognised_shapes_parse_ok(answer: str, target: str, attributes: str) -> None:
    parsed = parse_merged_answer(answer)
    assert (parsed.target, parsed.attributes, parsed.parse_status) == (target, attributes, PARSE_OK)


@pytest.mark.parametrize(
    ("answer", "target", "attributes"),
    [
        ("A red apple. It is round and shiny, on the left of the banana.", "A red apple",
         "It is round and shiny, on the left of the banana."),
        ("It is the lamp next to the bed", "the lamp next to the bed", ""),
        ("colo entity user distin Which colo entity", "colo entity user distin Which colo entity", ""),
        ("  \n ", "", ""),
        ("", "", ""),
    ],
    ids=["two-sentences", "one-sentence", "random-words", "blank", "empty"],
)
def test_unrecognised_answers_fall_back_to_first_sentence(answer: str, target: str, attributes: str) -> None:
    parsed = parse_merged_answer(answer)
    assert (parsed.target, parsed.attributes, parsed.parse_status) == (target, attributes, PARSE_FALLBACK)
