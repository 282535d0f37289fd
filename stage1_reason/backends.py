"""The engines stage 1 runs, built from the config: generation (vLLM, transformers, or a running `vllm serve`) and
embedding (vLLM's pooling runner, transformers, input-embedding lookups, or a pooling `vllm serve`).

Both the single-process run (``run``) and the Ray Data actors (``ray_run``) build their engines here.
"""

from __future__ import annotations

from typing import Any

from shared.config import PipelineConfig


def make_generation_backend(config: PipelineConfig, model_path: str) -> Any:
    if config.stage1.backend == "openai":  # a running `vllm serve`
        from stage1_reason.openai_backend import backend_from_config

        return backend_from_config(config.stage1, model_path)
    from stage1_reason.engine import make_backend

    s1 = config.stage1
    extra = {"stall_timeout_s": s1.engine_stall_timeout_s} if s1.backend == "vllm" else {}
    return make_backend(
        s1.backend, model_path, max_new_tokens=s1.max_new_tokens, dtype=s1.dtype, max_model_len=s1.max_model_len,
        tensor_parallel_size=s1.tensor_parallel_size, gpu_memory_utilization=s1.gpu_memory_utilization,
        enforce_eager=s1.enforce_eager, trust_remote_code=s1.trust_remote_code, seed=s1.seed,
        conversation_format=s1.conversation_format, pad_to_square=s1.image_pad_to_square, **extra,
    )


def make_embedder_for(config: PipelineConfig, model_path: str) -> Any:
    if config.stage1.backend == "openai" and config.stage1.embed_mode == "hidden":  # a pooling `vllm serve`
        from stage1_reason.openai_backend import embedder_from_config

        return embedder_from_config(config.stage1, model_path)
    from stage1_reason.embed import make_embedder

    s1 = config.stage1
    kwargs: dict[str, Any] = dict(
        max_embed_tokens=s1.max_embed_tokens, max_model_len=s1.max_model_len, dtype=s1.dtype,
        trust_remote_code=s1.trust_remote_code, conversation_format=s1.conversation_format,
        pad_to_square=s1.image_pad_to_square,
    )
    if s1.backend == "vllm":
        kwargs.update(tensor_parallel_size=s1.tensor_parallel_size, gpu_memory_utilization=s1.gpu_memory_utilization,
                      enforce_eager=s1.enforce_eager, seed=s1.seed, stall_timeout_s=s1.engine_stall_timeout_s)
    return make_embedder(s1.embed_mode, model_path, backend=s1.backend, **kwargs)
