"""The position-wise feed-forward network of the equilibrium layer."""
from __future__ import annotations

import torch
from torch import nn

from deq_core import VariationalDropout

__all__ = ["PositionwiseFeedForward"]


class PositionwiseFeedForward(nn.Module):
    """``Linear(d, d_ffn) -> ReLU -> variational dropout -> Linear(d_ffn, d)`` on ``(B, T, d)``."""

    def __init__(self, embed_dim: int, ffn_dim: int, activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout = VariationalDropout.features1d(activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The position-wise feed-forward block on ``x``."""
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))
