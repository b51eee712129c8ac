"""The unrolled mode: a weight-tied stack of f differentiated by backprop (also every pretraining pass)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch

from ..solvers import SolverResult, residuals
from .base import BackwardMode, ForwardPass
from .registry import register_backward

if TYPE_CHECKING:
    from ..stats import DEQStats

__all__ = ["UnrolledBackward"]


@register_backward("unrolled")
class UnrolledBackward(BackwardMode):
    """``unrolled_layers`` applications of f from z0, differentiated by ordinary backprop, with no
    solver; the pretraining passes (the first ``pretrain_steps`` training steps) run this way
    whatever mode is configured. The result describes the last application: the iterate is the
    input of the last call of f, the residual the change it made, and no sample is converged."""

    solves = False

    def solve(self, fp: ForwardPass) -> Tuple[SolverResult, int]:
        n = fp.config.unrolled_layers
        z = fp.z0.requires_grad_(fp.jac_on)
        prev = z
        for _ in range(n):
            prev, z = z, fp.fn(z)
        self._last = (prev, z)
        abs_res, rel_res = residuals(prev.detach(), z.detach())
        diverged = ~torch.isfinite(abs_res)
        result = SolverResult(z=prev.detach(), fz=z.detach(), steps=torch.full_like(abs_res, n, dtype=torch.int32),
                              abs_res=abs_res, rel_res=rel_res, converged=torch.zeros_like(diverged),
                              diverged=diverged)
        return result, n

    def attach(self, fp: ForwardPass, result: SolverResult,
               stats: "DEQStats") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        prev, z = self._last
        return z, fp.jac(z, prev)
