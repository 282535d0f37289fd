"""A tiny LLaVA-1.5 built locally (no model hub), in the hub layout that both vLLM and transformers load.

The demo, the tests and the benchmark run stage 1 on it: a 2-layer Llama text model (hidden 128, 2 heads of 64: the vLLM
CPU attention kernel rejects head_dim 16), a 2-layer CLIP vision tower (image 112, patch 14 -> 8x8 = 64 image tokens), a
byte-level BPE tokenizer trained on the demo vocabulary and the prompts, ``<image>`` as a special token, and a
LLaVA-1.5 style chat template (``USER: <image>\\n... ASSISTANT: ...``, multi-turn). Weights are random but deterministic
for a seed.

So that greedy decoding yields words instead of stray bytes, the output rows of special tokens, word pieces and bytes
are zeroed (their logit is always 0 while the largest random word logit is positive). The end-of-sequence row is then
calibrated on demo-like prompts so that answers end mid-way at times but never at once (``_calibrate_end_of_sequence``).

``hidden_size``/``num_layers`` widen or deepen the text model (heads of 64, MLP 2x hidden) for benchmarks; the
defaults are the tiny LLaVA above, and other sizes get their own folder (``tiny_size_name``).

``architecture="llava_next"`` builds the same model as a LLaVA-NeXT (``tiny-llava-next``): any-resolution tiling over a
112/224 grid, so the number of image tokens depends on the image's shape, as with real LLaVA-NeXT checkpoints.

``resolve_model`` turns the configured ``stage1.model`` into what vLLM and transformers load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-llava"
TINY_MODELS = {"tiny-llava": "llava", "tiny-llava-next": "llava_next"}  # name -> architecture
# The trained mini LLaVA of the demo world, committed with the code (see weights/README.md).
MINI_MODELS = {"mini-llava": Path(__file__).resolve().parents[1] / "weights" / "mini-llava"}
ARCHITECTURES = ("llava", "llava_next")
COMPLETE_MARKER = "tiny_llava.complete.json"
TINY_MODEL_FORMAT = 3  # bump when the recipe changes so cached copies are rebuilt
TINY_TEXT_SIZE = (128, 2)  # the text model's hidden size and layer count
HEAD_DIM = 64  # the vLLM CPU attention kernel rejects head_dim 16

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
IMAGE_SIZE = 112
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
NEXT_GRID_PINPOINTS = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
EOS_TRIGGER_SCALE = 1.3  # the end-of-sequence row = 1.3 x a trigger word's row; see _calibrate_end_of_sequence

# LLaVA-1.5's template as llava-hf ships it, extended to accept plain-string contents.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] + ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

_SHAPES = "circle square triangle rectangle ellipse star hexagon diamond cross ring disk box blob shape shapes"
_COLOURS = (
    "red green blue yellow orange purple pink brown white black gray grey cyan magenta colour color colours colors"
)
_CORPUS = [
    "What is the object or part that is the red circle in this image?",
    "Follow these guidelines strictly: (1) Please analyze the image and conversations and identify the distinct "
    "physical objects or areas that the asker wants from the image. (2) Briefly describe the target entity or part's "
    "visual attributes that can discriminate them from the image. Each visual attribute can be color, shape, and "
    "relative position to other objects in the image.",
    "The user wants the blue square from the image. The blue square can be discriminated by its blue colour, its "
    "square shape and its position to the left of the green triangle.",
    "Target: the yellow star. Attributes: bright yellow, five points, at the top right corner, above the red ring.",
    "It is the small orange ellipse in the bottom left of the picture, below the large purple rectangle.",
    "Which shape is the largest? Which object is closest to the center? What would you use to hold water?",
    "Which object in this picture could roll off a table? What here has exactly three corners, like a slice of pizza?",
    "Which object has the colour of a ripe tomato, fresh grass, a clear summer sky, a banana, grapes or a pumpkin?",
    "If you read this picture from left to right, which object would you meet first? Which object sits highest?",
    "The green hexagon matches a honeycomb cell: both have six equal sides, like the nut on a bolt.",
    "left right top bottom center centre middle corner above below beside next to near far between inside outside",
    "large small big tiny tall short wide narrow round square pointed bright dark light solid striped",
    "target attributes attribute object objects part parts area areas region image picture photo user asker wants "
    "answer question conversation entity visual discriminate describe identify physical distinct relative position",
    "the a an of in on at to from by with and or is are it its this that there which what where who one two three",
    _SHAPES,
    _COLOURS,
    "USER: ASSISTANT: SYSTEM: 0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ( ) ' \" - /",
]


def _train_tokenizer():
    """Byte-level BPE over the demo corpus; ``<image>`` and the usual Llama specials as added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 2, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tokenizer


