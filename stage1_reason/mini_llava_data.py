"""Training data of the mini LLaVA: the demo world's chain-of-thought conversations, tokenised with loss masks.

Every example is a fresh train-split scene and one of its queries (sentences and phrases alike), asked in one of three
conversations built with the project's own prompt functions:

- ``reason``: ``reason_messages(reason_question(query))`` -> the step-1 answer ("It is the green circle. <reference
  explanation>") and the end-of-sequence token;
- ``merged``: ``target_attribute_messages(question, step-1 answer)`` -> "The target entity in the image is the green
  circle. <attribute sentences>" (colour and shape, for twins what singles it out, region, a relation to a neighbour);
- ``target``: ``target_messages(question, step-1 answer)`` -> "The user wants the green circle from the image.";
- ``ground``: the query itself, with no prompt around it -> "It is the green circle." and the attribute sentences.
  Short conversations whose loss falls mostly on the words that ground the answer: the analogue of LLaVA's
  feature-alignment pretraining, and the first phase of instruction tuning (``mini_llava.GROUND_STEPS``).

The loss covers the assistant's tokens only: every assistant turn of the conversation (teacher forcing), and the
end-of-sequence token after the last one. Conversations are rendered with the model's chat template, exactly as the
engines render them at inference. ``patch_labels`` gives the vision tower's alignment targets: the colour and shape
of the object covering each image patch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from manifests.demo import DemoSample, render_scene
from manifests.demo_text import attribute_sentences, queries, reason_answer, target_answer, target_attribute_answer
from manifests.demo_world import COLOURS, SHAPES
from stage1_reason import prompts
from stage1_reason.mini_llava_model import IMAGE_SIZE, NUM_IMAGE_TOKENS, PATCH_SIZE

TASKS = ("reason", "merged", "target", "ground")
TASK_WEIGHTS = (0.35, 0.4, 0.1, 0.15)
IGNORE = -100
COLOUR_CLASSES = ("background", *sorted(COLOURS))
SHAPE_CLASSES = ("background", *SHAPES)
# The words of an answer that depend on the image and the query, not on the templates: colours, shapes, and the words
# that tell two objects of one name apart.
KEY_WORDS = (*sorted(COLOURS), *SHAPES, *(shape + "s" for shape in SHAPES), "left", "right", "top", "bottom", "above",
             "below", "larger", "smaller", "bigger", "closer", "further", "higher", "lower")  # fmt: skip


@dataclass(frozen=True)
class Conversation:
    """A conversation awaiting its last assistant turn, that turn's text, and the sample it came from."""

    messages: list[prompts.Message]
    answer: str
    task: str
    sample: DemoSample
    query: str


def conversation(sample: DemoSample, query: str, explanation: str, task: str, prompt_version: str) -> Conversation:
    """The ``task`` conversation for one query of a scene, with its reference last answer."""
    scene = sample.scene
    kind = "sentence" if query.endswith("?") else "phrase"
    question = prompts.reason_question(query, kind, prompt_version)
    step1 = reason_answer(scene, explanation)
    if task == "reason":
        return Conversation(prompts.reason_messages(question), step1, task, sample, query)
    if task == "merged":
        messages = prompts.target_attribute_messages(question, step1, prompt_version)
        return Conversation(messages, target_attribute_answer(scene), task, sample, query)
    if task == "target":
        return Conversation(prompts.target_messages(question, step1, prompt_version), target_answer(scene), task,
                            sample, query)  # fmt: skip
    if task == "ground":
        messages: list[prompts.Message] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query}]}
        ]
        answer = " ".join([f"It is the {scene.target.name}.", *attribute_sentences(scene)])
        return Conversation(messages, answer, task, sample, query)
    raise ValueError(f"unknown task {task!r}; valid: {TASKS}")


