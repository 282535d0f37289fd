"""MLLM token embeddings of ``seg_text``, the text that prompts the segmentation model.

Modes:

- ``hidden`` (default): the MLLM's last-layer hidden states (after the final norm, = transformers
  ``hidden_states[-1]``) for the tokens of ``seg_text`` read *as the assistant's answer* in its conversation: image +
  turn 1 (+ answer 1 + turn 2) rendered by the chat template with the generation prompt, then ``seg_text``. These are
  the states the model would have had while writing that text itself. ``VllmEmbedder`` computes them with one batched
  vLLM prefill pass (a pooling engine returning every prompt token's vector); ``TransformersEmbedder`` is the
  sequential reference.
- ``input``: rows of the MLLM's input embedding table. Rows hold only ``token_ids`` (the same in-context tokens as
  ``hidden``); the table is exported once by ``export_input_embeddings`` for stage 2 to look up. ``TokenIdEmbedder``
  needs no engine.

Either way a row gets the span's token ids (int32) and, in ``hidden`` mode, a float16 array [n_tokens, dim], both capped
at ``max_embed_tokens`` (the first tokens are kept: the target comes before its attributes). Per-row problems (empty
text, a prompt longer than ``max_model_len``, an engine failure) become that row's error; the rest of the batch
proceeds.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stage1_reason import prompts
from stage1_reason.chain import ReasonOutput, Sample
from stage1_reason.engine import ImageLike, load_hf_model, load_processor, mllm_image, shutdown_engine
from stage1_reason.llava_conventions import clip_mean_colour, count_prompt_tokens, render_conversation

logger = logging.getLogger(__name__)

EMBED_MODES = ("hidden", "input")
HIDDEN_LAYER = -1  # last decoder layer, after the final norm


@dataclass(frozen=True)
class EmbedRequest:
    key: str
    messages: list[prompts.Message]  # conversation awaiting the assistant turn that seg_text fills
    seg_text: str
    image: ImageLike | None = None
    error: str | None = None  # set by the caller: the row is passed through as an error


@dataclass(frozen=True)
class EmbedResult:
    key: str
    token_ids: np.ndarray | None = None  # int32 [n_tokens]
    embedding: np.ndarray | None = None  # float16 [n_tokens, dim]; None in input mode
    num_seg_tokens: int = 0  # before the max_embed_tokens cap
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class SegSpan:
    text: str  # rendered conversation + seg_text: what the prefill pass reads
    token_ids: list[int]  # the tokens of seg_text in that context; they are the last tokens of ``text``


def embed_requests(samples: list[Sample], outputs: list[ReasonOutput]) -> list[EmbedRequest]:
    """Embedding requests for reasoning outputs (same order); failed reasoning rows pass through as errors."""
    images = {sample.key: sample.image for sample in samples}
    return [
        EmbedRequest(out.key, out.context_messages, out.seg_text, images.get(out.key), out.error) for out in outputs
    ]


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def locate_seg_span(
    processor: Any, messages: list[prompts.Message], seg_text: str, conversation_format: str = "chat_template"
) -> SegSpan:
    """Render ``messages`` + ``seg_text`` as the assistant's answer and find seg_text's tokens (at the end).

    The context is the chat template's own rendering up to where the answer starts. If tokenising the context alone does
    not give a prefix of the full tokenisation (a merge across the boundary, e.g. "ASSISTANT: " + "the" -> ":" "Ġthe"),
    trailing whitespace of the context moves into the span; failing that, the span starts after the longest common
    prefix.
    """
    seg = seg_text.strip()
    if not seg:
        raise ValueError("empty seg_text")
    tokenizer = getattr(processor, "tokenizer", processor)
    with_answer = render_conversation(
        processor, messages + [{"role": "assistant", "content": [{"type": "text", "text": seg}]}],
        add_generation_prompt=False, conversation_format=conversation_format,
    )
    position = with_answer.rfind(seg)
    if position >= 0:
        context = with_answer[:position]
    else:  # the template rewrote the answer: continue the generation prompt instead
        context = prompts.render_prompt(processor, messages, conversation_format)
        context = context if context[-1:].isspace() else context + " "
    text = context + seg
    full_ids = _token_ids(tokenizer, text)
    for boundary in (context, context.rstrip()):
        prefix_ids = _token_ids(tokenizer, boundary)
        if full_ids[: len(prefix_ids)] == prefix_ids and len(prefix_ids) < len(full_ids):
            return SegSpan(text, full_ids[len(prefix_ids):])
    prefix_ids = _token_ids(tokenizer, context.rstrip())
    common = 0
    while common < min(len(prefix_ids), len(full_ids)) and prefix_ids[common] == full_ids[common]:
        common += 1
    logger.debug("seg_text span: context tokenisation is not a prefix; span starts at the common prefix (%d)", common)
    return SegSpan(text, full_ids[common:])


class _EmbedderBase:
    mode = "hidden"

    def __init__(
        self, model: str, max_embed_tokens: int, max_model_len: int, trust_remote_code: bool,
        conversation_format: str = "chat_template", pad_to_square: bool = False,
    ):
        if max_embed_tokens <= 0:
            raise ValueError(f"max_embed_tokens must be positive, got {max_embed_tokens}")
        self.model = model
        self.max_embed_tokens = max_embed_tokens
        self.max_model_len = max_model_len
        self.processor = load_processor(model, trust_remote_code)
        self.conversation_format = conversation_format
        self.pad_colour = clip_mean_colour(self.processor) if pad_to_square else None

    needs_tensors = False  # True: _span runs the processor (the model reads its tensors); else it only counts tokens

    def _span(self, request: EmbedRequest) -> tuple[SegSpan, Any, Any, int] | EmbedResult:
        """The located span, the processor's tensors for its text+image (None unless ``needs_tensors``; counted
        without processing the pixels where the processor can), the image as the MLLM sees it and the prompt's token
        count; or the row's error."""
        if request.error:
            return EmbedResult(request.key, error=request.error)
        if request.image is None:
            return EmbedResult(request.key, error="no image given for the request")
        try:
            span = locate_seg_span(self.processor, request.messages, request.seg_text, self.conversation_format)
            image = mllm_image(request.image, self.pad_colour)
            inputs, total = None, None
            if not self.needs_tensors:
                total = count_prompt_tokens(self.processor, span.text, image)
            if total is None:
                inputs = self.processor(text=[span.text], images=[image], return_tensors="pt")
                total = int(inputs["input_ids"].shape[1])
        except Exception as exc:  # template, tokenizer and image errors come in many types
            return EmbedResult(request.key, error=f"embedding input: {type(exc).__name__}: {exc}")
        if total > self.max_model_len:
            return EmbedResult(
                request.key, error=f"embedding prompt too long: {total} tokens > max_model_len {self.max_model_len}"
            )
        return span, inputs, image, total

    def _result(self, key: str, span: SegSpan, vectors: np.ndarray | None) -> EmbedResult:
        """Cap the span at max_embed_tokens; vectors are the span's rows [n_tokens, dim] (hidden mode)."""
        cap = self.max_embed_tokens
        token_ids = np.asarray(span.token_ids[:cap], dtype=np.int32)
        embedding = None if vectors is None else np.ascontiguousarray(vectors[:cap], dtype=np.float16)
        return EmbedResult(key, token_ids, embedding, len(span.token_ids))

    def close(self) -> None:
        gc.collect()


