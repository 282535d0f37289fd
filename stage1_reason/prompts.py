"""The chain-of-thought prompts of the paper (section 3.2), versioned, and the conversations built from them.

Step 1 (reason prompting): "What is the object or part that is [QUERY] in this image?"; a query that already is a
question or a sentence is asked as it is. Steps 2 and 3 (target and attribute prompting) are merged, as in the paper's
implementation, into the second turn of the same conversation. Conversations are chat message lists with the image as a
content part, rendered by the model's own chat template, so any vLLM-supported VLM gets its native prompt format.

``cot_steps`` selects what is embedded for the segmentation model (paper Table 3a): 1 = the step-1 answer, 2 = the
target, 3 = the merged step-2/3 answer as the MLLM wrote it (the default): it holds the target's name and its visual
attributes (Sec. 3.3), and it does not depend on the parser. ``SEG_TEXT_RULES`` says the same in words; it is part of
the stage-1 run key, so a change of rule cannot reuse old shards.

Versions:

- ``v1`` (the demo default): the wording of the paper's Figure 4 for the merged turn ("Please analyze the image and
  conversations and identify ... that the asker wants ..."), and Sec. 3.2's target sentence alone for step 2.
- ``v2`` (the paper profiles' default): Sec. 3.2 word for word. The second turn opens with the conversation block
  "Here is the conversation:\nThe question is: [QUESTION]\nThe answer is: [ANSWER]\n", then the target sentence (step 2
  alone) or "Follow these guidelines strictly: (1) Please analyze the conversation ... (2) Briefly describe ..."
  (steps 2+3 merged). Both versions keep the two-turn conversation, so turn 1 is in the context either way.

Changing any prompt text means a new ``PromptSet`` under a new version: the version is part of every stage-1 output key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]

COT_STEPS = (1, 2, 3)
DEFAULT_COT_STEPS = 3


@dataclass(frozen=True)
class PromptSet:
    """The prompt texts of one prompt version."""

    reason_template: str  # step 1; "{query}" is replaced by the user query
    target_attribute_prompt: str  # steps 2+3, the second turn; may use {question} and {answer}
    target_prompt: str  # step 2 alone (the step-1+2 ablation), the second turn; may use {question} and {answer}


_CONVERSATION_BLOCK = "Here is the conversation:\nThe question is: {question}\nThe answer is: {answer}\n"

PROMPTS: dict[str, PromptSet] = {
    "v1": PromptSet(
        reason_template="What is the object or part that is {query} in this image?",
        target_attribute_prompt=(
            "Follow these guidelines strictly: (1) Please analyze the image and conversations and identify the "
            "distinct physical objects or areas that the asker wants from the image. (2) Briefly describe the target "
            "entity or part's visual attributes that can discriminate them from the image. Each visual attribute can "
            "be color, shape, and relative position to other objects in the image."
        ),
        target_prompt=(
            "Please analyze the conversation and identify the distinct physical objects or areas that the user wants "
            "from the image."
        ),
    ),
    "v2": PromptSet(
        reason_template="What is the object or part that is {query} in this image?",
        target_attribute_prompt=(
            _CONVERSATION_BLOCK + "Follow these guidelines strictly: (1) Please analyze the conversation and identify "
            "the distinct physical objects or areas that the user wants from the image. (2) Briefly describe the target "
            "entity or part's visual attributes that can discriminate them from the image. Each visual attribute can be "
            "color, shape, and relative position to other objects in the image."
        ),
        target_prompt=(
            _CONVERSATION_BLOCK + "Please analyze the conversation and identify the distinct physical objects or areas "
            "that the user wants from the image."
        ),
    ),
}
PROMPT_VERSION = "v1"


def prompt_set(prompt_version: str = PROMPT_VERSION) -> PromptSet:
    """The prompts of ``prompt_version``; ValueError naming the known versions otherwise."""
    try:
        return PROMPTS[prompt_version]
    except KeyError:
        raise ValueError(f"unknown prompt_version {prompt_version!r}; known: {sorted(PROMPTS)}") from None


def is_question(query: str, query_kind: str) -> bool:
    """Sentence queries and anything ending with "?" are asked directly, without the step-1 template."""
    return query_kind == "sentence" or query.rstrip().endswith("?")


def reason_question(query: str, query_kind: str, prompt_version: str = PROMPT_VERSION) -> str:
    """The step-1 question for a user query. ValueError on an empty query."""
    query = " ".join(query.split())
    if not query:
        raise ValueError("empty query")
    if is_question(query, query_kind):
        return query
    return prompt_set(prompt_version).reason_template.format(query=query.rstrip(" ."))


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def reason_messages(question: str) -> list[Message]:
    """Turn 1: the image and the step-1 question from the user."""
    return [{"role": "user", "content": [{"type": "image"}, _text(question)]}]


def target_attribute_messages(question: str, reason_answer: str, prompt_version: str = PROMPT_VERSION) -> list[Message]:
    """Turn 2 of the same conversation: turn 1, the model's step-1 answer, then the merged target/attribute prompt."""
    prompt = prompt_set(prompt_version).target_attribute_prompt.format(question=question, answer=reason_answer.strip())
    return reason_messages(question) + [
        {"role": "assistant", "content": [_text(reason_answer.strip())]},
        {"role": "user", "content": [_text(prompt)]},
    ]


