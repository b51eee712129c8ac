"""deq_core: deep equilibrium layers with Jacobian regularization, framework-agnostic (torch only)."""
from .backward import (BackwardMode, ForwardPass, ImplicitBackward, PhantomBackward, ReversibleBackward, SolvingMode,
                       UnrolledBackward, get_backward, list_backward_modes, register_backward, unregister_backward)
from .cli import DEQFlag, add_deq_args, config_from_args, deq_flags, parse_solver_options
from .config import BACKWARD_INITS, PROBE_DISTRIBUTIONS, DEQConfig
from .correction import fixed_point_correction
from .dropout import VariationalDropout
from .errors import OptionError, OptionTypeError, OptionValueError, UsageError
from .flat_map import FlatMap, equilibrium_pass, pass_draws
from .jacobian import JRSchedule, jac_frobenius_estimate, spectral_radius
from .layer import DEQLayer, name_deq_layers
from .norm import apply_weight_norm, remove_weight_norm
from .solvers import (STOP_MODES, InverseEstimate, SolverOption, SolverResult, SolveSpec, anderson, broyden, fixed_point,
                      get_solver, list_solvers, register_solver, residuals, unregister_solver)
from .spectral_norm import apply_spectral_norm, remove_spectral_norm
from .state import StateSpec
from .stats import BACKWARD_SUMMARY, DEQStats, DEQStatsMeter

__version__ = "0.1.0"

__all__ = [
    "DEQConfig", "OptionError", "OptionValueError", "OptionTypeError", "UsageError", "BACKWARD_INITS", "STOP_MODES",
    "PROBE_DISTRIBUTIONS", "DEQFlag", "deq_flags", "add_deq_args", "config_from_args", "parse_solver_options",
    "DEQLayer", "DEQStats", "DEQStatsMeter", "BACKWARD_SUMMARY", "FlatMap", "equilibrium_pass", "pass_draws",
    "name_deq_layers",
    "StateSpec", "BackwardMode", "SolvingMode", "ForwardPass", "register_backward", "unregister_backward",
    "get_backward", "list_backward_modes", "ImplicitBackward", "PhantomBackward", "UnrolledBackward",
    "ReversibleBackward", "VariationalDropout", "apply_weight_norm", "remove_weight_norm", "apply_spectral_norm",
    "remove_spectral_norm",
    "JRSchedule", "jac_frobenius_estimate", "spectral_radius",
    "SolverResult", "InverseEstimate", "SolverOption", "SolveSpec", "residuals", "register_solver",
    "unregister_solver", "get_solver", "list_solvers", "anderson", "broyden", "fixed_point",
    "fixed_point_correction",
]
