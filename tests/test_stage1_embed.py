"""seg_text embeddings: vLLM's batched prefill against transformers' hidden_states[-1], token spans, input mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from stage1_reason import prompts
from stage1_reason.embed import (
    EmbedRequest,
    TokenIdEmbedder,
    TransformersEmbedder,
    VllmEmbedder,
    embed_requests,
    export_input_embeddings,
    locate_seg_span,
)
from stage1_reason.engine import ReasonOutput, Sample, load_processor

SEG_TEXTS = [
    "the red circle. It is red and round, to the left of the blue square.",
    "the yellow square",
    "the green circle. It is green, small and at the bottom right corner of the image, below the red square and next "
    "to the blue circle, which is larger.",
    "colo entity user distin Which colo entity user distin Which",
]


@pytest.fixture(scope="module")
def requests_in(demo_images: list[tuple[Image.Image, str]]) -> list[EmbedRequest]:
    """Rows in both conversation shapes: after turn 2 (cot_steps 2/3) and after turn 1 (cot_steps 1)."""
    rows = []
    for i, seg in enumerate(SEG_TEXTS):
        image, phrase = demo_images[i]
        question = prompts.reason_question(phrase, "phrase")
        messages = (prompts.reason_messages(question) if i % 2 else
                    prompts.target_attribute_messages(question, f"It is {phrase} in the picture."))
        rows.append(EmbedRequest(f"row/{i}", messages, seg, image))
    return rows


@pytest.fixture(scope="module")
def hf_embedder(tiny_llava_dir: Path, vllm_pooling_engine: VllmEmbedder) -> Iterator[TransformersEmbedder]:
    embedder = TransformersEmbedder(str(tiny_llava_dir), max_embed_tokens=vllm_pooling_engine.max_embed_tokens)
    yield embedder
    embedder.close()


def test_vllm_hidden_states_equal_transformers(vllm_pooling_engine: VllmEmbedder, hf_embedder, requests_in) -> None:
    cap = vllm_pooling_engine.max_embed_tokens
    results = vllm_pooling_engine.embed(requests_in)
    reference = hf_embedder.embed(requests_in)
    assert vllm_pooling_engine.dim == hf_embedder.dim == 128
    capped = 0
    for result, ref in zip(results, reference, strict=True):
        assert result.ok and ref.ok, (result.error, ref.error)
        assert result.embedding.dtype == np.float16 and result.token_ids.dtype == np.int32
        assert result.embedding.shape == (min(result.num_seg_tokens, cap), 128)
        assert np.array_equal(result.token_ids, ref.token_ids)
        ours, theirs = result.embedding.astype(np.float32), ref.embedding.astype(np.float32)
        cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
        assert cosine.min() > 0.9999
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1), rtol=2e-3)
        capped += result.num_seg_tokens > cap
    assert capped >= 2 and results[1].num_seg_tokens < cap  # both the cap and short spans are exercised


def test_span_is_seg_text_as_the_assistant_answer(tiny_llava_dir: Path, requests_in) -> None:
    processor = load_processor(str(tiny_llava_dir))
    for request in requests_in:
        span = locate_seg_span(processor, request.messages, request.seg_text)
        assert span.text == prompts.render_prompt(processor, request.messages) + " " + request.seg_text
        full = processor.tokenizer(span.text)["input_ids"]
        assert full[-len(span.token_ids):] == span.token_ids
        assert processor.tokenizer.decode(span.token_ids) == " " + request.seg_text
        prefix = processor.tokenizer(prompts.render_prompt(processor, request.messages))["input_ids"]
        assert full[: len(prefix)] == prefix and len(prefix) + len(span.token_ids) == len(full)


def test_input_mode_rows_and_exported_table(tiny_llava_dir: Path, tmp_path: Path, vllm_pooling_engine, requests_in):
    token_embedder = TokenIdEmbedder(str(tiny_llava_dir), max_embed_tokens=vllm_pooling_engine.max_embed_tokens)
    rows = token_embedder.embed(requests_in)
    hidden = vllm_pooling_engine.embed(requests_in[:2])
    assert token_embedder.mode == "input" and token_embedder.dim == 128
    assert all(row.ok and row.embedding is None for row in rows)
    assert [r.token_ids.tolist() for r in rows[:2]] == [h.token_ids.tolist() for h in hidden]

    path = export_input_embeddings(str(tiny_llava_dir), tmp_path / "input_embeddings.safetensors")
    with safe_open(str(path), "pt") as handle:
        table = handle.get_tensor("input_embeddings")
        metadata = handle.metadata()
    with safe_open(str(tiny_llava_dir / "model.safetensors"), "pt") as handle:
        source = handle.get_tensor("language_model.model.embed_tokens.weight")
    assert table.dtype == torch.float16 and table.shape == source.shape
    assert torch.equal(table, source.half())
    assert metadata["source_tensor"] == "language_model.model.embed_tokens.weight" and metadata["dim"] == "128"
    looked_up = table[torch.from_numpy(rows[0].token_ids).long()]
    assert looked_up.shape == (len(rows[0].token_ids), 128)


def test_bad_rows_are_errors_and_the_rest_proceed(vllm_pooling_engine: VllmEmbedder, requests_in) -> None:
    good = requests_in[1]
    batch = [
        good,
        EmbedRequest("bad/upstream", good.messages, good.seg_text, good.image, "step 2: prompt too long"),
        EmbedRequest("bad/empty", good.messages, "   ", good.image),
        EmbedRequest("bad/no-image", good.messages, good.seg_text, None),
        EmbedRequest("bad/long", good.messages, "red circle " * 1200, good.image),
    ]
    results = vllm_pooling_engine.embed(batch)
    assert [r.error for r in results] == [
        None,
        "step 2: prompt too long",
        "embedding input: ValueError: empty seg_text",
        "no image given for the request",
        results[4].error,
    ]
    assert results[4].error.startswith("embedding prompt too long: ") and "> max_model_len 2048" in results[4].error
    alone = vllm_pooling_engine.embed([good])[0]
    assert np.array_equal(results[0].embedding, alone.embedding)


def test_embed_requests_follow_reasoning_outputs() -> None:
    image = Image.new("RGB", (32, 32))
    samples = [Sample("a", "dog", "class", image), Sample("b", "cat", "class", image)]
    messages = prompts.reason_messages("What?")
    outputs = [ReasonOutput("a", seg_text="the dog", context_messages=messages),
               ReasonOutput("b", error="step 1: bad image")]
    assert embed_requests(samples, outputs) == [
        EmbedRequest("a", messages, "the dog", image, None),
        EmbedRequest("b", [], "", image, "step 1: bad image"),
    ]
