"""Flattening of structured equilibrium states.

A state is one tensor or a list/tuple of tensors that share the batch dimension (an MDEQ state is
four feature maps of different shapes). Solvers work on one ``(samples, dim)`` tensor; this module
converts between the two so that a user never flattens by hand. The samples are the batch
elements, or with ``sample_dims=2`` every (batch, position) pair of a sequence state.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import torch

State = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = ["State", "StateSpec", "state_dtype_for"]


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype a solver keeps its state in when f runs in ``dtype``: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class StateSpec:
    """Shapes, dtype and container type of a structured state, with pack/unpack to ``(B, D)``.

    Args:
        state: a tensor or a non-empty list/tuple of floating-point tensors of one dtype.
        name: the state's name in error messages.
        sample_dims: how many leading dimensions, shared by every tensor, index the solver's
            samples: 1 (the batch: ``B`` samples) or more (``(B, L, ...)``: ``B * L`` samples).
    """

    def __init__(self, state: State, name: str = "state", sample_dims: int = 1) -> None:
        if isinstance(state, torch.Tensor):
            tensors: Tuple[torch.Tensor, ...] = (state,)
            self.container = None
        elif isinstance(state, (list, tuple)) and len(state) > 0:
            tensors = tuple(state)
            self.container = type(state)
        else:
            raise TypeError(
                f"{name} must be a tensor or a non-empty list/tuple of tensors, got {type(state).__name__}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
            if t.dim() < sample_dims:
                raise ValueError(f"{name}[{i}] must have {sample_dims} sample dimension(s), got shape "
                                 f"{tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] must be a floating-point tensor, got {t.dtype}")
        lead = tuple(tensors[0].shape[:sample_dims])
        for i, t in enumerate(tensors):
            if tuple(t.shape[:sample_dims]) != lead:
                if sample_dims == 1:
                    raise ValueError(f"{name}[{i}] has batch size {t.shape[0]} but {name}[0] has {lead[0]}; "
                                     "every state tensor must share dimension 0")
                raise ValueError(f"{name}[{i}] has leading dimensions {tuple(t.shape[:sample_dims])} but {name}[0] "
                                 f"has {lead}; with sample_dims={sample_dims} every state tensor must share them")
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise TypeError(f"{name} tensors must share one dtype, got {sorted(map(str, dtypes))}")
        self.sample_shape = lead
        self.batch = math.prod(lead)
        self.shapes: List[torch.Size] = [t.shape[sample_dims:] for t in tensors]
        self.sizes: List[int] = [int(t.shape[sample_dims:].numel()) for t in tensors]
        self.dim = sum(self.sizes)
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device

    def describe(self) -> str:
        """The state's structure as text: ``(B, ...)`` or a list of such shapes (for error messages)."""
        shapes = [(*self.sample_shape, *s) for s in self.shapes]
        return str(shapes[0]) if self.container is None else str(shapes)

    def pack(self, state: State, dtype: torch.dtype, what: str = "state") -> torch.Tensor:
        """Flatten a state to the solvers' ``(B, D)`` layout.

        Args:
            state: a tensor or list/tuple of tensors with this spec's structure and shapes.
            dtype: the dtype of the flat copy.
            what: the state's name in the error raised when the structure differs.

        Returns:
            the ``(B, D)`` tensor (a view when no concatenation or cast is needed).
        """
        tensors = self._as_tuple(state, what)
        flat = [t.reshape(self.batch, n) for t, n in zip(tensors, self.sizes)]  # -1 is ambiguous for a batch of 0
        out = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
        return out.to(dtype)

    def unpack(self, flat: torch.Tensor, dtype: torch.dtype) -> State:
        """Inverse of :meth:`pack`.

        Args:
            flat: a ``(B, D)`` tensor.
            dtype: the dtype of the returned tensors.

        Returns:
            the state in the spec's structure, views of ``flat`` (cast to ``dtype``).
        """
        flat = flat.to(dtype)
        if self.container is None:
            return flat.view(*self.sample_shape, *self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return self.container(p.reshape(*self.sample_shape, *s) for p, s in zip(parts, self.shapes))

    def zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """A zero flat ``(B, D)`` state in ``dtype`` on the spec's device."""
        return torch.zeros(self.batch, self.dim, dtype=dtype, device=self.device)

    def _as_tuple(self, state: State, what: str) -> Tuple[torch.Tensor, ...]:
        if self.container is None:
            ok = isinstance(state, torch.Tensor)
            tensors = (state,) if ok else ()
        else:
            ok = isinstance(state, (list, tuple)) and len(state) == len(self.shapes)
            tensors = tuple(state) if ok else ()
        if ok:
            lead = len(self.sample_shape)
            ok = all(isinstance(t, torch.Tensor) and tuple(t.shape[:lead]) == self.sample_shape
                     and t.shape[lead:] == s for t, s in zip(tensors, self.shapes))
        if not ok:
            raise ValueError(f"{what} has structure {_describe(state)}, expected {self.describe()} "
                             "(the structure and shapes of the initial state)")
        return tensors


def _describe(state) -> str:
    if isinstance(state, torch.Tensor):
        return str(tuple(state.shape))
    if isinstance(state, (list, tuple)):
        return str([tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in state])
    return type(state).__name__
