"""Small maps with known fixed points and Jacobians shared by the core tests."""
import torch
from torch import nn

from deq_core import VariationalDropout
from deq_core.testing import contraction  # noqa: F401 (the maps of the tests, re-exported)


def causal_problem(b_last, length=6, dim=5, batch=2):
    """A flat map of ``batch`` sequences of ``length`` positions, ``z_t = tanh(A z_t + C mean(z_{<t}) + b_t)``
    (position t depends on earlier positions only, the last one's ``b`` set to ``b_last``), its
    zero initial state and the sequence length."""
    g = torch.Generator().manual_seed(0)
    a = contraction(dim, 0.6)
    c = 0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64)
    b = torch.randn(batch, length, dim, generator=g, dtype=torch.float64)
    b[:, -1] = b_last

    def f(flat):
        z = flat.view(batch, length, dim)
        past = torch.cumsum(z, dim=1) - z
        counts = torch.arange(length, dtype=z.dtype).clamp_min(1).view(1, length, 1)
        return torch.tanh(z @ a.T + (past / counts) @ c.T + b).reshape(batch * length, dim)

    return f, torch.zeros(batch * length, dim, dtype=torch.float64), length


def reduced_precision_problem(dtype: torch.dtype, dim: int = 256, batch: int = 8):
    """A contraction ``tanh(z W + x)`` whose product is computed in ``dtype`` (float16 or
    bfloat16) on float32 states, so that its residual levels off at that precision's floor, and
    its zero initial state."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(dim, dim, generator=g) * 0.5 / 16
    x = torch.randn(batch, dim, generator=g)

    def f(z):
        return torch.tanh((z.to(dtype) @ w.to(dtype)).float() + x)

    return f, torch.zeros(batch, dim)


class CausalCell(nn.Module):
    """f(z, x)_t = tanh(W z_t + V mean(z_{<t}) + x_t) on (B, L, D) float64 states, W and V torch's
    init times ``scale``: positions coupled, each depending on the earlier ones only."""

    def __init__(self, dim: int = 4, scale: float = 0.4):
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False, dtype=torch.float64)
        self.v = nn.Linear(dim, dim, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.w.weight.mul_(scale)
            self.v.weight.mul_(scale)

    def forward(self, z, x):
        past = torch.cumsum(z, dim=1) - z
        counts = torch.arange(z.shape[1], dtype=z.dtype).clamp_min(1).view(1, -1, 1)
        return torch.tanh(self.w(z) + self.v(past / counts) + x)


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