class TokenIdEmbedder(_EmbedderBase):
    """``input`` mode: the span's token ids only; stage 2 looks them up in the exported input embedding table."""

    mode = "input"

    def __init__(
        self, model: str, max_embed_tokens: int = 64, max_model_len: int = 2048, trust_remote_code: bool = False,
        conversation_format: str = "chat_template", pad_to_square: bool = False,
    ):
        super().__init__(model, max_embed_tokens, max_model_len, trust_remote_code, conversation_format, pad_to_square)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.dim = int(config.get_text_config().hidden_size)

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedResult]:
        results = []
        for request in requests:
            located = self._span(request)
            results.append(located if isinstance(located, EmbedResult) else self._result(request.key, located[0], None))
        return results


class TransformersEmbedder(_EmbedderBase):
    """``hidden`` mode through transformers, one row at a time: the reference for ``VllmEmbedder``."""

    needs_tensors = True

    def __init__(
        self, model: str, max_embed_tokens: int = 64, max_model_len: int = 2048, dtype: str = "float32",
        trust_remote_code: bool = False, device: str = "cpu", conversation_format: str = "chat_template",
        pad_to_square: bool = False,
    ):
        super().__init__(model, max_embed_tokens, max_model_len, trust_remote_code, conversation_format, pad_to_square)
        self.device = device
        self.hf_model = load_hf_model(model, dtype, trust_remote_code, device)
        self.dim = int(self.hf_model.config.get_text_config().hidden_size)

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedResult]:
        import torch

        results = []
        for request in requests:
            located = self._span(request)
            if isinstance(located, EmbedResult):
                results.append(located)
                continue
            span, inputs, _, _ = located
            try:
                with torch.inference_mode():
                    output = self.hf_model(**inputs.to(self.device), output_hidden_states=True)
                hidden = output.hidden_states[HIDDEN_LAYER][0]  # NxD over the whole prompt
                vectors = hidden[-len(span.token_ids):].float().cpu().numpy()
                results.append(self._result(request.key, span, vectors))
            except Exception as exc:
                error = f"transformers forward failed: {type(exc).__name__}: {exc}"
                results.append(EmbedResult(request.key, error=error))
        return results

    def close(self) -> None:
        self.hf_model = None
        gc.collect()


