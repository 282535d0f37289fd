"""vLLM batched generation against the transformers reference on the tiny LLaVA, and per-row failure handling."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stage1_reason import prompts
from stage1_reason.parsing import parse_merged_answer
from stage1_reason.engine import Request, Result, Sample, TransformersBackend, VllmBackend, run_chain_of_thought


@pytest.fixture(scope="module")
def hf_backend(tiny_llava_dir: Path, vllm_generation_engine: VllmBackend) -> Iterator[TransformersBackend]:
    """The reference, with the shared vLLM engine's generation settings."""
    backend = TransformersBackend(
        str(tiny_llava_dir), max_new_tokens=vllm_generation_engine.max_new_tokens,
        max_model_len=vllm_generation_engine.max_model_len, dtype="float32",
    )
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def demo_samples(demo_images: list[tuple[Image.Image, str]]) -> list[Sample]:
    samples = [Sample(f"demo/{i}", phrase, "phrase", image) for i, (image, phrase) in enumerate(demo_images[:5])]
    samples.append(Sample("demo/q", "Which shape is closest to the top left corner?", "sentence", demo_images[5][0]))
    return samples


@pytest.fixture(scope="module")
def vllm_outputs(vllm_generation_engine: VllmBackend, demo_samples: list[Sample]) -> list:
    return run_chain_of_thought(vllm_generation_engine, demo_samples, cot_steps=3)


def test_vllm_matches_transformers_on_both_turns(
    vllm_generation_engine: VllmBackend, hf_backend: TransformersBackend, demo_samples, vllm_outputs
) -> None:
    reference = run_chain_of_thought(hf_backend, demo_samples, cot_steps=3)
    assert [out.status for out in vllm_outputs] == ["ok"] * len(demo_samples)
    for ref, out in zip(reference, vllm_outputs, strict=True):
        assert out.reason_answer == ref.reason_answer, out.key
        assert out.target_attribute_answer == ref.target_attribute_answer, out.key
        assert out.generated_tokens == ref.generated_tokens, out.key
        assert (out.target, out.attributes, out.seg_text) == (ref.target, ref.attributes, ref.seg_text)
    answers = [out.reason_answer for out in vllm_outputs] + [out.target_attribute_answer for out in vllm_outputs]
    assert all(answer.split() for answer in answers)  # never an immediate end of sequence
    assert sum(len(answer.split()) >= 5 for answer in answers) >= len(answers) // 2
    assert len(set(answers)) > len(answers) // 2
    full_length = 2 * vllm_generation_engine.max_new_tokens
    lengths = [out.generated_tokens for out in vllm_outputs]
    assert min(lengths) < full_length and max(lengths) == full_length  # some answers end on EOS, some run to the limit


def test_second_turn_continues_the_first(vllm_outputs, demo_samples) -> None:
    for sample, out in zip(demo_samples, vllm_outputs, strict=True):
        question = prompts.reason_question(sample.query, sample.query_kind)
        assert out.reason_question == question
        assert out.context_messages == prompts.target_attribute_messages(question, out.reason_answer)
        assert out.parse_status in ("ok", "fallback")
        assert out.seg_text == out.target_attribute_answer  # embedded as written, not rebuilt from the parse


def test_cot_modes_one_and_two(vllm_generation_engine: VllmBackend, demo_samples, vllm_outputs) -> None:
    step_one = run_chain_of_thought(vllm_generation_engine, demo_samples[:3], cot_steps=1)
    step_two = run_chain_of_thought(vllm_generation_engine, demo_samples[:3], cot_steps=2)
    for one, two, three in zip(step_one, step_two, vllm_outputs[:3]):
        assert (one.seg_text, one.parse_status, one.target_attribute_answer) == (three.reason_answer, "skipped", "")
        assert one.context_messages == prompts.reason_messages(three.reason_question)
        assert one.generated_tokens < three.generated_tokens
        # steps 1+2 (paper Table 3a): the step-2 target prompt alone, and the target parsed from its answer is embedded
        assert two.reason_answer == three.reason_answer
        assert two.context_messages == prompts.target_messages(three.reason_question, three.reason_answer)
        assert two.context_messages[-1]["content"][0]["text"] == (
            "Please analyze the conversation and identify the distinct physical objects or areas that the user wants "
            "from the image."
        )
        assert (two.target, two.seg_text) == (parse_merged_answer(two.target_attribute_answer).target,) * 2


