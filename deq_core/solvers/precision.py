"""The precision a solve works in: the autocast boundary around solver arithmetic, and the
residual floor that a reduced-precision f can resolve.

Autocast covers everything inside its block, the solvers' matrix products and norms included
(in float16 an Anderson Gram matrix overflows at the second step). A solver therefore runs its
own arithmetic with autocast off, in the state dtype, and evaluates f under the caller's autocast,
captured on entry by :class:`AutocastBoundary`.

A map evaluated in float16 or bfloat16 returns values rounded at about the unit roundoff ``u``
of that dtype (``u = eps / 2``: 4.9e-4 for float16, 3.9e-3 for bfloat16), so the residual
``||f(z) - z||`` of its fixed point cannot be resolved much below ``u ||f(z)||``. On a transformer
layer and an MDEQ-style conv block (f under autocast on CPU) the relative residual levels off at
about ``0.1 u`` to ``0.15 u`` (it keeps falling by a few per cent per step there, which is
rounding, not progress); a map whose last operation rounds its output lands at about ``0.6 u``.
The solvers stop such a sample once its relative residual is within ``FLOOR_BAND`` ``u`` and
its residual has gained less than ``MIN_GAIN`` on its best over ``PATIENCE`` consecutive
steps: the outcome "stalled at the precision floor". Tolerances above the band work as usual;
tolerances below it end there. In float32 and float64 no sample stops early: steps and iterates
are exactly what they were before precision-aware stopping existed, and a sample that ends within
:func:`resolution` of the floor is reported stalled (the outcome rules of
:mod:`deq_core.solvers.tracking`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, TypeVar

import torch

__all__ = ["AutocastBoundary", "FLOOR_BAND", "MIN_GAIN", "PATIENCE", "REDUCED_PRECISION", "RESOLUTION_BAND",
           "floor_for", "lower_precision", "resolution", "unit_roundoff"]

REDUCED_PRECISION = (torch.float16, torch.bfloat16)
FLOOR_BAND = 2.0
MIN_GAIN = 0.1
PATIENCE = 2
# Relative residuals within this many unit roundoffs are the precision's floor in any dtype: a
# sample returned there is stalled, never diverged (the measured floors lie at 0.1 u to 0.6 u).
RESOLUTION_BAND = 8.0

T = TypeVar("T")


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of a floating-point ``dtype`` (the largest relative rounding error).

    Args:
        dtype: a floating-point dtype.

    Returns:
        ``torch.finfo(dtype).eps / 2``.
    """
    return torch.finfo(dtype).eps / 2


def resolution(dtype: torch.dtype) -> float:
    """The smallest relative residual a map computed in ``dtype`` is taken to resolve.

    Args:
        dtype: the floating-point dtype f's values are computed in.

    Returns:
        ``RESOLUTION_BAND * unit_roundoff(dtype)``.
    """
    return RESOLUTION_BAND * unit_roundoff(dtype)


def lower_precision(a: Optional[torch.dtype], b: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The less precise of two floating-point dtypes (``None`` stands for "unknown" and loses).

    Args:
        a, b: floating-point dtypes or ``None``.

    Returns:
        the dtype with the larger machine epsilon, or the other one when one is ``None``.
    """
    if a is None or b is None:
        return b if a is None else a
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def floor_for(precision: Optional[torch.dtype]) -> Optional[float]:
    """The relative residual below which a map computed in ``precision`` may stall.

    Args:
        precision: the dtype f's values are computed in, or ``None`` (full precision).

    Returns:
        ``FLOOR_BAND * unit_roundoff(precision)`` for float16 and bfloat16, else ``None``
        (no precision-aware stopping).
    """
    if precision not in REDUCED_PRECISION:
        return None
    return FLOOR_BAND * unit_roundoff(precision)


class AutocastBoundary:
    """The caller's autocast state on one device type, captured so that solver arithmetic can run
    with autocast off while f still runs under the caller's autocast.

    Args:
        device_type: the device type of the solver state (``"cpu"``, ``"cuda"``, ...).
    """

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)
        self.cache_enabled = torch.is_autocast_cache_enabled()

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        """The dtype autocast computes in here, or ``None`` when autocast is off."""
        return self.dtype if self.enabled else None

    def outside(self) -> ContextManager[None]:
        """A context with autocast off on this device type (a no-op when it was off already)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, enabled=False)

    def inside(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` evaluated under the captured autocast state (``fn`` itself when it was off).

        Args:
            fn: the function to evaluate under autocast (the map f).

        Returns:
            a callable with ``fn``'s signature.
        """
        if not self.enabled:
            return fn

        def under_autocast(*args, **kwargs):
            # Nested inside the caller's block, so its weight-cast cache survives between calls.
            with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache_enabled):
                return fn(*args, **kwargs)

        return under_autocast
