"""Transformer-XL relative-position multi-head attention over [memory; current segment].

Written with explicit matmul + softmax: Jacobian regularization differentiates a vector-Jacobian
product of the layer, and PyTorch's fused attention kernels have no double backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from deq_core import VariationalDropout

__all__ = ["RelativeMultiheadAttention", "relative_positions", "rel_shift"]


def relative_positions(klen: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embeddings ``(klen, dim)`` of the distances ``klen-1, ..., 1, 0``."""
    if dim % 2:
        raise ValueError(f"the model dimension must be even for sinusoidal positions, got {dim}")
    compute = torch.promote_types(dtype, torch.float32)  # float32 at least, float64 for a float64 model
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=compute) / dim))
    dist = torch.arange(klen - 1, -1, -1, device=device, dtype=compute)
    angles = dist[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Re-index ``(..., T, K)`` scores from "distance column" to "key column".

    Column ``c`` of ``x`` holds distance ``K-1-c``; query ``i`` sits at key position ``K-T+i``,
    so it needs column ``j + T-1-i`` for key ``j``. Padding one zero column and reading the
    buffer with a stride one longer does that shift for all rows at once (entries for keys in
    the future of the query are garbage and must be masked).
    """
    *lead, t, k = x.shape
    padded = torch.cat([x.new_zeros(*lead, t, 1), x], dim=-1)
    return padded.view(*lead, k + 1, t)[..., 1:, :].reshape(*lead, t, k)


class RelativeMultiheadAttention(nn.Module):
    """Causal multi-head attention with Transformer-XL relative positions and a segment memory.

    ``forward(a, pos, mem, u)``: ``[q, k, v] = W_qkv a + u`` at the current positions, ``a``
    ``(B, T, d)`` the attention input and ``u`` ``(B, T, 3d)`` an input injection (or None);
    ``mem`` holds earlier positions' attention inputs ``(B, M, d)``, and with an injection their
    key/value injections too (``[a | u_k | u_v]``, ``(B, M, 3d)``); their keys and values are
    computed with the current weights. ``pos`` ``(M+T, d)`` are the sinusoidal embeddings of the
    distances (see :func:`relative_positions`).
    Query ``i`` attends to keys ``j <= M + i``. Attention-probability dropout is variational (one
    mask per equilibrium pass), so every solver iteration evaluates the same function.
    """

    def __init__(self, embed_dim: int, num_heads: int, attention_dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embedding dimension {embed_dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.kv_proj = nn.Linear(embed_dim, 2 * embed_dim, bias=False)
        self.r_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        # Global content and position biases (u and v in the Transformer-XL paper).
        self.r_w_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.r_r_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.dropout = VariationalDropout(attention_dropout)

    def forward(self, a: torch.Tensor, pos: torch.Tensor, mem: Optional[torch.Tensor] = None,
                u: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal relative-position self-attention of ``a`` (injection ``u``) over ``[mem; a]``."""
        bsz, tlen, dim = a.shape
        kv_in = a if mem is None else torch.cat([mem[..., :dim].to(a.dtype), a], dim=1)
        q, kv = self.q_proj(a), self.kv_proj(kv_in)
        if u is not None:
            u_kv = u[..., dim:] if mem is None else torch.cat([mem[..., dim:].to(a.dtype), u[..., dim:]], dim=1)
            q, kv = q + u[..., :dim], kv + u_kv
        klen = kv_in.shape[1]
        if pos.shape[0] != klen:
            raise ValueError(f"got {pos.shape[0]} relative positions for {klen} keys")
        h, dh = self.num_heads, self.head_dim
        q = q.view(bsz, tlen, h, dh)
        k, v = kv.view(bsz, klen, 2, h, dh).unbind(2)
        r = self.r_proj(pos).view(klen, h, dh)

        q_content = (q + self.r_w_bias).transpose(1, 2)                    # (B, H, T, dh)
        q_position = (q + self.r_r_bias).transpose(1, 2)
        content = q_content @ k.permute(0, 2, 3, 1)                        # (B, H, T, K)
        position = rel_shift(q_position @ r.permute(1, 2, 0))              # (B, H, T, K)
        scores = content + position
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.scale  # a softmax of at least float32
        future = torch.ones(tlen, klen, dtype=torch.bool, device=a.device).triu_(klen - tlen + 1)
        scores = scores.masked_fill(future, float("-inf"))
        probs = self.dropout(torch.softmax(scores, dim=-1).to(v.dtype))
        out = (probs @ v.transpose(1, 2)).transpose(1, 2).reshape(bsz, tlen, dim)
        return self.out_proj(out)
