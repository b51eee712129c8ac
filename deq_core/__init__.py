"""deq_core: deep equilibrium layers with Jacobian regularization, framework-agnostic (torch only)."""
from .config import BACKWARD_INITS, BACKWARD_MODES, PROBE_DISTRIBUTIONS, DEQConfig, add_deq_args, parse_solver_options
from .correction import fixed_point_correction
from .dropout import VariationalDropout
from .jacobian import JRSchedule, jac_frobenius_estimate, spectral_radius
from .layer import DEQLayer, equilibrium_pass, name_deq_layers
from .norm import apply_weight_norm, remove_weight_norm
from .solvers import (STOP_MODES, InverseEstimate, SolverOption, SolverResult, SolveSpec, anderson, broyden, fixed_point,
                      get_solver, list_solvers, register_solver, residuals, unregister_solver)
from .spectral_norm import apply_spectral_norm, remove_spectral_norm
from .state import StateSpec
from .stats import BACKWARD_SUMMARY, DEQStats, DEQStatsMeter

__version__ = "0.1.0"

__all__ = [
    "DEQConfig", "add_deq_args", "parse_solver_options", "BACKWARD_MODES", "BACKWARD_INITS", "STOP_MODES", "PROBE_DISTRIBUTIONS",
    "DEQLayer", "DEQStats", "DEQStatsMeter", "BACKWARD_SUMMARY", "equilibrium_pass", "name_deq_layers", "StateSpec",
    "VariationalDropout", "apply_weight_norm", "remove_weight_norm",
    "apply_spectral_norm", "remove_spectral_norm",
    "JRSchedule", "jac_frobenius_estimate", "spectral_radius",
    "SolverResult", "InverseEstimate", "SolverOption", "SolveSpec", "residuals", "register_solver", "unregister_solver", "get_solver", "list_solvers",
    "anderson", "broyden", "fixed_point", "fixed_point_correction",
]