class VllmEmbedder(_EmbedderBase):
    """``hidden`` mode through a vLLM pooling engine: one batched prefill over every row's conversation + seg_text.

    The engine runs the generative checkpoint as a token-embedding model (``runner="pooling", convert="embed"``, pooler
    task ``token_embed`` without activation, so vectors are not L2-normalised); it returns one vector per prompt token,
    equal to transformers' ``hidden_states[-1]``. Start it after the generation engine is closed. Extra keyword
    arguments go to ``vllm.LLM``.
    """

    def __init__(
        self, model: str, max_embed_tokens: int = 64, max_model_len: int = 2048, dtype: str = "float32",
        tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.1, enforce_eager: bool = True,
        trust_remote_code: bool = False, seed: int = 0, conversation_format: str = "chat_template",
        pad_to_square: bool = False, stall_timeout_s: float = 300.0, **engine_kwargs: Any,
    ):
        super().__init__(model, max_embed_tokens, max_model_len, trust_remote_code, conversation_format, pad_to_square)
        from vllm import LLM
        from vllm.config import PoolerConfig

        from stage1_reason.engine_health import EngineWatchdog, descendant_pids, engine_processes

        engine_kwargs.setdefault("limit_mm_per_prompt", {"image": 1})
        before = descendant_pids()
        self.llm = LLM(
            model=model, runner="pooling", convert="embed",
            pooler_config=PoolerConfig(task="token_embed", use_activation=False),
            dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code, seed=seed, **engine_kwargs,
        )
        self.dim = int(self.llm.llm_engine.model_config.get_hidden_size())
        self.watchdog = EngineWatchdog(engine_processes(before), stall_timeout_s)

    def _run(self, batch: list[tuple[EmbedRequest, SegSpan, int, Any]]) -> list[EmbedResult]:
        prompts_in = [{"prompt": span.text, "multi_modal_data": {"image": image}} for _, span, _, image in batch]
        with self.watchdog.watching():
            outputs = self.llm.encode(prompts_in, pooling_task="token_embed", use_tqdm=False)
        results = []
        for (request, span, total, _), output in zip(batch, outputs, strict=True):
            vectors = output.outputs.data  # NxD over the whole prompt, image tokens included
            count = len(span.token_ids)
            if vectors.shape[0] != total or list(output.prompt_token_ids[-count:]) != span.token_ids:
                results.append(EmbedResult(
                    request.key,
                    error=f"vLLM prompt tokens differ from the processor's ({vectors.shape[0]} vs {total} tokens)",
                ))
                continue
            results.append(self._result(request.key, span, vectors[-count:].float().cpu().numpy()))
        return results

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedResult]:
        results: list[EmbedResult | None] = [None] * len(requests)
        batch, positions = [], []
        for index, request in enumerate(requests):
            located = self._span(request)
            if isinstance(located, EmbedResult):
                results[index] = located
            else:
                batch.append((request, located[0], located[3], located[2]))
                positions.append(index)
        if batch:
            from stage1_reason.engine_health import EngineFailure, is_engine_death

            try:
                batch_results = self._run(batch)
            except Exception as exc:
                if is_engine_death(exc):
                    raise EngineFailure(f"vLLM engine failed during embedding: {type(exc).__name__}: {exc}") from exc
                logger.warning("vLLM embedding batch of %d failed (%s: %s); retrying row by row",
                               len(batch), type(exc).__name__, exc)
                batch_results = []
                for item in batch:
                    try:
                        batch_results.extend(self._run([item]))
                    except Exception as row_exc:
                        if is_engine_death(row_exc):
                            raise EngineFailure(f"vLLM engine failed during embedding: {row_exc}") from row_exc
                        batch_results.append(EmbedResult(
                            item[0].key, error=f"vLLM embedding failed: {type(row_exc).__name__}: {row_exc}"
                        ))
            for index, result in zip(positions, batch_results, strict=True):
                results[index] = result
        return [r for r in results if r is not None]

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            shutdown_engine(self.llm)
            self.llm = None


