"""LLaVA-1.5's own input conventions, where they differ from the defaults of HF's ``llava-hf/llava-1.5-*-hf``.

- Conversation (``conversation_format = "llava_v1"``): LLaVA's ``conv_vicuna_v1`` — the system message, then
  ``USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {prompt} ASSISTANT:``: turns are separated by a space after a
  user turn and by ``</s>`` after an assistant turn. HF's chat template (``"chat_template"``) has no system message and
  no ``</s>``. Rendering here is plain string work, so the vLLM and transformers backends read the same prompt text and
  tokenise it with the same tokenizer.
- Image (``pad_to_square``): LLaVA's ``expand2square`` pads the image to a square with the CLIP mean colour
  (``int(255 * mean)`` per channel) before the image processor, so nothing is cut; HF's processor centre-crops the
  shortest side, so the edges of a wide image are never seen by the MLLM. Stage 2 always reads the original image.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

CONVERSATION_FORMATS = ("chat_template", "llava_v1")
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the human's questions."
)
_ROLES = {"user": "USER", "assistant": "ASSISTANT"}
_SEPARATORS = {"USER": " ", "ASSISTANT": "</s>"}


def render_llava_v1(messages: list[dict[str, Any]], image_token: str = "<image>", add_generation_prompt: bool = True) -> str:
    """A conversation in LLaVA-1.5's ``conv_vicuna_v1`` format; images go first in their turn, then a newline."""
    rendered = LLAVA_V1_SYSTEM + " "
    for index, message in enumerate(messages):
        role = _ROLES.get(message.get("role", ""))
        if role is None:
            raise ValueError(f"message {index}: role {message.get('role')!r} is not one of {sorted(_ROLES)}")
        content = message.get("content", "")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        images = sum(part.get("type") == "image" for part in parts)
        text = " ".join(part.get("text", "") for part in parts if part.get("type") == "text")
        rendered += f"{role}: " + f"{image_token}\n" * images + text + _SEPARATORS[role]
    return rendered + ("ASSISTANT:" if add_generation_prompt else "")


def render_conversation(
    processor: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
    conversation_format: str = "chat_template",
) -> str:
    """The prompt text of a conversation in ``conversation_format`` (the model's own chat template, or LLaVA v1)."""
    if conversation_format == "chat_template":
        return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    if conversation_format == "llava_v1":
        image_token = getattr(processor, "image_token", None) or "<image>"
        return render_llava_v1(messages, image_token, add_generation_prompt)
    raise ValueError(f"conversation_format must be one of {CONVERSATION_FORMATS}, got {conversation_format!r}")


def clip_mean_colour(processor: Any) -> tuple[int, int, int]:
    """LLaVA's padding colour: ``int(255 * mean)`` of the image processor's normalisation mean, per channel."""
    image_processor = getattr(processor, "image_processor", processor)
    mean = getattr(image_processor, "image_mean", None)
    if not mean or len(mean) != 3:
        raise ValueError(f"image processor {type(image_processor).__name__} has no 3-channel image_mean: {mean!r}")
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred on a square canvas of its longer side, filled with ``background``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def count_prompt_tokens(processor: Any, prompt: str, image: Image.Image) -> int | None:
    """The token count the processor would give ``prompt`` with ``image``, without processing the pixels: the text's
    tokens with each image placeholder expanded to the image's token count (the processor's own
    ``_get_num_multimodal_tokens``, which vLLM also uses). None where the processor cannot say; callers then run it."""
    counter = getattr(processor, "_get_num_multimodal_tokens", None)
    placeholder_id = getattr(processor, "image_token_id", None)
    if counter is None or placeholder_id is None:
        return None
    try:
        per_image = int(counter(image_sizes=[(image.height, image.width)]).num_image_tokens[0])
    except Exception:  # e.g. no crop size in the image processor: the count depends on what it does
        return None
    ids = processor.tokenizer(prompt)["input_ids"]
    return len(ids) + (per_image - 1) * ids.count(placeholder_id)
