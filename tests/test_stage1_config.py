"""Stage-1 settings in pipeline.toml: the demo keeps today's choices, the paper profiles take the faithful ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, load_config

PIPELINE_TOML = Path(__file__).resolve().parents[1] / "pipeline.toml"


def test_demo_keeps_v1_chat_template_no_padding_and_the_mllm_step1() -> None:
    s1 = load_config(PIPELINE_TOML).stage1
    assert (s1.prompt_version, s1.conversation_format, s1.image_pad_to_square) == ("v1", "chat_template", False)
    assert s1.step1_source == {"semantic": "mllm", "referring": "mllm", "reasoning": "mllm"}
    assert (s1.model, s1.max_embed_tokens, s1.max_new_tokens) == ("mini-llava", 96, 96)


@pytest.mark.parametrize("profile", ["paper-13b", "paper-7b"])
def test_paper_profiles_take_the_papers_and_llava_15s_choices(profile: str) -> None:
    s1 = load_config(PIPELINE_TOML, profile=profile, check_paths=False).stage1
    assert (s1.prompt_version, s1.conversation_format, s1.image_pad_to_square) == ("v2", "llava_v1", True)
    assert s1.step1_source == {"semantic": "template", "referring": "template", "reasoning": "mllm"}
    assert s1.max_embed_tokens == 256


def test_bad_stage1_choices_are_reported_together() -> None:
    overrides = [
        "stage1.prompt_version=v9", "stage1.conversation_format=vicuna",
        'stage1.step1_source={ referring = "templates", captions = "mllm" }',
    ]
    with pytest.raises(ConfigError) as error:
        load_config(PIPELINE_TOML, overrides=overrides)
    assert error.value.problems == [
        "stage1.prompt_version: 'v9' is not one of 'v1', 'v2'",
        "stage1.conversation_format: 'vicuna' is not one of 'chat_template', 'llava_v1'",
        "stage1.step1_source.referring: 'templates' is not one of 'template', 'mllm'",
        "stage1.step1_source.captions: unknown dataset family (have: reasoning, referring, semantic)",
    ]
