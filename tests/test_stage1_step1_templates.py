"""Sec. 3.4's simulated step 1: Q-A templates chosen from each sample's id and the seed."""

from __future__ import annotations

from stage1_reason.step1_templates import (
    ANSWER_TEMPLATES,
    QUESTION_TEMPLATES,
    SimulatedStep1,
    simulated_step1,
    step1_is_templated,
    template_indices,
)


def test_templates_are_chosen_from_the_sample_id_and_seed() -> None:
    assert template_indices("refcoco/train/1/0", 0) == (1, 2)
    assert template_indices("refcoco/train/1/0", 1) == (2, 3)
    assert template_indices("cocostuff/train/5/3", 0) == (2, 3)
    assert simulated_step1("refcoco/train/1/0", " the red  circle on the left. ", "phrase") == SimulatedStep1(
        "Can you find the red circle on the left in this image?", "The object is the red circle on the left."
    )
    assert simulated_step1("cocostuff/train/5/3", "dog", "class") == SimulatedStep1(
        "Where is dog in this image?", "Sure, it is dog."
    )


def test_every_template_is_used_over_many_samples() -> None:
    picks = [template_indices(f"refcoco/train/{i}/0", 0) for i in range(200)]
    assert {q for q, _ in picks} == set(range(len(QUESTION_TEMPLATES)))
    assert {a for _, a in picks} == set(range(len(ANSWER_TEMPLATES)))


def test_questions_sentences_and_empty_queries_are_left_to_the_mllm() -> None:
    assert simulated_step1("a", "Which one is red?", "phrase") is None
    assert simulated_step1("a", "something people sit on", "sentence") is None
    assert simulated_step1("a", "   ", "phrase") is None


def test_family_choice() -> None:
    source = {"referring": "template", "semantic": "template", "reasoning": "mllm"}
    assert [step1_is_templated(f, source) for f in ("referring", "semantic", "reasoning")] == [True, True, False]
    assert step1_is_templated("referring", {}) is False
