"""Stage 1 for one image and one query (interactive use): the chain of thought, then the embedding of its seg_text.

Same prompts, engines and embedding as the batch job, so a single answer equals the one the batch job would cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import PipelineConfig
from stage1_reason.tiny_model import resolve_model


@dataclass(frozen=True)
class SingleReasoning:
    reason_question: str
    reason_answer: str
    seg_answer: str
    target: str
    attributes: str
    parse_status: str
    seg_text: str
    token_ids: np.ndarray  # int32 [n]
    embedding: np.ndarray | None  # float16 [n, dim]; None in input mode
    embed_mode: str


def reason_one(
    config: PipelineConfig,
    image: np.ndarray,
    query: str,
    query_kind: str = "phrase",
    backend: Any = None,
    embedder: Any = None,
) -> SingleReasoning:
    """Both CoT turns and the embedding for one sample; raises ValueError with the row's error message on failure.

    ``backend``/``embedder`` may be passed in (engines already running); they are then not closed here.
    """
    from stage1_reason.embed import EmbedRequest
    from stage1_reason.engine import Sample, run_chain_of_thought
    from stage1_reason.backends import make_embedder_for, make_generation_backend

    model_path = resolve_model(config.stage1.model, config.work_dir)
    own_backend = backend is None
    backend = backend or make_generation_backend(config, model_path)
    try:
        (output,) = run_chain_of_thought(
            backend, [Sample("single", query, query_kind, image)], config.stage1.cot_steps, config.stage1.prompt_version
        )
    finally:
        if own_backend:
            backend.close()
    if output.error:
        raise ValueError(f"reasoning failed: {output.error}")
    own_embedder = embedder is None
    embedder = embedder or make_embedder_for(config, model_path)
    try:
        (result,) = embedder.embed([EmbedRequest("single", output.context_messages, output.seg_text, image)])
    finally:
        if own_embedder:
            embedder.close()
    if not result.ok:
        raise ValueError(f"embedding failed: {result.error}")
    return SingleReasoning(
        output.reason_question, output.reason_answer, output.target_attribute_answer, output.target, output.attributes,
        output.parse_status, output.seg_text, result.token_ids, result.embedding, config.stage1.embed_mode,
    )


def input_embedding_rows(model_path: str | Path, token_ids: np.ndarray) -> np.ndarray:
    """float16 [n, dim] rows of the model's input embedding table (input mode), read from its safetensors."""
    from stage1_reason.embed import export_input_embeddings
    import tempfile

    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as tmp:
        path = export_input_embeddings(str(model_path), Path(tmp) / "table.safetensors")
        table = load_file(str(path))["input_embeddings"]
    return np.asarray(table[np.asarray(token_ids, dtype=np.int64)], dtype=np.float16)
