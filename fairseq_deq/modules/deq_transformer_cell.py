"""The weight-tied layer f(z, x) of the DEQ-Transformer: relative attention + feed-forward, with
the input injection added inside the attention and feed-forward inputs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deq_core import VariationalDropout

from .feed_forward import PositionwiseFeedForward
from .relative_attention import RelativeMultiheadAttention

__all__ = ["DEQTransformerCell"]


class DEQTransformerCell(nn.Module):
    """One Transformer-XL layer used as the equilibrium function ``f(z, u_attn, u_ffn, pos, mem)``.

    ``u_attn`` and ``u_ffn`` ``(B, T, d)`` are the injections (a linear map of the embeddings,
    computed once per forward outside f); ``pos`` are the relative position embeddings and
    ``mem`` ``(B, M, d)`` the detached attention inputs of previous segments.

    post-LN (``normalize_before=False``)::

        a = z + u_attn;  h = LN1(a + Attn(a));  b = h + u_ffn;  f = LN2(b + FFN(b))

    pre-LN::

        a = LN1(z) + u_attn;  h = z + Attn(a);  b = LN2(h) + u_ffn;  f = h + FFN(b)

    Norms are ``torch.nn.LayerNorm`` (twice differentiable, which JR needs; fairseq's LayerNorm
    helper may return apex's fused kernel). Dropout is variational: one mask per equilibrium pass.
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                 normalize_before: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        self.normalize_before = normalize_before
        self.attn = RelativeMultiheadAttention(embed_dim, num_heads, attention_dropout)
        self.ffn = PositionwiseFeedForward(embed_dim, ffn_dim, activation_dropout)
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.attn_dropout = VariationalDropout.features1d(dropout)
        self.ffn_dropout = VariationalDropout.features1d(dropout)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def attention_input(self, z: torch.Tensor, u_attn: torch.Tensor) -> torch.Tensor:
        """What the attention reads at each position (also what the segment memory stores)."""
        return (self.attn_norm(z) if self.normalize_before else z) + u_attn

    def forward(self, z: torch.Tensor, u_attn: torch.Tensor, u_ffn: torch.Tensor, pos: torch.Tensor,
                mem: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f(z; u_attn, u_ffn, pos, mem): one weight-tied Transformer-XL layer on the state ``z``."""
        a = self.attention_input(z, u_attn)
        attn = self.attn_dropout(self.attn(a, pos, mem))
        if self.normalize_before:
            h = z + attn
            return h + self.ffn_dropout(self.ffn(self.ffn_norm(h) + u_ffn))
        h = self.attn_norm(a + attn)
        b = h + u_ffn
        return self.ffn_norm(b + self.ffn_dropout(self.ffn(b)))
