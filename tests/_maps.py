"""Small maps with known fixed points and Jacobians shared by the core tests."""
import torch
from torch import nn

from deq_core import VariationalDropout


def contraction(dim: int, radius: float, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """A random (dim, dim) matrix with spectral radius ``radius``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=dtype)
    return a * (radius / torch.linalg.eigvals(a).abs().max())


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b), a contraction for small W."""

    def __init__(self, dim: int, in_dim: int, scale: float = 0.5, dtype=torch.float64):
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.u = nn.Linear(in_dim, dim, dtype=dtype)
        with torch.no_grad():
            self.w.weight.copy_(contraction(dim, scale, dtype))
        self.dim = dim

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.dim)

    def forward(self, z, x):
        return torch.tanh(self.w(z) + self.u(x))


class TwoScaleCell(nn.Module):
    """A state of two tensors of different shapes coupled both ways (like MDEQ branches)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.a = nn.Linear(6, 6, dtype=dtype)
        self.b = nn.Linear(3, 6, dtype=dtype)
        self.c = nn.Linear(6, 3, dtype=dtype)
        with torch.no_grad():
            for lin in (self.a, self.b, self.c):
                lin.weight.mul_(0.4)

    def init_state(self, x):
        return [x.new_zeros(x.shape[0], 2, 3), x.new_zeros(x.shape[0], 3)]

    def forward(self, z, x):
        z1, z2 = z
        flat1 = z1.reshape(z1.shape[0], 6)
        n1 = torch.tanh(self.a(flat1) + self.b(z2) + x)
        n2 = torch.tanh(self.c(flat1) + z2 * 0.3)
        return [n1.reshape(-1, 2, 3), n2]


class MLPCell(nn.Module):
    """f(z, x) = LayerNorm(z + W2 relu(W1 z) + x): a small residual block with a norm."""

    def __init__(self, dim=16, hidden=32, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = VariationalDropout.features1d(dropout)

    def forward(self, z, x):
        return self.norm(z + self.drop(self.fc2(torch.relu(self.fc1(z)))) + x)