def random_conversation(
    rng: random.Random, index: int, seed: int, prompt_versions: list[str], task: str | None = None
) -> Conversation:
    """Train scene ``index``: a random query of it, ``task`` (default: a random one), a random prompt version."""
    sample = render_scene("train", index, seed)
    candidates = queries(sample.scene, True) + queries(sample.scene, False)
    query, explanation = rng.choice(candidates)
    task = task or rng.choices(TASKS, weights=TASK_WEIGHTS)[0]
    return conversation(sample, query, explanation, task, rng.choice(prompt_versions))


def _assistant_spans(text: str, messages: list[prompts.Message], start: int) -> list[tuple[int, int]]:
    """Character spans of the assistant contents in the rendered ``text``, searched in order from ``start``."""
    spans = []
    for message in messages:
        if message["role"] != "assistant":
            continue
        for content in prompts.message_texts([message]):
            position = text.index(content, start)
            spans.append((position, position + len(content)))
            start = position + len(content)
    return spans


def encode(processor: Any, convo: Conversation) -> tuple[list[int], list[int]]:
    """(input_ids with the image token expanded, labels) for a conversation plus its reference last answer."""
    tokenizer = processor.tokenizer
    prompt = prompts.render_prompt(processor, convo.messages)
    prefix = prompt.index(prompts.message_texts(convo.messages)[0])  # the question follows the image token
    spans = _assistant_spans(prompt, convo.messages, prefix)
    text = prompt + " " + convo.answer.strip()
    spans.append((len(prompt), len(text)))
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(prompts_image_token(processor))
    input_ids, labels = [], []
    for token_id, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if token_id == image_id:
            input_ids += [image_id] * NUM_IMAGE_TOKENS
            labels += [IGNORE] * NUM_IMAGE_TOKENS
            continue
        inside = end > begin and any(begin < span_end and end > span_start for span_start, span_end in spans)
        input_ids.append(token_id)
        labels.append(token_id if inside else IGNORE)
    input_ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    return input_ids, labels


def prompts_image_token(processor: Any) -> str:
    return getattr(processor, "image_token", "<image>")


def collate(processor: Any, conversations: list[Conversation]) -> dict[str, torch.Tensor]:
    """A right-padded training batch: input_ids, attention_mask, labels (BxL), pixel_values (Bx3xSxS)."""
    encoded = [encode(processor, convo) for convo in conversations]
    length = max(len(ids) for ids, _ in encoded)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (ids, target) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(target)
        attention[row, : len(ids)] = 1
    images = [convo.sample.image for convo in conversations]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "pixel_values": pixel_values}


def patch_labels(sample: DemoSample) -> tuple[np.ndarray, np.ndarray]:
    """Colour and shape class of each of the image's patches (row-major, NUM_IMAGE_TOKENS each): the object that
    covers most of the patch if it covers at least a quarter of it, else background (class 0)."""
    scene = sample.scene
    sx, sy = IMAGE_SIZE / scene.width, IMAGE_SIZE / scene.height
    label_map = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(label_map)
    for number, obj in enumerate(scene.objects, start=1):
        draw.polygon([(x * sx, y * sy) for x, y in obj.polygon()], fill=number)
    grid = IMAGE_SIZE // PATCH_SIZE
    patches = np.asarray(label_map).reshape(grid, PATCH_SIZE, grid, PATCH_SIZE).transpose(0, 2, 1, 3)
    patches = patches.reshape(grid * grid, PATCH_SIZE * PATCH_SIZE)
    colours = np.zeros(grid * grid, dtype=np.int64)
    shapes = np.zeros(grid * grid, dtype=np.int64)
    for patch, pixels in enumerate(patches):
        counts = np.bincount(pixels, minlength=len(scene.objects) + 1)
        counts[0] = 0
        number = int(counts.argmax())
        if counts[number] >= pixels.size // 4:
            obj = scene.objects[number - 1]
            colours[patch] = COLOUR_CLASSES.index(obj.colour)
            shapes[patch] = SHAPE_CLASSES.index(obj.shape)
    return colours, shapes
