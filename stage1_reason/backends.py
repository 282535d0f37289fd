"""The engines stage 1 runs, built from the config: generation (vLLM, transformers, or a running `vllm serve`) and
embedding (vLLM's pooling runner, transformers, input-embedding lookups, or a pooling `vllm serve`).

Both the single-process run (``run``) and the Ray Data actors (``ray_run``) build their engines here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shared.config import PipelineConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def kv_cache_bytes(model_path: str, tokens: int, dtype: str, trust_remote_code: bool = False) -> int:
    """Bytes of a KV cache holding ``tokens`` tokens of the model's decoder: K and V per layer, per KV head."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if dtype == "auto":
        dtype = str(getattr(text, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = dtype.removeprefix("torch.")
    return 2 * text.num_hidden_layers * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 4) * tokens


def engine_kwargs(config: PipelineConfig, model_path: str) -> dict[str, Any]:
    """``vllm.LLM`` arguments of the config beyond the constructors' own: the KV cache size in bytes when it is given
    in tokens (``stage1.kv_cache_tokens``)."""
    s1 = config.stage1
    if not s1.kv_cache_tokens:
        return {}
    return {"kv_cache_memory_bytes": kv_cache_bytes(model_path, s1.kv_cache_tokens, s1.dtype, s1.trust_remote_code)}


@contextmanager
def engine_process_mode(in_process: bool) -> Iterator[None]:
    """``stage1.engine_in_process``: the vLLM engine core built inside this block runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, read when the engine is created) instead of a process of its own."""
    if not in_process:
        yield
        return
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    previous = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def make_generation_backend(config: PipelineConfig, model_path: str) -> Any:
    if config.stage1.backend == "openai":  # a running `vllm serve`
        from stage1_reason.openai_backend import backend_from_config

        return backend_from_config(config.stage1, model_path)
    from stage1_reason.engine import make_backend

    s1 = config.stage1
    extra = {"stall_timeout_s": s1.engine_stall_timeout_s, **engine_kwargs(config, model_path)} \
        if s1.backend == "vllm" else {}
    with engine_process_mode(s1.engine_in_process and s1.backend == "vllm"):
        return make_backend(
            s1.backend, model_path, max_new_tokens=s1.max_new_tokens, dtype=s1.dtype, max_model_len=s1.max_model_len,
            tensor_parallel_size=s1.tensor_parallel_size, gpu_memory_utilization=s1.gpu_memory_utilization,
            enforce_eager=s1.enforce_eager, trust_remote_code=s1.trust_remote_code, seed=s1.seed,
            conversation_format=s1.conversation_format, pad_to_square=s1.image_pad_to_square, **extra,
        )


def embed_backend(config: PipelineConfig) -> str:
    """Who computes hidden-state embeddings: ``stage1.embed_backend``, else the generation backend."""
    return config.stage1.embed_backend or config.stage1.backend


def make_embedder_for(config: PipelineConfig, model_path: str) -> Any:
    if embed_backend(config) == "openai" and config.stage1.embed_mode == "hidden":  # a pooling `vllm serve`
        from stage1_reason.openai_backend import embedder_from_config

        return embedder_from_config(config.stage1, model_path)
    from stage1_reason.embed import make_embedder

    s1 = config.stage1
    kwargs: dict[str, Any] = dict(
        max_embed_tokens=s1.max_embed_tokens, max_model_len=s1.max_model_len, dtype=s1.dtype,
        trust_remote_code=s1.trust_remote_code, conversation_format=s1.conversation_format,
        pad_to_square=s1.image_pad_to_square,
    )
    kind = embed_backend(config)
    if kind == "vllm" and s1.embed_mode == "hidden":
        kwargs.update(tensor_parallel_size=s1.tensor_parallel_size, gpu_memory_utilization=s1.gpu_memory_utilization,
                      enforce_eager=s1.enforce_eager, seed=s1.seed, stall_timeout_s=s1.engine_stall_timeout_s,
                      **engine_kwargs(config, model_path))
    with engine_process_mode(s1.engine_in_process and kind == "vllm"):
        return make_embedder(s1.embed_mode, model_path, backend=kind, **kwargs)
