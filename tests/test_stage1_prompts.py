"""The paper's chain-of-thought prompts, rendered by the tiny LLaVA's own chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from stage1_reason import prompts
from stage1_reason.engine import load_processor

MERGED = (
    "Follow these guidelines strictly: (1) Please analyze the image and conversations and identify the distinct "
    "physical objects or areas that the asker wants from the image. (2) Briefly describe the target entity or part's "
    "visual attributes that can discriminate them from the image. Each visual attribute can be color, shape, and "
    "relative position to other objects in the image."
)


@pytest.mark.parametrize(
    ("query", "kind", "question"),
    [
        ("the red circle", "phrase", "What is the object or part that is the red circle in this image?"),
        ("dog", "class", "What is the object or part that is dog in this image?"),
        ("  the cup  on the left. ", "phrase", "What is the object or part that is the cup on the left in this image?"),
        ("Which shape is the largest?", "phrase", "Which shape is the largest?"),
        ("something people use to cut bread", "sentence", "something people use to cut bread"),
    ],
)
def test_reason_question(query: str, kind: str, question: str) -> None:
    assert prompts.reason_question(query, kind) == question


def test_bad_inputs_are_rejected_with_their_name() -> None:
    with pytest.raises(ValueError, match="empty query"):
        prompts.reason_question("   ", "phrase")
    with pytest.raises(ValueError, match="unknown prompt_version 'v0'"):
        prompts.reason_question("dog", "class", prompt_version="v0")
    with pytest.raises(ValueError, match="cot_steps"):
        prompts.seg_text(4, "a", "b", "c")


def test_version_v1_holds_the_paper_prompts() -> None:
    assert prompts.PROMPT_VERSION == "v1"
    assert prompts.prompt_set("v1").target_attribute_prompt == MERGED


def test_two_turns_render_in_the_llava_template(tiny_llava_dir: Path) -> None:
    processor = load_processor(str(tiny_llava_dir))
    question = prompts.reason_question("the red circle", "phrase")
    turn_one = prompts.render_prompt(processor, prompts.reason_messages(question))
    assert turn_one == f"USER: <image>\n{question} ASSISTANT:"
    turn_two = prompts.render_prompt(processor, prompts.target_attribute_messages(question, " It is a red circle. "))
    assert turn_two == f"USER: <image>\n{question} ASSISTANT: It is a red circle. USER: {MERGED} ASSISTANT:"


MERGED_ANSWER = "The user wants the fire from the image, which is bright orange and surrounded by grey rocks."


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (1, "It is the fire in the pit."),
        (2, "the fire"),
        (3, MERGED_ANSWER),  # as the MLLM wrote it: the attributes in the target's sentence are kept
    ],
)
def test_seg_text_per_cot_mode(steps: int, expected: str) -> None:
    attributes = "which is bright orange and surrounded by grey rocks."
    seg_answer = f" {MERGED_ANSWER} "
    assert prompts.seg_text(steps, " It is the fire in the pit. ", "the fire", attributes, seg_answer=seg_answer) == expected


def test_seg_text_rules_name_each_mode() -> None:
    assert prompts.SEG_TEXT_RULES == {
        1: "step-1 answer as written",
        2: "target parsed from the step-2 answer",
        3: "merged step-2/3 answer as written",
    }


def test_seg_text_without_the_merged_answer_joins_the_parts() -> None:
    assert prompts.seg_text(3, "answer", "the fire", "It is bright orange.") == "the fire. It is bright orange."
    assert prompts.seg_text(3, "answer", "the fire", "It is bright orange.", seg_answer="  ") == (
        "the fire. It is bright orange."
    )


def test_seg_text_with_a_missing_part() -> None:
    assert prompts.seg_text(3, "answer", "the fire", "") == "the fire"
    assert prompts.seg_text(3, "answer", "", "bright orange") == "bright orange"
    assert prompts.seg_text(2, "answer", "", "bright orange") == ""


V2_BLOCK = "Here is the conversation:\nThe question is: {q}\nThe answer is: {a}\n"


def test_version_v2_is_section_3_2_word_for_word() -> None:
    question = prompts.reason_question("the fire", "phrase", "v2")
    assert question == "What is the object or part that is the fire in this image?"
    answer = "It is fire in the fire pit."
    target = prompts.target_messages(question, f" {answer} ", "v2")
    assert target[-1] == {"role": "user", "content": [{"type": "text", "text": V2_BLOCK.format(q=question, a=answer) + (
        "Please analyze the conversation and identify the distinct physical objects or areas that the user wants from "
        "the image."
    )}]}
    merged = prompts.target_attribute_messages(question, answer, "v2")
    assert merged[-1]["content"][0]["text"] == V2_BLOCK.format(q=question, a=answer) + (
        "Follow these guidelines strictly: (1) Please analyze the conversation and identify the distinct physical "
        "objects or areas that the user wants from the image. (2) Briefly describe the target entity or part's visual "
        "attributes that can discriminate them from the image. Each visual attribute can be color, shape, and relative "
        "position to other objects in the image."
    )
    assert merged[:2] == target[:2] == prompts.reason_messages(question) + [
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    ]
    assert prompts.second_turn_prompt(merged) == merged[-1]["content"][0]["text"]


def test_v1_second_turns_keep_their_wording() -> None:
    merged = prompts.target_attribute_messages("Q?", "It is {braces} kept.", "v1")
    assert merged[-1]["content"][0]["text"] == MERGED and merged[1]["content"][0]["text"] == "It is {braces} kept."
