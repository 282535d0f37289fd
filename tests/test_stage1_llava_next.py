"""Another architecture through the same code: a tiny LLaVA-NeXT (any-resolution tiles, image-dependent token count)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stage1_reason import prompts
from stage1_reason.engine import Sample, TransformersBackend, VllmBackend, load_processor, run_chain_of_thought
from stage1_reason.tiny_model import resolve_model

MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_llava_next_dir(work_dir: Path) -> str:
    return resolve_model("tiny-llava-next", work_dir)


@pytest.fixture(scope="module")
def next_engine(tiny_llava_next_dir: str, tiny_engine_settings: dict) -> Iterator[VllmBackend]:
    """A vLLM engine for this module only (closed at its end)."""
    backend = VllmBackend(tiny_llava_next_dir, max_new_tokens=MAX_NEW_TOKENS, **tiny_engine_settings)
    yield backend
    backend.close()


def test_vllm_matches_transformers_on_llava_next(tiny_llava_next_dir: str, next_engine: VllmBackend, draw_demo) -> None:
    sizes = [(100, 220), (160, 190), (280, 130), (340, 100)]  # portrait to wide: different tilings
    pictures = [draw_demo(seed, size) for seed, size in enumerate(sizes)]
    samples = [Sample(f"next/{i}", phrase, "phrase", image) for i, (image, phrase) in enumerate(pictures)]
    reference = run_chain_of_thought(
        TransformersBackend(tiny_llava_next_dir, max_new_tokens=MAX_NEW_TOKENS, dtype="float32"), samples
    )
    outputs = run_chain_of_thought(next_engine, samples)
    assert [out.status for out in outputs] == ["ok"] * len(samples)
    for ref, out in zip(reference, outputs, strict=True):
        assert (out.reason_answer, out.target_attribute_answer) == (ref.reason_answer, ref.target_attribute_answer)
        assert out.reason_answer.split() and out.target_attribute_answer.split()

    processor = load_processor(tiny_llava_next_dir)
    prompt_tokens = {
        len(processor(text=[prompts.render_prompt(processor, out.context_messages)], images=[s.image])["input_ids"][0])
        for s, out in zip(samples, outputs)
    }
    assert len(prompt_tokens) == len(samples)  # the image token count follows the image's shape
