"""f as the solvers see it: a map on flat ``(B, D)`` states, inside one pass of f's stabilizers."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .solvers.precision import AutocastBoundary, lower_precision
from .state import State, StateSpec, state_dtype_for

__all__ = ["FlatMap", "equilibrium_pass", "pass_draws"]


@contextlib.contextmanager
def equilibrium_pass(f: nn.Module, replay: Optional[Mapping[nn.Module, Any]] = None) -> Iterator[None]:
    """One pass of f's stabilizers: variational-dropout masks drawn once, parametrized weights
    (DEQ weight norm) computed once, both shared by every call of f inside the block.

    Args:
        f: the layer's map.
        replay: the stabilizers' draws of an earlier pass (:func:`pass_draws`), to run f again
            as it ran then (a backward pass that re-evaluates f); default: fresh draws.

    Returns:
        a context manager.
    """
    members = [m for m in f.modules() if hasattr(m, "_deq_begin_pass")]
    for m in members:
        m._deq_begin_pass(None if replay is None else replay.get(m))
    try:
        with parametrize.cached():
            # Compute the weights now, under the caller's grad mode: if the first access happened
            # inside the no-grad solver, the cached weights would carry no graph to g and v.
            for m in f.modules():
                if parametrize.is_parametrized(m):
                    for name in m.parametrizations:
                        getattr(m, name)
            yield
    finally:
        for m in members:
            m._deq_end_pass()


def pass_draws(f: nn.Module) -> Dict[nn.Module, Any]:
    """What f's stabilizers drew in the current pass (variational-dropout masks), by module, for
    :func:`equilibrium_pass`'s ``replay``."""
    return {m: m._deq_pass_state() for m in f.modules() if hasattr(m, "_deq_pass_state")}


class FlatMap:
    """``f(z, *inputs, **kwargs)`` as a map on flat ``(B, D)`` solver states.

    The state is unpacked to f's structure and dtype, f's output checked (its dtype; that f left
    its input unchanged) and packed back in the state dtype. f runs under the caller's autocast
    state captured in ``boundary`` (a layer's own arithmetic runs outside it).

    Args:
        f: the layer's map.
        spec: the state's structure.
        inputs, kwargs: f's inputs after the state.
        boundary: the caller's autocast state.
        call: how f is evaluated (f itself by default, or a compiled version of it).

    Attributes:
        precision: the dtype f's values are computed in (the autocast dtype when it is lower).
        state_dtype: the solvers' dtype (float32, or float64 for float64 states).
        sequence_length: positions per sequence when the samples are (batch, position) pairs.
        groups: the batch size (one sample per batch element, whatever ``sample_dims``).
    """

    def __init__(self, f: nn.Module, spec: StateSpec, inputs: Sequence[Any], kwargs: Mapping[str, Any],
                 boundary: AutocastBoundary, call: Optional[Callable[..., State]] = None) -> None:
        self.f, self.spec, self.inputs, self.kwargs, self.boundary = f, spec, inputs, kwargs, boundary
        self.call = boundary.inside(f if call is None else call)
        self.f_dtype = spec.dtype
        self.state_dtype = state_dtype_for(spec.dtype)
        self.precision = lower_precision(boundary.compute_dtype, spec.dtype)
        # (batch, position) samples: positions of one sequence are consecutive rows.
        self.sequence_length = spec.sample_shape[1] if len(spec.sample_shape) == 2 else None
        self.groups = spec.sample_shape[0]

    def using(self, call: Callable[..., State]) -> "FlatMap":
        """The same map with f evaluated through ``call``."""
        return FlatMap(self.f, self.spec, self.inputs, self.kwargs, self.boundary, call)

    def per_batch_element(self, z: torch.Tensor) -> Tuple["FlatMap", torch.Tensor]:
        """The same map with one sample per batch element (for a ``sample_dims=2`` state), and
        the flat state ``z`` in that layout."""
        if len(self.spec.sample_shape) == 1:
            return self, z
        state = self.spec.unpack(z, self.state_dtype)
        spec = StateSpec(state, "z")
        return FlatMap(self.f, spec, self.inputs, self.kwargs, self.boundary), spec.pack(state, self.state_dtype)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """f at the flat state ``z``, flat, in the state dtype."""
        if z.is_leaf and z.requires_grad:
            # Autograd refuses an in-place op on a view of such a leaf before the check below
            # could name f; f gets a copy, so that the check reports it (a state copy per call
            # of f at a leaf: once per differentiable pass).
            z = z.clone()
        state = self.spec.unpack(z, self.f_dtype)
        versions = _versions(state)
        out = self.call(state, *self.inputs, **self.kwargs)
        if _versions(state) != versions:  # metadata only: no host read, so on every call
            raise RuntimeError(
                f"f ({type(self.f).__name__}) modified its state input z in place (for example nn.ReLU(inplace=True), "
                "z += ... or z.mul_(...) applied to z): the solver's iterate would change under it, which silently "
                "corrupts the solve. Compute a new tensor from z instead (inplace=False, z = z + ...)")
        self._check_dtype(out)
        return self.spec.pack(out, self.state_dtype, what="f's output")

    def _check_dtype(self, out: State) -> None:
        allowed = {self.f_dtype}
        if self.boundary.enabled:
            allowed.add(self.boundary.dtype)
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype not in allowed:
                raise TypeError(f"f returned dtype {t.dtype} for a state of dtype {self.f_dtype}; "
                                f"f must return the state's dtype (or the autocast dtype), one of "
                                f"{sorted(map(str, allowed))}")


def _versions(state: State) -> Tuple[int, ...]:
    """The version counters of a state's tensors (they change with every in-place write)."""
    return tuple(t._version for t in (state if isinstance(state, (list, tuple)) else (state,)))
