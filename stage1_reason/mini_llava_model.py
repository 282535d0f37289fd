"""The mini LLaVA's architecture, tokenizer and processor: a small LLaVA-1.5 for the demo world, before training.

A CLIP vision tower (image 128, patch 16 -> 8x8 = 64 image tokens, hidden 128, 2 heads of 64, 4 layers; features from
the second-to-last layer as LLaVA-1.5 takes them), LLaVA-1.5's two-layer GELU MLP projector, and a Llama decoder
(hidden 256, 4 heads of 64: vLLM's CPU attention kernel needs head_dim 64; 4 layers, MLP 512). About 4.0 M parameters. The tokenizer is a byte-level
BPE trained on the world's texts and the project's prompts, so every word the world uses is one token and any other
text still encodes; ``<image>`` is a special token; the chat template is the project's LLaVA-1.5 template (the same as
the tiny LLaVA's). Images are resized to 128x128 without a crop, so objects near the edges stay in view.

Weights are saved in the llava-hf hub layout that vLLM reads (see ``tiny_model._hub_state_dict``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from manifests.demo import render_scene
from manifests.demo_text import queries, reason_answer, target_answer, target_attribute_answer
from stage1_reason import prompts
from stage1_reason.tiny_model import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS, _hub_state_dict

MINI_MODEL_NAME = "mini-llava"
IMAGE_SIZE = 128
PATCH_SIZE = 16
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
VOCAB_SIZE = 1024
TEXT = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
VISION = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 2}


def tokenizer_corpus(scenes: int = 400, seed: int = 0) -> list[str]:
    """Texts the tokenizer is trained on: every prompt of every prompt version and the world's queries and answers."""
    texts = ["USER: ASSISTANT: SYSTEM: 0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ( ) ' \" - /"]
    for version in sorted(prompts.PROMPTS):
        prompt_set = prompts.PROMPTS[version]
        texts += [prompt_set.reason_template, prompt_set.target_attribute_prompt, prompt_set.target_prompt]
    rng = random.Random(seed)
    for index in range(scenes):
        scene = render_scene("train", index, seed).scene
        for query, explanation in queries(scene, True) + queries(scene, False):
            texts += [query, reason_answer(scene, explanation)]
        texts += [target_attribute_answer(scene), target_answer(scene)]
    rng.shuffle(texts)
    return texts


def train_tokenizer(corpus: list[str]) -> Any:
    """Byte-level BPE (vocabulary ``VOCAB_SIZE``) with the Llama specials and ``<image>`` as added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tokenizer


def make_processor(backend: Any) -> Any:
    """``LlavaProcessor``: the trained tokenizer with the project's chat template, a CLIP image processor at 128 px."""
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def make_config(processor: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TEXT,
        num_key_value_heads=TEXT["num_attention_heads"],
        max_position_embeddings=2048,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        **VISION, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=VISION["hidden_size"]
    )
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=ids[IMAGE_TOKEN],
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        pad_token_id=ids["<pad>"],
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def new_model(config: Any, seed: int) -> Any:
    """A freshly initialised LlavaForConditionalGeneration (float32, deterministic for ``seed``)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def save_model(model: Any, processor: Any, folder: Path) -> None:
    """config, safetensors (hub layout), generation config, processor and tokenizer files into ``folder``."""
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    model.config.save_pretrained(folder)
    save_file(_hub_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    ).save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