def _is_wordlike(token: str) -> bool:
    """True for byte-level tokens that decode to a whole word with its leading space (``Ġred`` -> " red") or to plain
    punctuation, so that random weights still write space-separated words."""
    from tokenizers.decoders import ByteLevel

    text = ByteLevel().decode([token])
    if text in (".", ",", ":", "(", ")"):
        return True
    return len(text) > 1 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()


def _hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers 5 module names -> the llava-hf hub layout that vLLM 0.32 reads (and transformers converts back)."""
    renames = [
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),  # LLaVA-NeXT
    ]
    out = {}
    for name, tensor in model.state_dict().items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        else:
            raise ValueError(f"tiny LLaVA: unexpected parameter name {name!r}")
        out[name] = tensor.detach().contiguous().clone()
    return out


def _make_processor(backend: Any, architecture: str, image_size: int = IMAGE_SIZE) -> Any:
    """The trained tokenizer (specials, chat template) + a CLIP-style image processor (LLaVA-NeXT: tiled)."""
    from transformers import (
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

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
    sizes = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    if architecture == "llava_next":
        image_processor = LlavaNextImageProcessor(**sizes, image_grid_pinpoints=NEXT_GRID_PINPOINTS)
        processor_class = LlavaNextProcessor
    else:
        image_processor = CLIPImageProcessor(**sizes, do_center_crop=True, do_convert_rgb=True)
        processor_class = LlavaProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def _make_config(
    vocab_size: int, ids: dict[str, int], architecture: str, hidden_size: int = 128, num_layers: int = 2
) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    if hidden_size % HEAD_DIM or num_layers <= 0:
        raise ValueError(f"tiny LLaVA: hidden_size must be a multiple of {HEAD_DIM} ({hidden_size}), layers > 0")
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // HEAD_DIM,
        num_key_value_heads=hidden_size // HEAD_DIM,
        max_position_embeddings=2048,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=128,
    )
    common = {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_index": ids[IMAGE_TOKEN],
        "image_seq_length": NUM_IMAGE_TOKENS,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
    }
    if architecture == "llava_next":
        config = LlavaNextConfig(**common, image_grid_pinpoints=NEXT_GRID_PINPOINTS)
        config.architectures = ["LlavaNextForConditionalGeneration"]
    else:
        config = LlavaConfig(**common, pad_token_id=ids["<pad>"])
        config.architectures = ["LlavaForConditionalGeneration"]
    return config


def _calibration_prompts(processor: Any) -> list[Any]:
    """Demo-like inputs: coloured discs on plain backgrounds, first-turn and second-turn questions."""
    from PIL import Image, ImageDraw

    colours = [(214, 39, 40), (44, 160, 44), (31, 90, 200), (240, 200, 30)]
    questions = [
        "What is the object or part that is the red circle in this image?",
        "Which object in this picture could roll off a table?",
    ]
    inputs = []
    for index in range(8):
        image = Image.new("RGB", (96 + 16 * index, 112), colours[(index + 1) % 4])
        ImageDraw.Draw(image).ellipse((8 * index, 20, 8 * index + 40, 60), fill=colours[index % 4])
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[index % 2]}]}]
        if index >= 4:
            messages += [
                {"role": "assistant", "content": [{"type": "text", "text": "It is the red circle."}]},
                {"role": "user", "content": [{"type": "text", "text": _CORPUS[1]}]},
            ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs.append(processor(text=[prompt], images=[image], return_tensors="pt"))
    return inputs


def _calibrate_end_of_sequence(model: Any, processor: Any, eos_id: int) -> int | None:
    """Give the end-of-sequence token the output row of a word the model writes mid-answer but never first.

    With its own row zeroed, greedy decoding never ends; copying (x EOS_TRIGGER_SCALE) the row of a "trigger" word makes
    the answer end where that word would have come, so answers have varied lengths and are not empty on demo inputs.
    Words never written in the first two steps are preferred, then words never written first. Returns the trigger token
    id, or None (answers then always run to max_new_tokens) when every word the model writes also starts an answer.
    """
    first_tokens: set[int] = set()
    early_tokens: set[int] = set()
    later_counts: dict[int, int] = {}
    with torch.inference_mode():
        for inputs in _calibration_prompts(processor):
            output = model.generate(
                **inputs, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=eos_id
            )
            generated = output[0, inputs["input_ids"].shape[1]:].tolist()
            first_tokens.update(generated[:1])
            early_tokens.update(generated[:2])
            for token in set(generated[1:]):
                later_counts[token] = later_counts.get(token, 0) + 1
    candidates = [
        (token in early_tokens, -count, token) for token, count in later_counts.items() if token not in first_tokens
    ]
    if not candidates:
        logger.warning("tiny LLaVA: no end-of-sequence trigger word; answers will always run to max_new_tokens")
        return None
    trigger = min(candidates)[2]
    with torch.no_grad():
        model.lm_head.weight[eos_id] = model.lm_head.weight[trigger] * EOS_TRIGGER_SCALE
    return trigger


def _write_model(folder: Path, seed: int, architecture: str, text_size: tuple[int, int] = TINY_TEXT_SIZE) -> None:
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    backend = _train_tokenizer()
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    processor = _make_processor(backend, architecture)
    config = _make_config(backend.get_vocab_size(), ids, architecture, *text_size)

    torch.manual_seed(seed)
    model_class = LlavaNextForConditionalGeneration if architecture == "llava_next" else LlavaForConditionalGeneration
    model = model_class(config).eval()
    with torch.no_grad():
        lm_head = model.lm_head.weight  # VxD
        for token, token_id in backend.get_vocab().items():
            if token in SPECIAL_TOKENS or not _is_wordlike(token):
                lm_head[token_id].zero_()
    trigger = _calibrate_end_of_sequence(model, processor, ids["</s>"])
    if trigger is not None:
        logger.debug("tiny LLaVA: answers end where %r would come", backend.id_to_token(trigger))

    config.save_pretrained(folder)
    save_file(_hub_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], do_sample=False
    ).save_pretrained(folder)
    processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)


def _marker(seed: int, architecture: str, text_size: tuple[int, int]) -> dict:
    """What the completion marker records; the default size is left out, so markers of earlier builds stay valid."""
    marker = {"seed": seed, "format": TINY_MODEL_FORMAT, "architecture": architecture}
    if tuple(text_size) != TINY_TEXT_SIZE:
        marker["text_size"] = list(text_size)
    return marker


def tiny_size_name(name: str, hidden_size: int, num_layers: int) -> str:
    """The folder of a tiny model at another text size: ``tiny-llava-h512-l4`` (the default size keeps ``name``)."""
    return name if (hidden_size, num_layers) == TINY_TEXT_SIZE else f"{name}-h{hidden_size}-l{num_layers}"


def _is_complete(folder: Path, seed: int, architecture: str, text_size: tuple[int, int] = TINY_TEXT_SIZE) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info == _marker(seed, architecture, text_size)


def build_tiny_llava(
    out_dir: Path, seed: int = 0, architecture: str = "llava", hidden_size: int = 128, num_layers: int = 2
) -> Path:
    """Build the tiny LLaVA under ``out_dir`` (or return it if a complete copy for ``seed`` is already there).

    ``architecture``: "llava" (LLaVA-1.5) or "llava_next" (LLaVA-NeXT, any-resolution tiles). ``hidden_size`` and
    ``num_layers`` size the text model (a multiple of 64; the vision tower stays tiny).

    The model is written to a temporary sibling folder and renamed into place, the completion marker last, so a crash
    or a concurrent builder never leaves a half-written model that looks complete.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    out_dir = Path(out_dir)
    text_size = (hidden_size, num_layers)
    if _is_complete(out_dir, seed, architecture, text_size):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        logger.info("building the tiny %s (seed %d, text %d x %d) at %s", architecture, seed, *text_size, out_dir)
        _write_model(staging, seed, architecture, text_size)
        (staging / COMPLETE_MARKER).write_text(json.dumps(_marker(seed, architecture, text_size)) + "\n")
        if _is_complete(out_dir, seed, architecture, text_size):  # another process finished first
            return out_dir
        if out_dir.exists():  # stale or incomplete copy (other seed, old format, crash)
            shutil.rmtree(out_dir)
        try:
            os.rename(staging, out_dir)
        except OSError:
            if not _is_complete(out_dir, seed, architecture, text_size):  # lost a race to an unfinished builder
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else (absolute, relative, home, nested folders) is a local path."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1