def _local_model_dir(model: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))


def _input_embedding_key(keys: list[str]) -> str:
    """The language model's input embedding among a checkpoint's tensor names (LLaVA, Qwen2-VL, new and hub layouts)."""
    candidates = [k for k in keys if k.endswith("embed_tokens.weight") and "vision" not in k and "visual" not in k]
    if not candidates:
        raise KeyError(f"no '*embed_tokens.weight' tensor among {len(keys)} checkpoint tensors")
    return min(candidates, key=len)


def export_input_embeddings(model: str, path: Path, dtype: str = "float16") -> Path:
    """Write the MLLM's input embedding table [vocab, dim] to ``path`` (safetensors, tensor ``input_embeddings``).

    Reads only that tensor from the checkpoint's safetensors files (local folder or the local hub cache), so no model is
    loaded. Metadata: model, source tensor name, vocab size, dim.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = _local_model_dir(model)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no safetensors weights to read the input embeddings from")
        weight_map = {}
        for file in files:
            with safe_open(str(file), "pt") as handle:
                weight_map.update({key: file.name for key in handle.keys()})
    key = _input_embedding_key(list(weight_map))
    with safe_open(str(folder / weight_map[key]), "pt") as handle:
        table = handle.get_tensor(key)
    table = table.to(getattr(torch, dtype)).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    metadata = {
        "model": str(model), "source_tensor": key, "vocab_size": str(table.shape[0]), "dim": str(table.shape[1])
    }
    save_file({"input_embeddings": table}, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path


def make_embedder(mode: str, model: str, backend: str = "vllm", **kwargs: Any) -> Any:
    """The embedder for ``mode`` (hidden | input) and ``backend`` (vllm | transformers)."""
    shared = ("max_embed_tokens", "max_model_len", "trust_remote_code", "conversation_format", "pad_to_square")
    if mode == "input":
        keep = {k: kwargs[k] for k in shared if k in kwargs}
        return TokenIdEmbedder(model, **keep)
    if mode != "hidden":
        raise ValueError(f"embed_mode must be one of {EMBED_MODES}, got {mode!r}")
    if backend == "vllm":
        return VllmEmbedder(model, **kwargs)
    if backend == "transformers":
        names = (*shared, "dtype")
        keep = {k: kwargs[k] for k in names if k in kwargs}
        return TransformersEmbedder(model, **keep)
    raise ValueError(f"backend must be vllm or transformers, got {backend!r}")
