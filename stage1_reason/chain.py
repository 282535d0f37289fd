"""The paper's chain of thought over a batch of samples (Sec. 3.2, Table 3a), on any generation backend.

Turn 1 (step 1, reason prompting) for every sample in one backend call, then turn 2 for every sample in one call:

- ``cot_steps`` 3 (default): the merged target + attribute prompt; its answer is embedded as written.
- ``cot_steps`` 2: the target prompt alone (step 2); the target parsed from its answer is embedded.
- ``cot_steps`` 1: no second turn; the step-1 answer is embedded.

A sample with a simulated step 1 (``step1_question``/``step1_answer``, from Q-A templates for referring and semantic
data, Sec. 3.4) skips turn 1: the template pair stands in the conversation where the MLLM's question and answer would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from stage1_reason import parsing, prompts
from stage1_reason.engine import GenerationBackend, ImageLike, Request, Result

REASON_MLLM = "mllm"
REASON_TEMPLATE = "template"


@dataclass(frozen=True)
class Sample:
    """One manifest row for stage 1. ``image_error`` (set when the image could not be read) makes the row an error.

    ``step1_question`` and ``step1_answer`` (both or neither) replace the generated step 1 with a simulated one.
    """

    key: str
    query: str
    query_kind: str
    image: ImageLike | None = None
    image_error: str | None = None
    step1_question: str | None = None
    step1_answer: str | None = None


@dataclass(frozen=True)
class ReasonOutput:
    """The chain of thought of one sample.

    ``context_messages`` is the conversation whose assistant continuation is ``seg_text`` (what the embedding pass
    reads); ``parse_status`` is "ok" | "fallback", or "skipped" when cot_steps is 1 (no second turn).
    ``target_attribute_answer`` is the second turn's answer (the merged answer, or the step-2 answer in cot_steps 2);
    ``reason_source`` says who wrote the step-1 answer: "mllm" or "template".
    """

    key: str
    reason_question: str = ""
    reason_answer: str = ""
    target_attribute_answer: str = ""
    target: str = ""
    attributes: str = ""
    parse_status: str = ""
    seg_text: str = ""
    context_messages: list[prompts.Message] = field(default_factory=list)
    generated_tokens: int = 0
    error: str | None = None
    reason_source: str = REASON_MLLM

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "error"


def second_turn_messages(cot_steps: int, question: str, reason_answer: str, prompt_version: str) -> list[prompts.Message]:
    """The conversation of turn 2 for ``cot_steps`` 2 (target prompt) or 3 (merged target + attribute prompt)."""
    if cot_steps == 2:
        return prompts.target_messages(question, reason_answer, prompt_version)
    return prompts.target_attribute_messages(question, reason_answer, prompt_version)


def run_chain_of_thought(
    backend: GenerationBackend,
    samples: list[Sample],
    cot_steps: int = prompts.DEFAULT_COT_STEPS,
    prompt_version: str = prompts.PROMPT_VERSION,
) -> list[ReasonOutput]:
    """Both turns for a batch: every step-1 prompt in one backend call, then every second-turn prompt in one call."""
    if cot_steps not in prompts.COT_STEPS:
        raise ValueError(f"cot_steps must be one of {prompts.COT_STEPS}, got {cot_steps!r}")
    keys = [sample.key for sample in samples]
    if len(set(keys)) != len(keys):
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"sample keys must be unique within a batch; repeated: {duplicates[:5]}")
    outputs: dict[str, ReasonOutput] = {}
    questions: dict[str, str] = {}
    step1: list[Request] = []
    first_answers: dict[str, Result] = {}
    sources: dict[str, str] = {}
    by_key = {sample.key: sample for sample in samples}
    for sample in samples:
        error = f"image: {sample.image_error}" if sample.image_error else None
        if sample.step1_question is not None and sample.step1_answer is not None:
            questions[sample.key] = sample.step1_question
            first_answers[sample.key] = Result(sample.key, sample.step1_answer.strip(), 0)
            sources[sample.key] = REASON_TEMPLATE
            continue
        try:
            questions[sample.key] = prompts.reason_question(sample.query, sample.query_kind, prompt_version)
        except ValueError as exc:
            outputs[sample.key] = ReasonOutput(sample.key, error=f"query: {exc}")
            continue
        sources[sample.key] = REASON_MLLM
        step1.append(Request(sample.key, prompts.reason_messages(questions[sample.key]), sample.image, error))

    for request, result in zip(step1, backend.generate(step1) if step1 else [], strict=True):
        if not result.ok:
            outputs[request.key] = ReasonOutput(request.key, questions[request.key], error=f"step 1: {result.error}")
        else:
            first_answers[request.key] = result

    step2: list[Request] = []
    for key in keys:
        if key not in first_answers:
            continue
        sample, first, question = by_key[key], first_answers[key], questions[key]
        if cot_steps == 1:
            outputs[key] = _finish(ReasonOutput(
                key, question, first.text, parse_status="skipped", seg_text=first.text,
                context_messages=prompts.reason_messages(question), generated_tokens=first.num_tokens,
                reason_source=sources[key],
                error=f"image: {sample.image_error}" if sample.image_error else None,
            ))
            continue
        error = f"image: {sample.image_error}" if sample.image_error else None
        messages = second_turn_messages(cot_steps, question, first.text, prompt_version)
        step2.append(Request(key, messages, sample.image, error))

    for request, result in zip(step2, backend.generate(step2) if step2 else [], strict=True):
        first, question = first_answers[request.key], questions[request.key]
        if not result.ok:
            outputs[request.key] = ReasonOutput(
                request.key, question, first.text, error=f"step 2: {result.error}", reason_source=sources[request.key]
            )
            continue
        parsed = parsing.parse_merged_answer(result.text)
        outputs[request.key] = _finish(
            ReasonOutput(
                request.key, question, first.text, result.text, parsed.target, parsed.attributes, parsed.parse_status,
                prompts.seg_text(cot_steps, first.text, parsed.target, parsed.attributes, seg_answer=result.text),
                request.messages, first.num_tokens + result.num_tokens, reason_source=sources[request.key],
            )
        )
    return [outputs[key] for key in keys]


def _finish(output: ReasonOutput) -> ReasonOutput:
    if output.error or output.seg_text.strip():
        return output
    return replace(output, error="nothing to embed: the model's answer gave an empty seg_text")