def resolve_model(name_or_path: str, work_dir: Path) -> str:
    """Map the configured model to what the engines load.

    ``"tiny-llava"`` / ``"tiny-llava-next"`` -> built (or reused) under ``work_dir/models/<name>``; ``"mini-llava"`` ->
    the committed trained weights under ``weights/mini-llava``; an existing local
    folder -> its absolute path; something path-like that does not exist -> FileNotFoundError; otherwise a hub id
    ("org/name"), returned unchanged for the local Hugging Face cache to serve.
    """
    name = name_or_path.strip()
    if not name:
        raise ValueError("stage1.model is empty: give 'tiny-llava', a local model folder or a hub id like 'org/name'")
    if name in TINY_MODELS:
        return str(build_tiny_llava(Path(work_dir) / "models" / name, architecture=TINY_MODELS[name]))
    if name in MINI_MODELS:
        if not (MINI_MODELS[name] / "config.json").is_file():
            raise FileNotFoundError(f"stage1.model {name!r}: the committed weights are missing at {MINI_MODELS[name]}")
        return str(MINI_MODELS[name])
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise NotADirectoryError(
            f"stage1.model {name!r} is a file; expected a model folder (config.json, weights, tokenizer)"
        )
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"stage1.model {name!r}: no such model folder (resolved to {path.resolve()}); "
            "give an existing local folder, 'tiny-llava', or a hub id like 'llava-hf/llava-1.5-7b-hf'"
        )
    return name
