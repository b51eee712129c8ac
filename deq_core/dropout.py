"""Variational dropout: one mask per equilibrium pass, shared by every application of f."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["VariationalDropout"]


class VariationalDropout(nn.Module):
    """Dropout whose mask is drawn once per equilibrium pass and reused by every call of f in it.

    A changing mask would change f between solver iterations and there would be no fixed point.
    ``shared_dims`` are the dimensions the mask is broadcast over: ``(2, 3)`` drops whole channels
    of a ``(B, C, H, W)`` map, ``(1,)`` drops the same features at every position of a ``(B, L, D)``
    sequence, ``(2,)`` drops whole tokens. The :class:`~deq_core.DEQLayer` opens and closes passes
    itself; outside a pass (f called on its own) each call draws a fresh mask.
    """

    def __init__(self, p: float = 0.0, shared_dims: Sequence[int] = ()) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must be a number in [0, 1), got {p!r}")
        dims = tuple(shared_dims)
        if any(not isinstance(d, int) or isinstance(d, bool) or d == 0 for d in dims):
            raise ValueError(f"shared_dims must be non-batch dimension indices (ints != 0), got {shared_dims!r}")
        self.p = float(p)
        self.shared_dims: Tuple[int, ...] = dims
        self._in_pass = False
        self._mask: Optional[torch.Tensor] = None

    @classmethod
    def channels2d(cls, p: float) -> "VariationalDropout":
        """Channel mask for ``(B, C, H, W)`` maps."""
        return cls(p, shared_dims=(2, 3))

    @classmethod
    def features1d(cls, p: float) -> "VariationalDropout":
        """Feature mask shared over positions for ``(B, L, D)`` sequences."""
        return cls(p, shared_dims=(1,))

    @classmethod
    def tokens(cls, p: float) -> "VariationalDropout":
        """Whole-token mask for ``(B, L, D)`` sequences."""
        return cls(p, shared_dims=(2,))

    def extra_repr(self) -> str:
        """The drop probability and shared dimensions, for ``repr``."""
        return f"p={self.p}, shared_dims={self.shared_dims}"

    def _deq_begin_pass(self, mask: Optional[torch.Tensor] = None) -> None:
        self._in_pass, self._mask = True, mask

    def _deq_pass_state(self) -> Optional[torch.Tensor]:
        return self._mask

    def _deq_end_pass(self) -> None:
        self._in_pass, self._mask = False, None

    def _new_mask(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        for d in self.shared_dims:
            if not -x.dim() <= d < x.dim():
                raise ValueError(f"shared_dims {self.shared_dims} do not fit an input of shape {tuple(x.shape)}")
            shape[d] = 1
        keep = 1.0 - self.p
        return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this pass's mask (drawn on the first call inside an equilibrium pass, a fresh
        one per call outside it); the identity in eval mode or at ``p = 0``.

        Args:
            x: the input; inside a pass every call must have the first call's batch size and rank.

        Returns:
            ``x`` times the mask (scaled by ``1 / (1 - p)``).
        """
        if not self.training or self.p == 0.0:
            return x
        if not self._in_pass:
            return x * self._new_mask(x)
        if self._mask is None:
            self._mask = self._new_mask(x)
        elif self._mask.shape[0] != x.shape[0] or self._mask.dim() != x.dim():
            raise ValueError(f"input of shape {tuple(x.shape)} does not match this pass's dropout mask "
                             f"{tuple(self._mask.shape)}; use one VariationalDropout per state shape")
        return x * self._mask
