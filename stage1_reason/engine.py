"""Greedy generation for chat conversations with an image: vLLM (batched) or transformers (the sequential reference).

Both backends take the same ``Request`` list and return one ``Result`` per request, in order. Each request is checked
before anything is sent to the engine, so one bad row cannot kill a batch: a caller-supplied error (an unreadable
image), a missing or malformed image, the image placeholder typed into the text, a chat-template failure, or a prompt
whose token count plus ``max_new_tokens`` exceeds ``max_model_len`` becomes that row's error. If the engine raises for a
whole batch, the rows are retried one by one to isolate the culprit. Prompts are rendered with the model's own chat
template and counted by its own processor.

``run_chain_of_thought`` drives the paper's two turns over a batch of samples: all step-1 prompts in one backend call,
then all second-turn (target + attributes) prompts in one call.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from PIL import Image

from stage1_reason import parsing, prompts

logger = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class Request:
    """One conversation to continue; an ``error`` set by the caller (e.g. unreadable image) makes the row an error."""

    key: str
    messages: list[prompts.Message]
    image: ImageLike | None = None
    error: str | None = None


@dataclass(frozen=True)
class Result:
    key: str
    text: str = ""
    num_tokens: int = 0  # generated tokens, the end-of-sequence token included when generation stopped on it
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a PIL image or a HxWx3 / HxW uint8 array. ValueError for anything else."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"expected a HxWx3 uint8 image array, got dtype {image.dtype} shape {image.shape}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(image).convert("RGB")
    raise ValueError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def load_processor(model: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)


@dataclass
class _Prepared:
    index: int
    key: str
    prompt: str
    image: Image.Image
    prompt_tokens: int
    inputs: Any = field(default=None, repr=False)  # the processor's tensors (kept for the transformers backend)


class GenerationBackend(Protocol):
    model: str
    max_new_tokens: int

    def generate(self, requests: list[Request]) -> list[Result]: ...

    def close(self) -> None: ...


class _BackendBase:
    """Request validation shared by the backends: same prompts, same counting, same limits, same error texts."""

    def __init__(self, model: str, max_new_tokens: int, max_model_len: int, trust_remote_code: bool):
        if max_new_tokens <= 0 or max_model_len <= 0:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and max_model_len ({max_model_len}) must be positive")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.max_model_len = max_model_len
        self.processor = load_processor(model, trust_remote_code)

    def _prepare(self, index: int, request: Request) -> _Prepared | Result:
        if request.error:
            return Result(request.key, error=request.error)
        if request.image is None:
            return Result(request.key, error="no image given for the request")
        try:
            image = to_pil(request.image)
        except (ValueError, OSError) as exc:
            return Result(request.key, error=f"bad image: {exc}")
        placeholder = getattr(self.processor, "image_token", None)
        if placeholder and any(placeholder in text for text in prompts.message_texts(request.messages)):
            return Result(
                request.key, error=f"text contains the image placeholder {placeholder!r}; remove it from the query"
            )
        try:
            prompt = prompts.render_prompt(self.processor, request.messages)
        except Exception as exc:  # template errors come in many types (jinja, KeyError, ValueError)
            return Result(request.key, error=f"chat template failed: {type(exc).__name__}: {exc}")
        try:
            inputs = self.processor(text=[prompt], images=[image], return_tensors="pt")
        except Exception as exc:
            return Result(request.key, error=f"processor failed on the prompt/image: {type(exc).__name__}: {exc}")
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if prompt_tokens + self.max_new_tokens > self.max_model_len:
            return Result(
                request.key,
                prompt_tokens=prompt_tokens,
                error=(
                    f"prompt too long: {prompt_tokens} prompt tokens + {self.max_new_tokens} new tokens "
                    f"> max_model_len {self.max_model_len}"
                ),
            )
        return _Prepared(index, request.key, prompt, image, prompt_tokens, inputs)

    def _prepare_all(self, requests: list[Request]) -> tuple[list[_Prepared], list[Result | None]]:
        results: list[Result | None] = [None] * len(requests)
        prepared = []
        for index, request in enumerate(requests):
            item = self._prepare(index, request)
            if isinstance(item, Result):
                results[index] = item
            else:
                prepared.append(item)
        return prepared, results


class VllmBackend(_BackendBase):
    """vLLM offline engine; one batched ``generate`` call per ``generate(requests)``.

    On CPU keep ``gpu_memory_utilization`` small (it is the share of RAM reserved for the KV cache) or pass
    ``kv_cache_memory_bytes``; scripts that create it need ``if __name__ == "__main__":`` (vLLM spawns processes).
    Extra keyword arguments go to ``vllm.LLM``.
    """

    def __init__(
        self,
        model: str,
        max_new_tokens: int = 48,
        dtype: str = "float32",
        max_model_len: int = 2048,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.1,
        enforce_eager: bool = True,
        trust_remote_code: bool = False,
        seed: int = 0,
        **engine_kwargs: Any,
    ):
        super().__init__(model, max_new_tokens, max_model_len, trust_remote_code)
        from vllm import LLM, SamplingParams

        engine_kwargs.setdefault("limit_mm_per_prompt", {"image": 1})
        self.llm = LLM(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            seed=seed,
            **engine_kwargs,
        )
        self.sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=seed)

    def _run(self, batch: list[_Prepared]) -> list[Result]:
        inputs = [{"prompt": item.prompt, "multi_modal_data": {"image": item.image}} for item in batch]
        outputs = self.llm.generate(inputs, self.sampling, use_tqdm=False)
        results = []
        for item, output in zip(batch, outputs, strict=True):
            completion = output.outputs[0]
            results.append(Result(item.key, completion.text.strip(), len(completion.token_ids), item.prompt_tokens))
        return results

    def generate(self, requests: list[Request]) -> list[Result]:
        prepared, results = self._prepare_all(requests)
        if prepared:
            try:
                batch_results = self._run(prepared)
            except Exception as exc:
                logger.warning(
                    "vLLM batch of %d failed (%s: %s); retrying row by row", len(prepared), type(exc).__name__, exc
                )
                batch_results = []
                for item in prepared:
                    try:
                        batch_results.extend(self._run([item]))
                    except Exception as row_exc:
                        batch_results.append(
                            Result(item.key, prompt_tokens=item.prompt_tokens,
                                   error=f"vLLM generation failed: {type(row_exc).__name__}: {row_exc}")
                        )
            for item, result in zip(prepared, batch_results, strict=True):
                results[item.index] = result
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Stop the engine's processes and free its memory (one engine at a time on a machine)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        shutdown_engine(llm)
        self.llm = None


def shutdown_engine(llm: Any) -> None:
    """Shut a ``vllm.LLM`` down now rather than at garbage collection."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        try:
            engine_core.shutdown()
        except Exception as exc:  # already dead engines raise on shutdown; nothing left to free
            logger.debug("vLLM engine shutdown: %s", exc)
    del llm
    gc.collect()


