"""The phantom gradient: k damped steps from the fixed point, differentiated by autograd."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch

from ..solvers import SolverResult
from .base import ForwardPass, SolvingMode
from .chain import damped_chain
from .registry import register_backward

if TYPE_CHECKING:
    from ..stats import DEQStats

__all__ = ["PhantomBackward"]


@register_backward("phantom")
class PhantomBackward(SolvingMode):
    """``phantom_steps`` damped steps ``z <- z + phantom_damping (f(z) - z)`` from z*,
    differentiated by ordinary backprop (k = 1 with damping 1 is the Jacobian-free gradient).
    The value returned is f(z*), the first step's f, as in every other mode; the gradient is the
    one of the k-step chain (``f(z*) + (z_k - stopgrad(z_k))``, exact in value)."""

    reads = ("phantom_steps", "phantom_damping")
    corrects = True

    def gradient(self, fp: ForwardPass, result: SolverResult,
                 stats: "DEQStats") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        cfg = fp.config
        z, f_star, jac = damped_chain(fp.fn, result.z, cfg.phantom_steps, cfg.phantom_damping,
                                      fp.jac if fp.jac_on else None)
        return f_star.detach() + (z - z.detach()), jac
