"""Language-aware adapter (paper Sec. 3.3, Eq. 4): SAM's visual tokens cross-attend to the projected MLLM text tokens.

``F_p = LAM_p(V_p, E)``: the visual features ``V_p`` of one ViT block (BxHxWxC) are the queries, the projected text
tokens ``E`` (BxNxD) the keys and values; a feed-forward layer follows; both results are added to ``V_p`` through
residual paths. Each residual branch is scaled by a per-channel gate that starts at zero, so an adapted encoder computes
exactly what SAM computes before training. The gates receive gradient from the first backward pass (their gradient is
the branch output times the upstream gradient), and the inner weights start receiving gradient once the gates move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from torch import nn


class LanguageAwareAdapter(nn.Module):
    """Gated cross-attention (visual queries, text keys/values) plus a gated feed-forward layer, pre-norm, residual.

    Args:
        dim: width C of the visual tokens (the ViT's embed dim).
        text_dim: width D of the projected text tokens; keys and values are projected from D to C here, so every
            adapter reads the same projected tokens whatever the encoder width.
        num_heads: attention heads; ``dim`` must be divisible by it.
        mlp_ratio: hidden width of the feed-forward layer as a multiple of ``dim``.
    """

    def __init__(self, dim: int, text_dim: int, num_heads: int = 8, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"LanguageAwareAdapter: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.text_dim = text_dim
        self.num_heads = num_heads
        self.norm_visual = nn.LayerNorm(dim)
        self.norm_text = nn.LayerNorm(text_dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(text_dim, dim)
        self.value = nn.Linear(text_dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_gate = nn.Parameter(torch.zeros(dim))
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=nn.GELU)
        self.ffn_gate = nn.Parameter(torch.zeros(dim))

    def forward(self, visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Fuse text into visual features.

        Args:
            visual: BxHxWxC features after a ViT block.
            text: BxNxD projected text tokens.
            text_mask: BxN bool, True where a token is real (False = padding, ignored as a key).
        Returns:
            BxHxWxC fused features. A row without any real token is returned unchanged.
        """
        batch, height, width, channels = visual.shape
        if channels != self.dim or text.shape[-1] != self.text_dim:
            raise ValueError(
                f"LanguageAwareAdapter(dim={self.dim}, text_dim={self.text_dim}): got visual {tuple(visual.shape)}, "
                f"text {tuple(text.shape)}"
            )
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask shape {tuple(text_mask.shape)} does not match text {tuple(text.shape[:2])}")
        text_mask = text_mask.bool()
        has_text = text_mask.any(dim=1)
        # A row with no real token would attend to nothing (NaN); let it attend to its padding and drop its update.
        attend = text_mask | ~has_text[:, None]
        row_scale = has_text.to(visual.dtype)[:, None, None]

        tokens = visual.reshape(batch, height * width, channels)
        head_dim = channels // self.num_heads
        text_normed = self.norm_text(text)
        query = self.query(self.norm_visual(tokens)).view(batch, -1, self.num_heads, head_dim).transpose(1, 2)
        key = self.key(text_normed).view(batch, -1, self.num_heads, head_dim).transpose(1, 2)
        value = self.value(text_normed).view(batch, -1, self.num_heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attend[:, None, None, :])
        attended = self.attn_out(attended.transpose(1, 2).reshape(batch, height * width, channels))

        tokens = tokens + self.attn_gate * attended * row_scale
        tokens = tokens + self.ffn_gate * self.ffn(self.norm_ffn(tokens)) * row_scale
        return tokens.view(batch, height, width, channels)