def torch_dtype(dtype: str) -> Any:
    import torch

    if dtype == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16, bfloat16 or auto, got {dtype!r}") from None


def load_hf_model(model: str, dtype: str, trust_remote_code: bool, device: str) -> Any:
    """The transformers image-text-to-text model (LLaVA, LLaVA-NeXT, Qwen2-VL, ...), eval mode."""
    from transformers import AutoModelForImageTextToText

    hf_model = AutoModelForImageTextToText.from_pretrained(
        model, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
    )
    return hf_model.to(device).eval()


class TransformersBackend(_BackendBase):
    """The same prompts through transformers, one request at a time: the correctness reference and speed baseline."""

    def __init__(
        self,
        model: str,
        max_new_tokens: int = 48,
        dtype: str = "float32",
        max_model_len: int = 2048,
        trust_remote_code: bool = False,
        seed: int = 0,
        device: str = "cpu",
    ):
        super().__init__(model, max_new_tokens, max_model_len, trust_remote_code)
        import torch

        torch.manual_seed(seed)
        self.device = device
        self.hf_model = load_hf_model(model, dtype, trust_remote_code, device)
        self.eos_ids = _eos_ids(self.hf_model, self.processor)

    def _run(self, item: _Prepared) -> Result:
        import torch

        inputs = item.inputs.to(self.device)
        with torch.inference_mode():
            output = self.hf_model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        new_tokens = output[0, item.prompt_tokens:].tolist()
        for position, token in enumerate(new_tokens):
            if token in self.eos_ids:
                new_tokens = new_tokens[: position + 1]
                break
        text = self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return Result(item.key, text.strip(), len(new_tokens), item.prompt_tokens)

    def generate(self, requests: list[Request]) -> list[Result]:
        prepared, results = self._prepare_all(requests)
        for item in prepared:
            try:
                results[item.index] = self._run(item)
            except Exception as exc:
                results[item.index] = Result(
                    item.key, prompt_tokens=item.prompt_tokens,
                    error=f"transformers generation failed: {type(exc).__name__}: {exc}",
                )
        return [r for r in results if r is not None]

    def close(self) -> None:
        self.hf_model = None
        gc.collect()


