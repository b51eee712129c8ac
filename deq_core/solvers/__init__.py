"""Batched fixed-point solvers behind one signature and one result type."""
from .tracking import DIVERGENCE_FACTOR, STOP_MODES, residuals
from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point
from .gmres import gmres
from .registry import (SolverOption, get_solver, list_solvers, register_solver, returns_inverse,
                       solver_options, solves_affine_only, unregister_solver, validate_solver_options)
from .result import InverseEstimate, SolverResult
from .spec import SolveSpec

__all__ = [
    "SolverResult", "InverseEstimate", "SolverOption", "SolveSpec", "register_solver", "unregister_solver",
    "get_solver", "list_solvers", "solver_options", "validate_solver_options", "returns_inverse",
    "solves_affine_only", "anderson", "broyden", "fixed_point", "gmres", "residuals", "STOP_MODES", "DIVERGENCE_FACTOR",
]
