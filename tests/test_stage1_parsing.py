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


# Every step-2 and step-3 text printed in the paper (Sec. 3.2 and Figure 4), and the answers of the shapes LLaVA-1.5
# writes (a following clause ends the target).
PAPER_CASES = [
    pytest.param("The target entity in the image is the piano bench.", "the piano bench", "", id="fig4-1-step2"),
    pytest.param(
        "The target entity in the image is the piano bench, which is a seating area designed for the pianist to sit "
        "while playing the grand piano. The bench is located in front of the piano, providing a comfortable and "
        "ergonomic position for the pianist. There is only one piano bench in the image, and it is black in color.",
        "the piano bench",
        "which is a seating area designed for the pianist to sit while playing the grand piano. The bench is located in "
        "front of the piano, providing a comfortable and ergonomic position for the pianist. There is only one piano "
        "bench in the image, and it is black in color.",
        id="fig4-1-step3",
    ),
    pytest.param("The target entity in the image is the bark of the tree.", "the bark of the tree", "",
                 id="fig4-2-step2"),
    pytest.param(
        "In the image, the target is the bark of the tree. It has a rough texture and a brown color, which can "
        "discriminate it from the tree's leaves and branches. The bark is also the area where the large insect, "
        "possibly a caterpillar, is clinging to.",
        "the bark of the tree",
        "It has a rough texture and a brown color, which can discriminate it from the tree's leaves and branches. The "
        "bark is also the area where the large insect, possibly a caterpillar, is clinging to.",
        id="fig4-2-step3",
    ),
    pytest.param("The target entity in the image is the wedding ring on the man's finger.",
                 "the wedding ring on the man's finger", "", id="fig4-3-step2"),
    pytest.param(
        "The target in the image is the wedding ring on the man's finger. It has a circular shape and is made of "
        "metal, which can discriminate it from the other objects in the image.",
        "the wedding ring on the man's finger",
        "It has a circular shape and is made of metal, which can discriminate it from the other objects in the image.",
        id="fig4-3-step3",
    ),
    pytest.param("The target entity in the image is the man standing behind the young girl.",
                 "the man standing behind the young girl", "", id="fig4-4-step2"),
    pytest.param(
        "The target in the image is the man standing behind the young girl. He is wearing a black jacket, which can be "
        "used to discriminate him from the other people in the scene.",
        "the man standing behind the young girl",
        "He is wearing a black jacket, which can be used to discriminate him from the other people in the scene.",
        id="fig4-4-step3",
    ),
    pytest.param("The user wants the fire from the image.", "the fire", "", id="sec3.2-step2"),
    pytest.param("The object that the asker wants from the image is the piano bench", "the piano bench", "",
                 id="object-that-the-asker-wants"),
    pytest.param(
        "The user wants the fire from the image, which is bright orange and surrounded by grey rocks.",
        "the fire", "which is bright orange and surrounded by grey rocks.", id="which-clause-after-image",
    ),
    pytest.param(
        "The user wants the piano bench from the image, located in front of the grand piano.",
        "the piano bench", "located in front of the grand piano.", id="located-clause",
    ),
    pytest.param(
        "The target entity in the image is the piano bench, located in front of the grand piano. It is black.",
        "the piano bench", "located in front of the grand piano. It is black.", id="target-entity-located-clause",
    ),
    pytest.param(
        "The distinct physical objects or areas that the asker wants from the image are the rocks and the leaf.",
        "the rocks and the leaf", "", id="areas-that-the-asker-wants-are",
    ),
    pytest.param("The user wants the green circle from the image.", "the green circle", "", id="step2-alone"),
    pytest.param(
        "The target entity in the image is the green circle. It is green and round, to the left of the red square.",
        "the green circle", "It is green and round, to the left of the red square.", id="merged-target-entity",
    ),
]


@pytest.mark.parametrize(("answer", "target", "attributes"), CASES + PAPER_CASES)
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
