"""The functions f used by the benchmarks: one transformer layer and one conv residual block."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TransformerCell(nn.Module):
    """Post-LN transformer layer with input injection, attention written as matmul + softmax
    (the fused attention kernels are not twice differentiable, which JR needs)."""

    def __init__(self, d_model: int = 256, heads: int = 4, d_ffn: int = 1024) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ff1 = nn.Linear(d_model, d_ffn)
        self.ff2 = nn.Linear(d_ffn, d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, n, d = z.shape
        h = z + x
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        a = (att @ v).transpose(1, 2).reshape(b, n, d)
        h = self.ln1(z + self.proj(a) + x)
        return self.ln2(h + self.ff2(F.gelu(self.ff1(h))))


class ConvCell(nn.Module):
    """MDEQ-style residual block: conv-GN-ReLU-conv-GN, injection, residual, ReLU, GN."""

    def __init__(self, channels: int = 64, groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, channels)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.gn3 = nn.GroupNorm(groups, channels)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.gn1(self.conv1(z)))
        return self.gn3(F.relu(z + self.gn2(self.conv2(y) + x)))


class TanhCell(nn.Module):
    """``tanh(W z + U x)``, W scaled to spectral norm ``scale`` (a contraction for ``scale < 1``)."""

    def __init__(self, dim: int = 16, in_dim: int = 8, scale: float = 0.8, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.u = nn.Linear(in_dim, dim, dtype=dtype)
        with torch.no_grad():
            self.w.weight.mul_(scale / torch.linalg.matrix_norm(self.w.weight, ord=2))
        self.dim = dim

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.dim)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w(z) + self.u(x))
