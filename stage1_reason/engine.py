"""Greedy generation for chat conversations with an image: vLLM (batched) or transformers (the sequential reference).

Both backends take the same ``Request`` list and return one ``Result`` per request, in order. Each request is checked
before anything is sent to the engine, so one bad row cannot kill a batch: a caller-supplied error (an unreadable
image), a missing or malformed image, the image placeholder typed into the text, a chat-template failure, or a prompt
whose token count plus ``max_new_tokens`` exceeds ``max_model_len`` becomes that row's error. If the engine raises for a
whole batch, the rows are retried one by one to isolate the culprit. Prompts are rendered with the model's own chat
template and counted by its own processor.

``conversation_format`` ("chat_template" | "llava_v1") and ``pad_to_square`` select LLaVA-1.5's own conventions (see
``llava_conventions``); both backends apply them in the same shared code, so they read identical prompts and images.

``run_chain_of_thought`` (in ``chain``, re-exported here) drives the paper's two turns over a batch of samples.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from stage1_reason import prompts
from stage1_reason.engine_health import (
    TRANSIENT_ERROR_PREFIX,
    EngineFailure,
    EngineWatchdog,
    descendant_pids,
    engine_processes,
    is_engine_death,
)
from stage1_reason.llava_conventions import clip_mean_colour, count_prompt_tokens, expand2square

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


def mllm_image(image: ImageLike, pad_colour: tuple[int, int, int] | None = None) -> Image.Image:
    """The image as the MLLM gets it: RGB, padded to a square with ``pad_colour`` when one is given (LLaVA-1.5)."""
    pil = to_pil(image)
    return expand2square(pil, pad_colour) if pad_colour is not None else pil


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

    needs_tensors = False  # True: keep the processor's tensors (the model reads them); else only count the tokens

    def __init__(
        self, model: str, max_new_tokens: int, max_model_len: int, trust_remote_code: bool,
        conversation_format: str = "chat_template", pad_to_square: bool = False,
    ):
        if max_new_tokens <= 0 or max_model_len <= 0:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and max_model_len ({max_model_len}) must be positive")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.max_model_len = max_model_len
        self.processor = load_processor(model, trust_remote_code)
        self.conversation_format = conversation_format
        self.pad_colour = clip_mean_colour(self.processor) if pad_to_square else None

    def _prepare(self, index: int, request: Request) -> _Prepared | Result:
        if request.error:
            return Result(request.key, error=request.error)
        if request.image is None:
            return Result(request.key, error="no image given for the request")
        try:
            image = mllm_image(request.image, self.pad_colour)
        except (ValueError, OSError) as exc:
            return Result(request.key, error=f"bad image: {exc}")
        placeholder = getattr(self.processor, "image_token", None)
        if placeholder and any(placeholder in text for text in prompts.message_texts(request.messages)):
            return Result(
                request.key, error=f"text contains the image placeholder {placeholder!r}; remove it from the query"
            )
        try:
            prompt = prompts.render_prompt(self.processor, request.messages, self.conversation_format)
        except Exception as exc:  # template errors come in many types (jinja, KeyError, ValueError)
            return Result(request.key, error=f"chat template failed: {type(exc).__name__}: {exc}")
        try:  # an engine that processes the image itself needs only the count
            inputs = None
            prompt_tokens = None if self.needs_tensors else count_prompt_tokens(self.processor, prompt, image)
            if prompt_tokens is None:
                inputs = self.processor(text=[prompt], images=[image], return_tensors="pt")
                prompt_tokens = int(inputs["input_ids"].shape[1])
        except Exception as exc:
            return Result(request.key, error=f"processor failed on the prompt/image: {type(exc).__name__}: {exc}")
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
        conversation_format: str = "chat_template",
        pad_to_square: bool = False,
        stall_timeout_s: float = 300.0,
        **engine_kwargs: Any,
    ):
        super().__init__(model, max_new_tokens, max_model_len, trust_remote_code, conversation_format, pad_to_square)
        from vllm import LLM, SamplingParams

        engine_kwargs.setdefault("limit_mm_per_prompt", {"image": 1})
        before = descendant_pids()
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
        self.watchdog = EngineWatchdog(engine_processes(before), stall_timeout_s)

    def _run(self, batch: list[_Prepared]) -> list[Result]:
        inputs = [{"prompt": item.prompt, "multi_modal_data": {"image": item.image}} for item in batch]
        with self.watchdog.watching():
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
                if is_engine_death(exc):
                    raise EngineFailure(f"vLLM engine failed during generation: {type(exc).__name__}: {exc}") from exc
                logger.warning(
                    "vLLM batch of %d failed (%s: %s); retrying row by row", len(prepared), type(exc).__name__, exc
                )
                batch_results = []
                for item in prepared:
                    try:
                        batch_results.extend(self._run([item]))
                    except Exception as row_exc:
                        if is_engine_death(row_exc):
                            raise EngineFailure(f"vLLM engine failed during generation: {row_exc}") from row_exc
                        batch_results.append(
                            Result(item.key, prompt_tokens=item.prompt_tokens,
                                   error=f"{TRANSIENT_ERROR_PREFIX}: {type(row_exc).__name__}: {row_exc}")
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

    needs_tensors = True

    def __init__(
        self,
        model: str,
        max_new_tokens: int = 48,
        dtype: str = "float32",
        max_model_len: int = 2048,
        trust_remote_code: bool = False,
        seed: int = 0,
        device: str = "cpu",
        conversation_format: str = "chat_template",
        pad_to_square: bool = False,
    ):
        super().__init__(model, max_new_tokens, max_model_len, trust_remote_code, conversation_format, pad_to_square)
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


VLLM_ONLY_SETTINGS = ("tensor_parallel_size", "gpu_memory_utilization", "enforce_eager")


def make_backend(kind: str, model: str, **settings: Any) -> GenerationBackend:
    """``kind`` vllm | transformers; settings as in the constructors (vLLM-only ones are ignored for transformers)."""
    if kind == "vllm":
        return VllmBackend(model, **settings)
    if kind == "transformers":
        return TransformersBackend(model, **{k: v for k, v in settings.items() if k not in VLLM_ONLY_SETTINGS})
    raise ValueError(f"backend must be vllm or transformers, got {kind!r}")


_CHAIN_NAMES = ("ReasonOutput", "Sample", "run_chain_of_thought")


def __getattr__(name: str) -> Any:
    """The chain of thought lives in ``chain`` (which imports this module); its names stay importable from here."""
    if name in _CHAIN_NAMES:
        from stage1_reason import chain

        return getattr(chain, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
