"""One solve described completely: which solver, its limits, stop test and options."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from .registry import get_solver
from .result import SolverResult

__all__ = ["SolveSpec"]


@dataclass(frozen=True)
class SolveSpec:
    """The settings of one batched solve; :meth:`run` is the one place a configured solve is called.

    :class:`~deq_core.DEQConfig` builds one per direction (``forward_solve``/``backward_solve``);
    the fields are the solver's keyword arguments and mean what the solvers document.
    """

    solver: str
    max_iter: int
    tol: float
    stop_mode: str
    check_every: Optional[int]
    divergence_factor: float
    options: Dict[str, Any] = field(default_factory=dict)

    def run(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
            precision: Optional[torch.dtype] = None, trace: bool = False,
            sequence_length: Optional[int] = None, inverse: bool = False) -> SolverResult:
        """Solve ``z = f(z)`` from the ``(B, D)`` state ``z0``.

        Args:
            f: the map on ``(B, D)`` float32/float64 states.
            z0: the initial state.
            precision: the dtype f's values are computed in when it is less precise than the
                state (float16/bfloat16), which sets the precision floor of the stop test.
            trace: record the residual of every iteration.
            sequence_length: the samples are positions of sequences of this length, which stop
                in order (a ``sample_dims=2`` state).
            inverse: also return the solver's inverse-Jacobian estimate (``SolverResult.inverse``;
                a solver that keeps none raises).

        Returns:
            the solver's :class:`SolverResult`.
        """
        return get_solver(self.solver)(
            f, z0, max_iter=self.max_iter, tol=self.tol, stop_mode=self.stop_mode,
            check_every=self.check_every, divergence_factor=self.divergence_factor, trace=trace,
            precision=precision, **({} if sequence_length is None else {"sequence_length": sequence_length}),
            **({"inverse": True} if inverse else {}), **self.options)
