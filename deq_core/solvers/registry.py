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
  which stop in order (see :mod:`deq_core.solvers.tracking`); a solver without that parameter
  is registered as well and refuses a sequence.
- ``inverse`` (only passed when true): also return the solver's estimate of the inverse
  Jacobian of ``f(z) - z`` at the returned iterates (``SolverResult.inverse``); only a solver
  with that parameter keeps one (``broyden``), any other refuses the request.

How a solve ends is stated in :mod:`deq_core.solvers.tracking`. Registration wraps the solver so
that every call checks its state (float32 or float64, ``(B, D)``), the settings above and the
solver's options, and every evaluation of f its output (shape, dtype, no graph) and its input
(left unchanged); the solver's own arithmetic runs outside the caller's autocast, f inside it. A
batch of no samples returns an empty result without calling the solver.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Set, Tuple

import torch

from .tracking import STOP_MODES
from .precision import AutocastBoundary, lower_precision
from .result import SolverResult

__all__ = ["SolverOption", "register_solver", "unregister_solver", "get_solver", "list_solvers",
           "validate_solver_options", "returns_inverse", "solves_affine_only"]

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
_AFFINE_ONLY: Set[str] = set()  # solvers registered with affine_only=True


def register_solver(name: str, options: Optional[Mapping[str, SolverOption]] = None,
                    *, overwrite: bool = False, affine_only: bool = False) -> Callable[[SolverFn], SolverFn]:
    """Decorator registering a solver under ``name`` with its accepted ``options``.

    Args:
        name: the name configs and :func:`get_solver` use.
        options: the solver-specific keyword options by name, each with its type and check; every
            one must be a keyword parameter of the solver with a default (the option's default).
        overwrite: replace a solver registered under ``name`` already.
        affine_only: the solver is only correct for an affine f (a linear system, such as the
            implicit backward pass's); :func:`solves_affine_only` reports it.

    Returns:
        a decorator that returns the registered solver, ``fn`` behind the checks and the
        precision guard every call passes (what :func:`get_solver` hands out).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"solver name must be a non-empty string, got {name!r}")

    def deco(fn: SolverFn) -> SolverFn:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"a solver named {name!r} is already registered; pass overwrite=True")
        guarded = _state_precision(fn, name)
        _REGISTRY[name] = (guarded, _with_defaults(name, fn, options or {}))
        if affine_only:
            _AFFINE_ONLY.add(name)
        else:
            _AFFINE_ONLY.discard(name)
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


def _state_precision(fn: SolverFn, name: Optional[str] = None) -> SolverFn:
    """``fn`` behind the checks every call passes: the state (float32/float64, ``(B, D)``), the
    common settings, the options of solver ``name`` (when registered), and the map's output on
    every evaluation; its arithmetic runs outside the caller's autocast while f keeps running
    under it, and ``precision`` defaults to autocast's dtype when it is on. An empty batch returns
    an empty result without calling either."""
    if getattr(fn, "_deq_state_precision", False):
        return fn
    params = inspect.signature(fn).parameters.values()
    takes_precision = any(p.name == "precision" or p.kind is p.VAR_KEYWORD for p in params)
    takes_sequence = any(p.name == "sequence_length" or p.kind is p.VAR_KEYWORD for p in params)
    takes_inverse = any(p.name == "inverse" for p in params)
    label = repr(name or fn.__name__)

    @functools.wraps(fn)
    def solve(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *,
              precision: Optional[torch.dtype] = None, **kwargs: Any) -> SolverResult:
        if not isinstance(z0, torch.Tensor) or z0.dtype not in (torch.float32, torch.float64):
            got = z0.dtype if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise TypeError(f"solver state z0 must be a float32 or float64 tensor, got {got}; keep the state "
                            "in float32 and evaluate f in half precision inside the map (pass precision= "
                            "its dtype), as DEQLayer does")
        if z0.dim() != 2:
            raise ValueError(f"solver state z0 must have shape (batch, dim), got {tuple(z0.shape)}")
        _check_settings(label, kwargs, z0.shape[0])
        if name in _REGISTRY:
            spec = _REGISTRY[name][1]
            given = {key: kwargs[key] for key in spec if key in kwargs}
            checked = validate_solver_options(name, given)
            kwargs.update({key: checked[key] for key in given})
        if not takes_sequence:
            if kwargs.pop("sequence_length", None) is not None:
                raise TypeError(f"solver {label} does not accept sequence_length, which a state with "
                                "sample_dims=2 needs (its positions stop in order); add the parameter and "
                                "pass it to the Tracker, or use sample_dims=1")
        if not takes_inverse and kwargs.pop("inverse", False):
            raise TypeError(f"solver {label} keeps no inverse-Jacobian estimate to return (inverse=True); "
                            "of the built-in solvers only 'broyden' does")
        if z0.shape[0] == 0:
            return _empty_result(z0, bool(kwargs.get("trace")))
        boundary = AutocastBoundary(z0.device.type)
        if takes_precision:
            kwargs["precision"] = lower_precision(precision, boundary.compute_dtype)
        with boundary.outside():
            return fn(_checked_map(boundary.inside(f), z0), z0, **kwargs)

    solve._deq_state_precision = True
    return solve


def _check_settings(solver: str, kwargs: Mapping[str, Any], batch: int) -> None:
    """The settings every solver shares, checked where they were given."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def refuse(key: str, allowed: str) -> None:
        raise ValueError(f"solver {solver}: {key} must be {allowed}, got {kwargs[key]!r}")

    if "max_iter" in kwargs and not (isinstance(kwargs["max_iter"], int) and not isinstance(kwargs["max_iter"], bool)
                                     and kwargs["max_iter"] >= 1):
        refuse("max_iter", "an integer >= 1")
    if "tol" in kwargs and not (number(kwargs["tol"]) and kwargs["tol"] >= 0):
        refuse("tol", "a finite number >= 0")
    if "stop_mode" in kwargs and kwargs["stop_mode"] not in STOP_MODES:
        refuse("stop_mode", f"one of {STOP_MODES}")
    every = kwargs.get("check_every")
    if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
        refuse("check_every", "None or an integer >= 0 (0: never read back, run to max_iter)")
    if "divergence_factor" in kwargs and not (number(kwargs["divergence_factor"]) and kwargs["divergence_factor"] > 1):
        refuse("divergence_factor", "a finite number > 1")
    length = kwargs.get("sequence_length")
    if length is not None and not (isinstance(length, int) and length >= 1 and batch % length == 0):
        refuse("sequence_length", f"an integer >= 1 that divides the {batch} samples of z0")


