"""LLaVA-1.5's own conventions (system message + "</s>", pad to square) render and run the same in vLLM and transformers."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stage1_reason import prompts
from stage1_reason.chain import Sample, run_chain_of_thought
from stage1_reason.embed import EmbedRequest, TransformersEmbedder, VllmEmbedder, locate_seg_span
from stage1_reason.engine import Request, TransformersBackend, VllmBackend, load_processor
from stage1_reason.llava_conventions import LLAVA_V1_SYSTEM, clip_mean_colour, expand2square, render_llava_v1

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the human's questions."
)
CLIP_MEAN_COLOUR = (122, 116, 104)  # int(255 * (0.48145466, 0.4578275, 0.40821073))


def test_the_system_message_is_llava_15s() -> None:
    assert LLAVA_V1_SYSTEM == SYSTEM


def test_two_turns_render_in_llava_v1(tiny_llava_dir: Path) -> None:
    processor = load_processor(str(tiny_llava_dir))
    question = prompts.reason_question("the red circle", "phrase")
    turn_one = prompts.render_prompt(processor, prompts.reason_messages(question), "llava_v1")
    assert turn_one == f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
    messages = prompts.target_attribute_messages(question, " It is a red circle. ")
    turn_two = prompts.render_prompt(processor, messages, "llava_v1")
    merged = prompts.prompt_set("v1").target_attribute_prompt
    assert turn_two == f"{SYSTEM} USER: <image>\n{question} ASSISTANT: It is a red circle.</s>USER: {merged} ASSISTANT:"
    ids = processor.tokenizer(turn_two)["input_ids"]
    eos = processor.tokenizer.convert_tokens_to_ids("</s>")
    assert ids.count(eos) == 1  # "</s>" is read as the end-of-sequence token, not as characters
    with pytest.raises(ValueError, match="message 0: role 'system'"):
        render_llava_v1([{"role": "system", "content": "x"}])


def test_seg_text_span_in_llava_v1(tiny_llava_dir: Path) -> None:
    processor = load_processor(str(tiny_llava_dir))
    messages = prompts.target_attribute_messages("Where is it?", "It is a red circle.")
    span = locate_seg_span(processor, messages, "The target in the image is the red circle.", "llava_v1")
    assert span.text == prompts.render_prompt(processor, messages, "llava_v1") + " The target in the image is the red circle."
    assert processor.tokenizer.decode(span.token_ids) == " The target in the image is the red circle."


def test_expand2square_pads_with_the_clip_mean_colour(tiny_llava_dir: Path) -> None:
    processor = load_processor(str(tiny_llava_dir))
    assert clip_mean_colour(processor) == CLIP_MEAN_COLOUR
    wide = Image.fromarray(np.full((2, 6, 3), 200, np.uint8))
    square = np.asarray(expand2square(wide, CLIP_MEAN_COLOUR))
    assert square.shape == (6, 6, 3)
    assert (square[2:4] == 200).all()  # the image, centred: rows 2 and 3
    assert (square[[0, 1, 4, 5]] == CLIP_MEAN_COLOUR).all()
    tall = np.asarray(expand2square(Image.fromarray(np.full((5, 2, 3), 9, np.uint8)), CLIP_MEAN_COLOUR))
    assert tall.shape == (5, 5, 3) and (tall[:, 1:3] == 9).all() and (tall[:, [0, 3, 4]] == CLIP_MEAN_COLOUR).all()
    same = Image.new("RGB", (4, 4))
    assert expand2square(same, CLIP_MEAN_COLOUR) is same


def _with_conventions(backend, conversation_format: str, pad_colour):
    """The same engine (nothing new is started) rendering with LLaVA-1.5's conventions."""
    view = copy.copy(backend)
    view.conversation_format, view.pad_colour = conversation_format, pad_colour
    return view


@pytest.fixture(scope="module")
def llava_backends(tiny_llava_dir: Path, vllm_generation_engine: VllmBackend) -> Iterator[tuple]:
    hf = TransformersBackend(
        str(tiny_llava_dir), max_new_tokens=vllm_generation_engine.max_new_tokens,
        max_model_len=vllm_generation_engine.max_model_len, dtype="float32", conversation_format="llava_v1",
        pad_to_square=True,
    )
    yield _with_conventions(vllm_generation_engine, "llava_v1", CLIP_MEAN_COLOUR), hf
    hf.close()


def test_both_backends_prepare_the_same_padded_image_and_prompt(llava_backends, demo_images) -> None:
    vllm_view, hf = llava_backends
    image, phrase = demo_images[3]  # 159 x 121
    question = prompts.reason_question(phrase, "phrase")
    request = Request("wide", prompts.reason_messages(question), image)
    ours, theirs = vllm_view._prepare(0, request), hf._prepare(0, request)
    assert ours.prompt == theirs.prompt == f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
    assert ours.image.size == theirs.image.size == (159, 159)
    assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))
    assert tuple(np.asarray(ours.image)[0, 0]) == CLIP_MEAN_COLOUR  # row 0 is padding: (159 - 121) // 2 = 19 rows
    assert np.array_equal(np.asarray(ours.image)[19:140], np.asarray(image))


def test_vllm_matches_transformers_with_llava_conventions(llava_backends, demo_images) -> None:
    vllm_view, hf = llava_backends
    samples = [Sample(f"demo/{i}", phrase, "phrase", image) for i, (image, phrase) in enumerate(demo_images[:4])]
    ours, reference = run_chain_of_thought(vllm_view, samples), run_chain_of_thought(hf, samples)
    assert [out.status for out in ours] == ["ok"] * 4
    for out, ref in zip(ours, reference, strict=True):
        assert (out.reason_answer, out.target_attribute_answer, out.generated_tokens) == (
            ref.reason_answer, ref.target_attribute_answer, ref.generated_tokens
        ), out.key


def test_vllm_embeddings_match_transformers_with_llava_conventions(
    tiny_llava_dir: Path, vllm_pooling_engine: VllmEmbedder, demo_images
) -> None:
    vllm_view = _with_conventions(vllm_pooling_engine, "llava_v1", CLIP_MEAN_COLOUR)
    hf = TransformersEmbedder(str(tiny_llava_dir), max_embed_tokens=vllm_pooling_engine.max_embed_tokens,
                              conversation_format="llava_v1", pad_to_square=True)
    try:
        requests = []
        for i, (image, phrase) in enumerate(demo_images[2:5]):
            question = prompts.reason_question(phrase, "phrase")
            messages = prompts.target_attribute_messages(question, f"It is {phrase}.")
            requests.append(EmbedRequest(f"row/{i}", messages, f"The target in the image is {phrase}.", image))
        ours, reference = vllm_view.embed(requests), hf.embed(requests)
    finally:
        hf.close()
    for result, ref in zip(ours, reference, strict=True):
        assert result.ok and ref.ok, (result.error, ref.error)
        assert np.array_equal(result.token_ids, ref.token_ids)
        a, b = result.embedding.astype(np.float32), ref.embedding.astype(np.float32)
        assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
