"""Damped fixed-point steps under autograd: the phantom gradient, and fixed-point correction's
gradient of an intermediate state."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = ["damped_chain"]


def damped_chain(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, steps: int, damping: float,
                 jac: Optional[Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``steps`` damped steps ``z <- z + damping (f(z) - z)`` from (a detached) ``z``, differentiated
    by autograd.

    Args:
        fn: the flat map.
        z: the flat start, detached here.
        steps: the number of steps (>= 1).
        damping: the weight of ``f(z)`` in each step.
        jac: the JR estimate ``jac(f(z), z)`` to take at the first step, when given.

    Returns:
        ``(z_end, f(z_start), jac_estimate)``: the last state, f at the first one (with its graph),
        and the estimate there (``None`` without ``jac``).
    """
    z = z.detach().requires_grad_(jac is not None)
    estimate = f_first = None
    for i in range(steps):
        f_z = fn(z)
        if i == 0:
            f_first = f_z
            estimate = jac(f_z, z) if jac is not None else None
        z = torch.lerp(z, f_z, damping)
    return z, f_first, estimate