def _checked_map(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f`` with each output checked against the state (shape, dtype, no graph) and its input
    checked to be left as it was; metadata only, so no host read."""
    shape, dtype = z0.shape, z0.dtype

    def checked(z: torch.Tensor) -> torch.Tensor:
        version = z._version
        out = f(z)
        if z._version != version:
            raise RuntimeError("the solver's map modified its input in place (for example with nn.ReLU(inplace=True), "
                               "x += ... or x.mul_(...) applied to the state): the iterate changed under the solver, "
                               "which silently corrupts the solve. Compute a new tensor instead (inplace=False, "
                               "x = x + ...)")
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the solver's map must return a tensor shaped like the state {tuple(shape)}, "
                            f"got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"the solver's map returned shape {tuple(out.shape)} for a state of shape {tuple(shape)}: "
                             "it must return one value per state entry (an output is never broadcast over the batch)")
        if not out.is_floating_point() or torch.finfo(out.dtype).eps < torch.finfo(dtype).eps:
            raise TypeError(f"the solver's map returned dtype {out.dtype} for a {dtype} state: it must return the "
                            "state's dtype or a less precise floating-point one (float16/bfloat16 under autocast)")
        if out.requires_grad:
            raise ValueError("the solver's map returned a tensor that requires grad: the solvers do not differentiate "
                             "through their iterations. Call the solver under torch.no_grad() (DEQLayer does), or "
                             "return a detached value")
        return out

    return checked


def _empty_result(z0: torch.Tensor, trace: bool) -> SolverResult:
    """The result of a solve over no samples."""
    flags = torch.zeros(0, dtype=torch.bool, device=z0.device)
    empty = z0.new_zeros(0)
    return SolverResult(z=z0.clone(), steps=torch.zeros(0, dtype=torch.int32, device=z0.device), abs_res=empty,
                        rel_res=empty.clone(), converged=flags, diverged=flags.clone(), stalled=flags.clone(),
                        trace=z0.new_zeros(0, 0) if trace else None)


def returns_inverse(name: str) -> bool:
    """Whether solver ``name`` can return its inverse-Jacobian estimate (has an ``inverse``
    parameter; of the built-in solvers, ``broyden``)."""
    fn = get_solver(name)
    return "inverse" in inspect.signature(getattr(fn, "__wrapped__", fn)).parameters


def solves_affine_only(name: str) -> bool:
    """Whether solver ``name`` was registered ``affine_only``: it solves ``z = f(z)`` only for an
    affine f (the implicit backward pass's linear system, ``gmres``), not a forward solve's map.

    Args:
        name: a registered solver name (an unknown one raises, listing the registered ones).

    Returns:
        True for an affine-only solver.
    """
    get_solver(name)
    return name in _AFFINE_ONLY


def unregister_solver(name: str) -> None:
    """Remove the solver registered under ``name`` (an unknown name raises, listing the registered ones).

    Args:
        name: a registered solver name; the built-in solvers can be removed too.
    """
    get_solver(name)
    del _REGISTRY[name]
    _AFFINE_ONLY.discard(name)


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
