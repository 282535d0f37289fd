"""MLP that projects MLLM token embeddings into SAM's prompt space (paper Sec. 3.3: "an MLP to project these textual
embeddings to the visual feature space").

One projector serves both consumers: its output tokens (width = SAM's ``prompt_embed_dim``, 256 for the official
models) are the mask decoder's sparse prompt embeddings, and every language-aware adapter attends to the same tokens,
mapping them to its encoder width through its own key/value projections.
"""

from __future__ import annotations

import torch
from torch import nn


class TextProjector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, applied per token.

    The input LayerNorm makes the projector indifferent to the scale of what stage 1 stored (last-layer hidden states
    and input-embedding rows differ by orders of magnitude). The hidden width defaults to ``llm_dim``, like LISA's
    text projection.

    Args:
        llm_dim: width of the MLLM embeddings (4096 for 7B, 5120 for 13B, 128 for the tiny LLaVA).
        out_dim: width of the projected tokens (SAM's prompt_embed_dim).
        hidden_dim: hidden width; None = ``llm_dim``.
    """

    def __init__(self, llm_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or llm_dim
        self.llm_dim = llm_dim
        self.out_dim = out_dim
        self.norm = nn.LayerNorm(llm_dim)
        self.fc1 = nn.Linear(llm_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """BxNxD_llm (any float dtype, e.g. the float16 rows of a shard) -> BxNxD_out in the projector's dtype."""
        if text_embeds.shape[-1] != self.llm_dim:
            raise ValueError(
                f"TextProjector expects embeddings of width {self.llm_dim} (the MLLM's hidden size), "
                f"got shape {tuple(text_embeds.shape)}"
            )
        hidden = self.norm(text_embeds.to(self.fc1.weight.dtype))
        return self.fc2(self.act(self.fc1(hidden)))
