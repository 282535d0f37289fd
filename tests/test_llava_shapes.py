"""LLaVA-1.5-7B/13B at their real shapes: the configs and parameter counts, checked without allocating weights; the
random-weight writer on a tiny config."""

from __future__ import annotations

import json

import pytest
import torch

from stage1_reason import llava_shapes


@pytest.mark.parametrize(
    ("shape", "dims", "expected"),
    [
        ("llava-1.5-7b", (4096, 32, 11008, 32), 7_063_427_072),  # llava-hf/llava-1.5-7b-hf's count
        ("llava-1.5-13b", (5120, 40, 13824, 40), 13_351_494_656),
    ],
)
def test_config_shapes_and_parameter_count(shape, dims, expected, tmp_path):
    from transformers import LlavaConfig

    llava_shapes.llava_config(shape).save_pretrained(tmp_path)
    config = LlavaConfig.from_pretrained(tmp_path)  # what the builder writes, read back
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.num_attention_heads) == dims
    assert (text.num_key_value_heads, text.vocab_size) == (dims[3], 32064)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size, vision.num_attention_heads) == (
        1024, 24, 4096, 16)
    assert (vision.image_size, vision.patch_size, config.vision_feature_layer) == (336, 14, -2)
    counts = llava_shapes.parameter_count(config)
    assert counts["total"] == expected
    assert counts["vision"] == 303_507_456  # CLIP ViT-L/14-336 without its projection head
    assert counts["projector"] == 1024 * dims[0] + dims[0] + dims[0] ** 2 + dims[0]
    # the same count from the module itself, built on the meta device (no memory)
    assert sum(t.numel() for t in llava_shapes.meta_state_dict(config).values()) == expected


def test_unknown_shape():
    with pytest.raises(ValueError, match="llava-1.5-7b"):
        llava_shapes.llava_config("llava-1.5-70b")


def test_processor_at_336_gives_576_image_tokens():
    from PIL import Image

    from stage1_reason.tiny_model import IMAGE_TOKEN, _make_processor, _train_tokenizer

    processor = _make_processor(_train_tokenizer(), "llava", image_size=llava_shapes.IMAGE_SIZE)
    inputs = processor(text=["USER: <image>\nWhat is it? ASSISTANT:"], images=[Image.new("RGB", (500, 300))],
                       return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert inputs["pixel_values"].shape[-2:] == (336, 336)
    assert int((inputs["input_ids"] == image_id).sum()) == llava_shapes.NUM_IMAGE_TOKENS == 576


def test_build_on_a_tiny_config(tmp_path, monkeypatch):
    """The builder of the 7B/13B folders, run on the tiny LLaVA's config: sharded safetensors that transformers loads,
    a processor, LM-head rows of specials and missing tokens zeroed, so answers are words and run to max_new_tokens."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from stage1_reason.tiny_model import IMAGE_SIZE, _make_config

    monkeypatch.setattr(llava_shapes, "llava_config", lambda shape, ids=None: _make_config(
        1024, ids or llava_shapes._default_ids(), "llava"))
    monkeypatch.setattr(llava_shapes, "IMAGE_SIZE", IMAGE_SIZE)
    monkeypatch.setattr(llava_shapes, "SHARD_BYTES", 256 * 1024)
    folder = llava_shapes.build_random_llava("llava-1.5-7b", tmp_path / "random", seed=0)
    assert llava_shapes.build_random_llava("llava-1.5-7b", folder, seed=0) == folder  # complete copy reused
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    lm_head = model.lm_head.weight.detach()
    eos = processor.tokenizer.eos_token_id
    assert lm_head[eos].abs().sum() == 0 and lm_head[eos + 1:eos + 3].abs().sum() == 0
    assert 0.015 < float(model.model.language_model.layers[0].mlp.up_proj.weight.detach().std()) < 0.025
    inputs = processor(text=["USER: <image>\nWhat is it? ASSISTANT:"], images=[Image.new("RGB", (200, 100))],
                       return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:]
    assert len(new) == 6 and eos not in new.tolist()
    assert processor.tokenizer.decode(new).strip()
