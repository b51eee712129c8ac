"""Name -> solver registry, with each solver's options and their validation.

A solver is a callable ``solver(f, z0, *, max_iter, tol, stop_mode, check_every, divergence_factor,
trace, precision, **options) -> SolverResult`` whose arguments mean, for every solver:

- ``f``: the map on ``(B, D)`` states; ``z0``: the initial state, float32 or float64, ``(B, D)``;
- ``max_iter``: the most evaluations of f; ``tol``: the tolerance on the residual of
  ``stop_mode`` (``"abs"``: ``||f(z) - z||``, ``"rel"``: that over ``||f(z)||``), per sample;
- ``check_every``: iterations between host reads of the stop test (``None``: 1 on CPU, 4 on
  accelerators; 0: never, run to ``max_iter``);
- ``divergence_factor``: the growth of the residual (or of the state) that counts as divergence;
- ``trace``: record every iteration's residual in ``SolverResult.trace``;
- ``precision``: the dtype f's values are computed in when it is less precise than the state
  (see :mod:`deq_core.solvers.precision`); a solver without that parameter is registered as well
  and simply not told;
- ``sequence_length``: consecutive runs of this many samples are the positions of one sequence,
  which stop in order (see :mod:`deq_core.solvers._tracking`); a solver without that parameter
  is registered as well and refuses a sequence.
- ``inverse`` (only passed when true): also return the solver's estimate of the inverse
  Jacobian of ``f(z) - z`` at the returned iterates (``SolverResult.inverse``); only a solver
  with that parameter keeps one (``broyden``), any other refuses the request.

How a solve ends is stated in :mod:`deq_core.solvers._tracking`. Registration wraps the solver so
that its state must be float32 or float64 and its own arithmetic runs outside the caller's
autocast, f inside it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .precision import AutocastBoundary, lower_precision
from .result import SolverResult

__all__ = ["SolverOption", "register_solver", "unregister_solver", "get_solver", "list_solvers",
           "validate_solver_options", "returns_inverse"]

SolverFn = Callable[..., SolverResult]


@dataclass(frozen=True)
class SolverOption:
    """One solver-specific option: its type (``int``/``float``/``bool``), range check and help.

    Its default is the default of the solver's keyword parameter of the same name, read at
    registration, so that a direct call and a config name the same value. ``default`` holds it
    on the options :func:`solver_options` returns.
    """

    kind: type
    check: Optional[Callable[[Any], bool]] = None
    allowed: str = ""
    help: str = ""
    optional: bool = False
    default: Any = None


_REGISTRY: Dict[str, Tuple[SolverFn, Dict[str, SolverOption]]] = {}


def register_solver(name: str, options: Optional[Mapping[str, SolverOption]] = None,
                    *, overwrite: bool = False) -> Callable[[SolverFn], SolverFn]:
    """Decorator registering a solver under ``name`` with its accepted ``options``.

    Args:
        name: the name configs and :func:`get_solver` use.
        options: the solver-specific keyword options by name, each with its type and check; every
            one must be a keyword parameter of the solver with a default (the option's default).
        overwrite: replace a solver registered under ``name`` already.

    Returns:
        a decorator that returns the registered solver: ``fn`` behind the precision guard of
        :func:`_state_precision`, which is what :func:`get_solver` hands out.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"solver name must be a non-empty string, got {name!r}")

    def deco(fn: SolverFn) -> SolverFn:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"a solver named {name!r} is already registered; pass overwrite=True")
        guarded = _state_precision(fn)
        _REGISTRY[name] = (guarded, _with_defaults(name, fn, options or {}))
        return guarded

    return deco


def _with_defaults(name: str, fn: SolverFn, options: Mapping[str, SolverOption]) -> Dict[str, SolverOption]:
    params = inspect.signature(fn).parameters
    out: Dict[str, SolverOption] = {}
    for key, opt in options.items():
        param = params.get(key)
        if param is None or param.default is inspect.Parameter.empty:
            raise ValueError(f"solver {name!r}: option {key!r} must be a keyword parameter of the solver "
                             "with a default (the option's default)")
        out[key] = dataclasses.replace(opt, default=param.default)
    return out


