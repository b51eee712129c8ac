"""Jacobian regularization: the Hutchinson estimate of ||J_f||_F^2 / d, its schedule, and the
power-method spectral radius used as a stability diagnostic."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .solvers.precision import AutocastBoundary
from .state import state_dtype_for

__all__ = ["jac_frobenius_estimate", "spectral_radius", "JRSchedule"]


def _probe(like: torch.Tensor, distribution: str) -> torch.Tensor:
    if distribution == "normal":
        return torch.randn_like(like)
    if distribution == "rademacher":
        return torch.randint_like(like, 0, 2).mul_(2).sub_(1)
    raise ValueError(f"probe distribution must be 'normal' or 'rademacher', got {distribution!r}")


def jac_frobenius_estimate(f_out: torch.Tensor, z_in: torch.Tensor, n_probes: int = 1,
                           distribution: str = "normal", create_graph: bool = True) -> torch.Tensor:
    """Per-sample Hutchinson estimate of ``||J||_F^2 / d`` with ``J = d f_out / d z_in``.

    Args:
        f_out: ``(B, d)`` values computed from ``z_in``.
        z_in: the ``(B, d)`` input that ``f_out`` depends on.
        n_probes: probes averaged; each costs one vector-Jacobian product
            (``E ||eps^T J||^2 = ||J||_F^2`` for probes with identity covariance).
        distribution: ``"normal"`` or ``"rademacher"`` probes.
        create_graph: keep the estimate differentiable (for the JR loss).

    Returns:
        a ``(B,)`` tensor. The squares and sums run outside autocast in the state dtype of
        ``z_in`` (float32, float64 for float64), whatever precision f ran in.
    """
    if f_out.dim() != 2 or f_out.shape != z_in.shape:
        raise ValueError(f"f_out and z_in must both be (batch, dim), got {tuple(f_out.shape)} "
                         f"and {tuple(z_in.shape)}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    dtype = state_dtype_for(z_in.dtype)
    with AutocastBoundary(f_out.device.type).outside():
        total = f_out.new_zeros(f_out.shape[0], dtype=dtype)
        for i in range(n_probes):
            eps = _probe(f_out, distribution)
            (vjp,) = torch.autograd.grad(f_out, z_in, eps, retain_graph=True, create_graph=create_graph)
            total = total + vjp.to(dtype).pow(2).sum(dim=1)
        return total / (n_probes * f_out.shape[1])


def spectral_radius(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, n_iter: int = 20,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample power-method estimate of the spectral radius of ``J_f(z)`` for a flat map ``f``
    on ``(B, d)`` states (``rho < 1``: a locally stable fixed point).

    Iterates ``v <- v J / ||v J||`` with vector-Jacobian products (``J^T`` has the spectrum of
    ``J``); the growth factor ``||v J||`` of the last iteration is returned. For a dominant complex
    pair the estimate oscillates around the modulus.

    Args:
        f: the flat map; it runs under the caller's autocast, the iteration outside it.
        z: ``(B, d)`` points at which the Jacobian is taken.
        n_iter: power iterations.
        generator: random generator of the start vector.

    Returns:
        a detached ``(B,)`` tensor in ``z``'s dtype.
    """
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    boundary = AutocastBoundary(z.device.type)
    f = boundary.inside(f)
    with torch.enable_grad(), boundary.outside():
        z_in = z.detach().requires_grad_()
        f_out = f(z_in)
        v = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
        rho = v.new_zeros(z.shape[0])
        for _ in range(n_iter):
            (w,) = torch.autograd.grad(f_out, z_in, v, retain_graph=True)
            rho = torch.linalg.vector_norm(w, dim=1)
            v = w / rho.clamp_min(torch.finfo(w.dtype).tiny)[:, None]
    return rho.detach()


@dataclass(frozen=True)
class JRSchedule:
    """The JR weight at a training step: ``pretrain_weight`` during the first ``pretrain_steps``,
    then ``weight`` grown by ``increment`` every ``increment_every`` steps, and 0 from
    ``stop_step`` or ``stop_epoch`` on."""

    weight: float = 0.0
    increment: float = 0.0
    increment_every: int = 0
    pretrain_steps: int = 0
    pretrain_weight: float = 0.0
    stop_step: Optional[int] = None
    stop_epoch: Optional[int] = None

    @classmethod
    def from_config(cls, config: Any) -> "JRSchedule":
        """The schedule of a :class:`~deq_core.DEQConfig` (its ``jac_*`` and pretraining fields)."""
        return cls(weight=config.jac_weight, increment=config.jac_weight_increment,
                   increment_every=config.jac_increment_every, pretrain_steps=config.pretrain_steps,
                   pretrain_weight=config.pretrain_jac_weight, stop_step=config.jac_stop_step,
                   stop_epoch=config.jac_stop_epoch)

    @property
    def always_zero(self) -> bool:
        """Whether the weight is 0 at every step (JR never adds a term)."""
        grows = self.increment != 0 and self.increment_every > 0
        return self.weight == 0 and self.pretrain_weight == 0 and not grows

    def weight_at(self, step: int, epoch: Optional[int] = None) -> float:
        """The JR weight at a training step.

        Args:
            step: the optimizer step count.
            epoch: the epoch, when known (``stop_epoch`` applies only then).

        Returns:
            0 after ``stop_step``/``stop_epoch``; the pretraining weight during pretraining; else
            ``weight`` plus one ``increment`` per ``increment_every`` steps after pretraining.
        """
        if self.stop_step is not None and step >= self.stop_step:
            return 0.0
        if self.stop_epoch is not None and epoch is not None and epoch >= self.stop_epoch:
            return 0.0
        if step < self.pretrain_steps:
            return self.pretrain_weight
        if self.increment_every > 0:
            return self.weight + self.increment * ((step - self.pretrain_steps) // self.increment_every)
        return self.weight