def _eos_ids(hf_model: Any, processor: Any) -> set[int]:
    eos = getattr(hf_model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


@dataclass(frozen=True)
class Sample:
    """One manifest row for stage 1. ``image_error`` (set when the image could not be read) makes the row an error."""

    key: str
    query: str
    query_kind: str
    image: ImageLike | None = None
    image_error: str | None = None


@dataclass(frozen=True)
class ReasonOutput:
    """The chain of thought of one sample.

    ``context_messages`` is the conversation whose assistant continuation is ``seg_text`` (what the embedding pass
    reads); ``parse_status`` is "ok" | "fallback", or "skipped" when cot_steps is 1 (no second turn).
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

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "error"


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
    for sample in samples:
        try:
            questions[sample.key] = prompts.reason_question(sample.query, sample.query_kind, prompt_version)
        except ValueError as exc:
            outputs[sample.key] = ReasonOutput(sample.key, error=f"query: {exc}")
            continue
        error = f"image: {sample.image_error}" if sample.image_error else None
        step1.append(Request(sample.key, prompts.reason_messages(questions[sample.key]), sample.image, error))
    images = {sample.key: sample.image for sample in samples}

    step2: list[Request] = []
    first_answers: dict[str, Result] = {}
    for request, result in zip(step1, backend.generate(step1), strict=True):
        question = questions[request.key]
        if not result.ok:
            outputs[request.key] = ReasonOutput(request.key, question, error=f"step 1: {result.error}")
        elif cot_steps == 1:
            outputs[request.key] = _finish(
                ReasonOutput(request.key, question, result.text, parse_status="skipped", seg_text=result.text,
                             context_messages=request.messages, generated_tokens=result.num_tokens)
            )
        else:
            first_answers[request.key] = result
            messages = prompts.target_attribute_messages(question, result.text, prompt_version)
            step2.append(Request(request.key, messages, images[request.key]))

    for request, result in zip(step2, backend.generate(step2) if step2 else [], strict=True):
        first = first_answers[request.key]
        question = questions[request.key]
        if not result.ok:
            outputs[request.key] = ReasonOutput(request.key, question, first.text, error=f"step 2: {result.error}")
            continue
        parsed = parsing.parse_merged_answer(result.text)
        outputs[request.key] = _finish(
            ReasonOutput(
                request.key, question, first.text, result.text, parsed.target, parsed.attributes, parsed.parse_status,
                prompts.seg_text(cot_steps, first.text, parsed.target, parsed.attributes, seg_answer=result.text),
                request.messages,
                first.num_tokens + result.num_tokens,
            )
        )
    return [outputs[sample.key] for sample in samples]


def _finish(output: ReasonOutput) -> ReasonOutput:
    if output.seg_text.strip():
        return output
    return replace(output, error="nothing to embed: the model's answer gave an empty seg_text")


VLLM_ONLY_SETTINGS = ("tensor_parallel_size", "gpu_memory_utilization", "enforce_eager")


def make_backend(kind: str, model: str, **settings: Any) -> GenerationBackend:
    """``kind`` vllm | transformers; settings as in the constructors (vLLM-only ones are ignored for transformers)."""
    if kind == "vllm":
        return VllmBackend(model, **settings)
    if kind == "transformers":
        return TransformersBackend(model, **{k: v for k, v in settings.items() if k not in VLLM_ONLY_SETTINGS})
    raise ValueError(f"backend must be vllm or transformers, got {kind!r}")