def test_templated_step1_skips_the_first_turn(vllm_generation_engine: VllmBackend, demo_samples, vllm_outputs) -> None:
    """Sec. 3.4: a simulated step 1 stands where the MLLM's would be; only the second turn is generated."""
    image = demo_samples[0].image
    calls: list[int] = []
    counting = copy.copy(vllm_generation_engine)
    counting.generate = lambda requests: calls.append(len(requests)) or vllm_generation_engine.generate(requests)
    templated = Sample("ref/0", "the red circle", "phrase", image, None,
                       "Where is the red circle in this image?", "It is the red circle.")
    unreadable = Sample("ref/1", "the red circle", "phrase", None, "cannot identify image file 'y.jpg'",
                        "Where is the red circle in this image?", "It is the red circle.")
    outputs = run_chain_of_thought(counting, [templated, demo_samples[1], unreadable])
    assert calls == [1, 3]  # turn 1 for the MLLM sample only; turn 2 for all (the unreadable one as an error request)
    out, mllm, bad = outputs
    assert (out.reason_question, out.reason_answer, out.reason_source) == (
        "Where is the red circle in this image?", "It is the red circle.", "template"
    )
    assert out.context_messages == prompts.target_attribute_messages(
        "Where is the red circle in this image?", "It is the red circle."
    )
    (again,) = vllm_generation_engine.generate([Request("again", out.context_messages, image)])
    assert (out.generated_tokens, out.target_attribute_answer) == (again.num_tokens, again.text)  # turn 2's tokens only
    assert out.seg_text == out.target_attribute_answer
    assert (mllm.reason_source, mllm.target_attribute_answer) == ("mllm", vllm_outputs[1].target_attribute_answer)
    assert bad.error == "step 2: image: cannot identify image file 'y.jpg'" and bad.reason_source == "template"


def test_bad_rows_become_errors_and_the_rest_proceed(vllm_generation_engine: VllmBackend, demo_samples, vllm_outputs):
    image = demo_samples[0].image
    bad = [
        Sample("bad/unreadable", "the red circle", "phrase", None, "cannot identify image file 'x.jpg'"),
        Sample("bad/empty", "  ", "phrase", image),
        Sample("bad/long", "the red circle next to the blue square " * 300, "phrase", image),
        Sample("bad/array", "the red circle", "phrase", np.zeros((8, 8, 3), dtype=np.float32)),
        Sample("bad/placeholder", "the <image> in the middle", "phrase", image),
    ]
    batch = [demo_samples[0], *bad, demo_samples[1]]
    outputs = run_chain_of_thought(vllm_generation_engine, batch)
    errors = {out.key: out.error for out in outputs if out.status == "error"}
    assert errors["bad/unreadable"] == "step 1: image: cannot identify image file 'x.jpg'"
    assert errors["bad/empty"] == "query: empty query"
    assert errors["bad/long"].startswith("step 1: prompt too long: ")
    engine = vllm_generation_engine
    assert errors["bad/long"].endswith(f"+ {engine.max_new_tokens} new tokens > max_model_len {engine.max_model_len}")
    assert errors["bad/array"].startswith("step 1: bad image: expected a HxWx3 uint8 image array")
    assert "image placeholder '<image>'" in errors["bad/placeholder"]
    assert set(errors) == {s.key for s in bad}
    assert [outputs[0].target_attribute_answer, outputs[-1].target_attribute_answer] == [
        vllm_outputs[0].target_attribute_answer, vllm_outputs[1].target_attribute_answer
    ]


class _FailsOnKey(VllmBackend):
    """The shared engine, but any engine call whose batch holds ``poisoned_key`` raises (an injected engine failure)."""

    def __init__(self, backend: VllmBackend, poisoned_key: str):  # noqa: D107 - shares the engine, starts nothing
        self.__dict__.update(backend.__dict__)
        self.poisoned_key = poisoned_key
        self.calls: list[int] = []

    def _run(self, batch):
        self.calls.append(len(batch))
        if any(item.key == self.poisoned_key for item in batch):
            raise RuntimeError("injected engine failure")
        return super()._run(batch)


def test_a_batch_level_engine_failure_is_isolated_to_its_row(vllm_generation_engine: VllmBackend, demo_samples):
    failing = _FailsOnKey(vllm_generation_engine, "demo/1")
    requests = [Request(s.key, prompts.reason_messages(prompts.reason_question(s.query, s.query_kind)), s.image)
                for s in demo_samples[:3]]
    results = failing.generate(requests)
    clean = vllm_generation_engine.generate(requests)
    assert failing.calls == [3, 1, 1, 1]  # the batch, then row by row
    assert results[1] == Result("demo/1", prompt_tokens=clean[1].prompt_tokens,
                                error="vLLM generation failed: RuntimeError: injected engine failure")
    assert [results[0], results[2]] == [clean[0], clean[2]]


def test_duplicate_keys_are_refused(vllm_generation_engine: VllmBackend, demo_samples) -> None:
    with pytest.raises(ValueError, match="repeated: \\['demo/0'\\]"):
        run_chain_of_thought(vllm_generation_engine, [demo_samples[0], demo_samples[0]])
