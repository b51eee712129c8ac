"""Batched fixed-point solvers behind one signature and one result type."""
from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point
from .registry import (SolverOption, get_solver, list_solvers, register_solver, solver_options,
                       unregister_solver, validate_solver_options)
from .result import SolverResult

__all__ = [
    "SolverResult", "SolverOption", "register_solver", "unregister_solver", "get_solver", "list_solvers",
    "solver_options", "validate_solver_options", "anderson", "broyden", "fixed_point",
]
