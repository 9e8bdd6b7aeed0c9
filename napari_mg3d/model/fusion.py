"""Modality-dominant cross-attention, fusion layers and self-attention pooling (paper Fig. 4b, eq. 1, 3, 11).

Shapes: B batch, N dominant tokens, S complementary queries, d width, h heads.
Masks are bool with True = a real token/query, False = padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CrossAttentionOutput:
    """dominant: (B, N, d) re-weighted dominant tokens (eq. 1/3);
    queries: (B, S, d) standard attention read-out per query (eq. 11), when asked for;
    attention: (B, h, S, N) softmax over N per query, when asked for."""

    dominant: torch.Tensor | None
    queries: torch.Tensor | None
    attention: torch.Tensor | None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, h, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, h * dh)


class ModalityDominantCrossAttention(nn.Module):
    """Cross-attention where the dominant modality gives keys and values and keeps its own tokens.

    For queries q_s (complementary modality) and dominant tokens v_n:
    A[s, n] = softmax_n((W_Q q_s)·(W_K v_n) / sqrt(d_head)). The dominant output for token n is
    W_V v_n scaled by the attention it receives averaged over the valid queries, times the number of
    valid dominant tokens N, so that uniform attention is the identity re-weighting. (Eq. 1 without the
    factor N makes the branch ~1/N the size of the residual it is added to; the factor is a constant that
    keeps the paper's relative weighting. The official code uses a sigmoid; we follow the paper's softmax.)
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self,
        dominant: torch.Tensor,
        queries: torch.Tensor,
        dominant_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        *,
        return_dominant: bool = True,
        return_queries: bool = False,
        return_attention: bool = False,
    ) -> CrossAttentionOutput:
        q = _split_heads(self.q(queries), self.heads)
        k = _split_heads(self.k(dominant), self.heads)
        v = _split_heads(self.v(dominant), self.heads)
        key_bias = None
        if dominant_mask is not None:
            key_bias = torch.zeros(dominant_mask.shape, dtype=q.dtype, device=q.device)
            key_bias = key_bias.masked_fill(~dominant_mask, float("-inf"))[:, None, None, :]

        if not (return_dominant or return_attention):
            # Read-out only: the fused kernel never materialises the (S, N) map.
            read = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
            return CrossAttentionOutput(None, self.out(_merge_heads(read)), None)

        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if key_bias is not None:
            logits = logits + key_bias
        attn = logits.softmax(dim=-1)  # (B, h, S, N)

        dominant_out = None
        if return_dominant:
            if query_mask is None:
                received = attn.mean(dim=2)
            else:
                qm = query_mask[:, None, :, None].to(attn.dtype)
                received = (attn * qm).sum(dim=2) / qm.sum(dim=2).clamp_min(1.0)
            n_valid = (
                dominant_mask.sum(-1, keepdim=True)[:, None, :].to(attn.dtype)
                if dominant_mask is not None
                else torch.full_like(received[..., :1], dominant.shape[1])
            )
            weighted = v * (received * n_valid).unsqueeze(-1)
            dominant_out = self.out(_merge_heads(weighted))
        queries_out = self.out(_merge_heads(torch.matmul(attn, v))) if return_queries else None
        return CrossAttentionOutput(dominant_out, queries_out, attn if return_attention else None)


class SelfAttention(nn.Module):
    """Multi-head self-attention through the fused SDPA kernel, with a key padding mask."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~mask, float("-inf"))[:, None, None, :]
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)))


class FusionLayer(nn.Module):
    """Pre-norm fusion layer: self-attention -> modality-dominant cross-attention -> feed-forward."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_query = nn.LayerNorm(dim)
        self.cross_attn = ModalityDominantCrossAttention(dim, heads)
        self.norm_ffn = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self,
        dominant: torch.Tensor,
        queries: torch.Tensor,
        dominant_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = dominant + self.self_attn(self.norm_self(dominant), dominant_mask)
        cross = self.cross_attn(self.norm_cross(x), self.norm_query(queries), dominant_mask, query_mask,
                                return_attention=return_attention)
        x = x + cross.dominant
        x = x + self.ffn(self.norm_ffn(x))
        if dominant_mask is not None:
            x = x * dominant_mask.unsqueeze(-1).to(x.dtype)
        return x, cross.attention


class FusionStack(nn.Module):
    """A stack of fusion layers; returns the fused dominant tokens and, on request, the last layer's
    attention maps (B, h, S, N)."""

    def __init__(self, dim: int, heads: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        dominant: torch.Tensor,
        queries: torch.Tensor,
        dominant_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention = None
        x = dominant
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            x, attention = layer(x, queries, dominant_mask, query_mask, return_attention and last)
        return self.norm(x), attention


class SelfAttentionPooling(nn.Module):
    """Additive self-attention pooling: weights softmax_t(w·tanh(W x_t)) over valid tokens -> (B, d)."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.score(x).squeeze(-1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0)  # rows with no valid token pool to zero
        return torch.einsum("bt,btd->bd", weights, x)