def target_messages(question: str, reason_answer: str, prompt_version: str = PROMPT_VERSION) -> list[Message]:
    """Turn 2 for step 2 alone (paper Table 3a, steps 1+2): turn 1, the step-1 answer, then the target prompt."""
    prompt = prompt_set(prompt_version).target_prompt.format(question=question, answer=reason_answer.strip())
    return reason_messages(question) + [
        {"role": "assistant", "content": [_text(reason_answer.strip())]},
        {"role": "user", "content": [_text(prompt)]},
    ]


def message_texts(messages: list[Message]) -> list[str]:
    """Every text of a conversation (string contents and text parts)."""
    texts = []
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.extend(part.get("text", "") for part in content if part.get("type") == "text")
    return texts


def render_prompt(processor: Any, messages: list[Message], conversation_format: str = "chat_template") -> str:
    """Prompt text for a conversation awaiting the assistant's next turn: the model's own chat template, or LLaVA-1.5's
    original ``llava_v1`` format (see ``llava_conventions``)."""
    from stage1_reason.llava_conventions import render_conversation

    return render_conversation(processor, messages, True, conversation_format)


def second_turn_prompt(messages: list[Message]) -> str:
    """The text of the last user turn of a conversation (the prompt of the turn whose answer is embedded)."""
    users = [m for m in messages if m.get("role") == "user"]
    return message_texts(users[-1:])[-1] if users else ""


def join_target_attributes(target: str, attributes: str) -> str:
    """"the fire" + "It is bright orange." -> "the fire. It is bright orange." (either part may be empty)."""
    target = target.strip()
    attributes = attributes.strip()
    if not target:
        return attributes
    if not attributes:
        return target
    return f"{target.rstrip(' .')}. {attributes}"


SEG_TEXT_RULES = {
    1: "step-1 answer as written",
    2: "target parsed from the step-2 answer",
    3: "merged step-2/3 answer as written",
}


def seg_text(cot_steps: int, reason_answer: str, target: str, attributes: str, seg_answer: str = "") -> str:
    """The text whose MLLM embeddings prompt the segmentation model, for a CoT ablation mode (paper Table 3a).

    In mode 3 it is ``seg_answer`` (the merged step-2/3 answer) as written; without one (callers that only hold the
    parsed parts) the target and attributes joined.
    """
    if cot_steps == 1:
        return reason_answer.strip()
    if cot_steps == 2:
        return target.strip()
    if cot_steps == 3:
        return seg_answer.strip() or join_target_attributes(target, attributes)
    raise ValueError(f"cot_steps must be one of {COT_STEPS}, got {cot_steps!r}")