def _state_precision(fn: SolverFn) -> SolverFn:
    """``fn`` with a float32/float64 state check and its arithmetic outside the caller's autocast;
    f keeps running under it, and ``precision`` defaults to autocast's dtype when it is on."""
    if getattr(fn, "_deq_state_precision", False):
        return fn
    params = inspect.signature(fn).parameters.values()
    takes_precision = any(p.name == "precision" or p.kind is p.VAR_KEYWORD for p in params)
    takes_sequence = any(p.name == "sequence_length" or p.kind is p.VAR_KEYWORD for p in params)
    takes_inverse = any(p.name == "inverse" for p in params)

    @functools.wraps(fn)
    def solve(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
              precision: Optional[torch.dtype] = None, **kwargs: Any) -> SolverResult:
        if not isinstance(z0, torch.Tensor) or z0.dtype not in (torch.float32, torch.float64):
            got = z0.dtype if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise TypeError(f"solver state z0 must be a float32 or float64 tensor, got {got}; keep the state "
                            "in float32 and evaluate f in half precision inside the map (pass precision= "
                            "its dtype), as DEQLayer does")
        if not takes_sequence:
            if kwargs.pop("sequence_length", None) is not None:
                raise TypeError(f"solver {fn.__name__!r} does not accept sequence_length, which a state with "
                                "sample_dims=2 needs (its positions stop in order); add the parameter and "
                                "pass it to the Tracker, or use sample_dims=1")
        if not takes_inverse and kwargs.pop("inverse", False):
            raise TypeError(f"solver {fn.__name__!r} keeps no inverse-Jacobian estimate to return (inverse=True); "
                            "of the built-in solvers only 'broyden' does")
        boundary = AutocastBoundary(z0.device.type)
        if takes_precision:
            kwargs["precision"] = lower_precision(precision, boundary.compute_dtype)
        with boundary.outside():
            return fn(boundary.inside(f), z0, **kwargs)

    solve._deq_state_precision = True
    return solve


def returns_inverse(name: str) -> bool:
    """Whether solver ``name`` can return its inverse-Jacobian estimate (has an ``inverse``
    parameter; of the built-in solvers, ``broyden``)."""
    fn = get_solver(name)
    return "inverse" in inspect.signature(getattr(fn, "__wrapped__", fn)).parameters


def unregister_solver(name: str) -> None:
    """Remove the solver registered under ``name`` (an unknown name raises, listing the registered ones).

    Args:
        name: a registered solver name; the built-in solvers can be removed too.
    """
    get_solver(name)
    del _REGISTRY[name]


def list_solvers() -> Tuple[str, ...]:
    """The registered solver names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_solver(name: str) -> SolverFn:
    """The solver registered under ``name``; an unknown name raises listing the registered ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; registered solvers: {list(list_solvers())}")
    return _REGISTRY[name][0]


def solver_options(name: str) -> Dict[str, SolverOption]:
    """A copy of the options solver ``name`` accepts, by option name."""
    get_solver(name)
    return dict(_REGISTRY[name][1])


def validate_solver_options(name: str, options: Mapping[str, Any], field: str = "options") -> Dict[str, Any]:
    """Check a solver's options and fill in the defaults.

    Args:
        name: a registered solver.
        options: option names and values; unknown keys, wrong types and out-of-range values raise,
            naming ``field`` and what is accepted.
        field: the options' name in error messages (a config field or flag).

    Returns:
        a new dict with every option of the solver.
    """
    spec = solver_options(name)
    if not isinstance(options, Mapping):
        raise TypeError(f"{field} must be a mapping of option names to values, got {type(options).__name__}")
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise ValueError(f"{field}: unknown option(s) {unknown} for solver {name!r}; "
                         f"accepted: {sorted(spec) or 'none'}")
    out: Dict[str, Any] = {}
    for key, opt in spec.items():
        out[key] = _check_option(name, field, key, opt, options.get(key, opt.default))
    return out


def _check_option(solver: str, field: str, key: str, opt: SolverOption, value: Any) -> Any:
    if value is None and opt.optional:
        return None
    ok = isinstance(value, opt.kind) and (opt.kind is bool or not isinstance(value, bool))
    if opt.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        kind = opt.kind.__name__ + (" or None" if opt.optional else "")
        raise TypeError(f"{field}[{key!r}] for solver {solver!r} must be {kind}, got {value!r}")
    if opt.check is not None and not opt.check(value):
        raise ValueError(f"{field}[{key!r}] for solver {solver!r} must be {opt.allowed}, got {value!r}")
    return value
