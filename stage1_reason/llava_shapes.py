"""LLaVA-1.5-7B and -13B at their real shapes, with random weights, built from a config alone (no download).

``llava_config("llava-1.5-7b")`` is a ``LlavaConfig`` with the dimensions of ``llava-hf/llava-1.5-7b-hf`` (Llama text
model: hidden 4096, 32 layers, intermediate 11008, 32 heads; 13B: 5120, 40, 13824, 40; vocab 32064; CLIP ViT-L/14-336
vision tower: 24 layers, hidden 1024, 16 heads, 577 tokens; a 2-layer GELU MLP projector). ``parameter_count`` counts
its parameters from the config (7,063,427,072, the count of llava-hf's 7B checkpoint, and 13,351,494,656), so shapes
can be checked without allocating anything.

``build_random_llava`` writes such a model to a local folder that vLLM and transformers load, with the tiny LLaVA's
tokenizer, chat template and processor (``stage1_reason.tiny_model``; images at 336 px -> 576 image tokens) and random
weights in the hub layout, as sharded safetensors written one tensor at a time (the model is never built in memory).
The output rows of tokens the tokenizer does not have, of special tokens (end of sequence included) and of byte pieces
are zeroed, as in the tiny LLaVA: answers are words and always run to ``max_new_tokens``. It is a throughput model:
its answers mean nothing, and its prompts tokenize into a different number of tokens than Llama's tokenizer would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

VOCAB_SIZE = 32064  # llava-hf's LLaVA-1.5: Llama's 32000 + <image> + <pad>, padded to a multiple of 64
IMAGE_SIZE = 336
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576; the CLS token (the 577th) is dropped ("default" strategy)
SHARD_BYTES = 2 * 1024**3
COMPLETE_MARKER = "random_llava.complete.json"
BUILD_FORMAT = 1


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int


SHAPES: dict[str, TextShape] = {
    "llava-1.5-7b": TextShape(4096, 32, 11008, 32),
    "llava-1.5-13b": TextShape(5120, 40, 13824, 40),
}


def _default_ids() -> dict[str, int]:
    from stage1_reason.tiny_model import SPECIAL_TOKENS

    return {token: index for index, token in enumerate(SPECIAL_TOKENS)}  # what _train_tokenizer assigns


def llava_config(shape: str, ids: dict[str, int] | None = None) -> Any:
    """The ``LlavaConfig`` of a real LLaVA-1.5 shape; ``ids`` are the tokenizer's special-token ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown LLaVA shape {shape!r}; known: {sorted(SHAPES)}")
    text = SHAPES[shape]
    ids = ids or _default_ids()
    text_config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_attention_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=ids["<image>"],
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        pad_token_id=ids["<pad>"],
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def parameter_count(config: Any) -> dict[str, int]:
    """Parameters of a LLaVA-1.5 config by part (``text``, ``vision``, ``projector``, ``total``), from its numbers.

    Text (Llama): embedding + LM head (V x D each), per layer q/k/v/o, gate/up/down and two RMSNorms, a final norm.
    Vision (CLIP ViT): patch conv (no bias), class embedding, position embeddings, pre/post LayerNorms, per layer
    q/k/v/o and fc1/fc2 with biases and two LayerNorms. Projector: Linear(Dv, D) + GELU + Linear(D, D), with biases.
    """
    text, vision = config.text_config, config.vision_config
    d, ff, vocab = text.hidden_size, text.intermediate_size, text.vocab_size
    kv = text.num_key_value_heads * (d // text.num_attention_heads)
    text_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    text_params = 2 * vocab * d + text.num_hidden_layers * text_layer + d
    dv, ffv = vision.hidden_size, vision.intermediate_size
    positions = (vision.image_size // vision.patch_size) ** 2 + 1
    vision_layer = 4 * (dv * dv + dv) + (dv * ffv + ffv) + (ffv * dv + dv) + 2 * 2 * dv
    vision_params = (
        3 * vision.patch_size**2 * dv + dv + positions * dv + 2 * 2 * dv + vision.num_hidden_layers * vision_layer
    )
    projector_params = (dv * d + d) + (d * d + d)
    return {
        "text": text_params,
        "vision": vision_params,
        "projector": projector_params,
        "total": text_params + vision_params + projector_params,
    }


def meta_state_dict(config: Any) -> dict[str, torch.Tensor]:
    """The model's tensors in the hub layout, on the meta device (names and shapes; nothing allocated)."""
    from transformers import LlavaForConditionalGeneration

    from stage1_reason.tiny_model import _hub_state_dict

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return _hub_state_dict(model)


def _random_tensor(name: str, like: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """1-D weights are norms (ones), biases are zeros, the rest N(0, 0.02) like transformers' initialiser."""
    if name.endswith("bias"):
        return torch.zeros(like.shape, dtype=dtype)
    if like.dim() == 1 and not name.endswith("class_embedding"):
        return torch.ones(like.shape, dtype=dtype)
    return (torch.randn(like.shape, generator=generator, dtype=torch.float32) * 0.02).to(dtype)


def _write_weights(folder: Path, config: Any, keep_rows: list[int], seed: int, dtype: torch.dtype) -> None:
    """Sharded safetensors + index, one tensor generated at a time; LM-head rows not in ``keep_rows`` zeroed."""
    generator = torch.Generator().manual_seed(seed)
    tensors = meta_state_dict(config)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, like in tensors.items():
        nbytes = like.numel() * dtype.itemsize
        if sizes[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = like  # placeholder; filled when its shard is written
        sizes[-1] += nbytes
    weight_map = {}
    for index, shard in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        filled = {}
        for name, like in shard.items():
            tensor = _random_tensor(name, like, dtype, generator)
            if name == "language_model.lm_head.weight":
                mask = torch.zeros(tensor.shape[0], dtype=torch.bool)
                mask[keep_rows] = True
                tensor[~mask] = 0
            filled[name] = tensor
            weight_map[name] = file_name
        save_file(filled, str(folder / file_name), metadata={"format": "pt"})
        logger.info("random LLaVA: wrote %s (%d tensors)", file_name, len(filled))
        del filled
    total = sum(sizes)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n"
    )


def _write_model(folder: Path, shape: str, seed: int, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    from stage1_reason.tiny_model import SPECIAL_TOKENS, _is_wordlike, _make_processor, _train_tokenizer

    backend = _train_tokenizer()
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    processor = _make_processor(backend, "llava", image_size=IMAGE_SIZE)
    config = llava_config(shape, ids)
    config.torch_dtype = dtype  # what transformers 5 writes as "dtype"
    keep_rows = [
        token_id for token, token_id in backend.get_vocab().items()
        if token not in SPECIAL_TOKENS and _is_wordlike(token)
    ]
    config.save_pretrained(folder)
    _write_weights(folder, config, keep_rows, seed, dtype)
    GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], do_sample=False
    ).save_pretrained(folder)
    processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)


def _marker(shape: str, seed: int, dtype: torch.dtype) -> dict[str, Any]:
    return {"shape": shape, "seed": seed, "dtype": str(dtype).removeprefix("torch."), "format": BUILD_FORMAT}


def _is_complete(folder: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / COMPLETE_MARKER).read_text()) == marker
    except (OSError, json.JSONDecodeError):
        return False


def build_random_llava(shape: str, out_dir: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write LLaVA-1.5 of ``shape`` ("llava-1.5-7b" | "llava-1.5-13b") with random weights to ``out_dir`` (reused when
    a complete copy of the same shape, seed and dtype is there). Disk: 2 bytes a parameter in bfloat16 (14 / 27 GB).

    Written to a temporary sibling folder and renamed into place, the completion marker last.
    """
    llava_config(shape)  # unknown shape -> ValueError before anything is written
    out_dir = Path(out_dir)
    marker = _marker(shape, seed, dtype)
    if _is_complete(out_dir, marker):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        logger.info("building a random-weight %s (%s, seed %d) at %s", shape, marker["dtype"], seed, out_dir)
        _write_model(staging, shape, seed, dtype)
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
