"""Name -> solver registry, with each solver's options and their validation.

A solver is a callable ``solver(f, z0, *, max_iter, tol, stop_mode, check_every=None,
divergence_factor=1e4, trace=False, **options) -> SolverResult`` over ``(B, D)`` tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .result import SolverResult

__all__ = ["SolverOption", "register_solver", "get_solver", "list_solvers", "validate_solver_options"]

SolverFn = Callable[..., SolverResult]


@dataclass(frozen=True)
class SolverOption:
    """One solver-specific option: default, type (``int``/``float``/``bool``), range check."""

    default: Any
    kind: type
    check: Optional[Callable[[Any], bool]] = None
    allowed: str = ""
    help: str = ""
    optional: bool = False


_REGISTRY: Dict[str, Tuple[SolverFn, Dict[str, SolverOption]]] = {}


def register_solver(name: str, options: Optional[Mapping[str, SolverOption]] = None,
                    *, overwrite: bool = False) -> Callable[[SolverFn], SolverFn]:
    """Decorator registering ``fn`` under ``name`` with its accepted ``options``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"solver name must be a non-empty string, got {name!r}")

    def deco(fn: SolverFn) -> SolverFn:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"a solver named {name!r} is already registered; pass overwrite=True")
        _REGISTRY[name] = (fn, dict(options or {}))
        return fn

    return deco


def list_solvers() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_solver(name: str) -> SolverFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; registered solvers: {list(list_solvers())}")
    return _REGISTRY[name][0]


def solver_options(name: str) -> Dict[str, SolverOption]:
    get_solver(name)
    return dict(_REGISTRY[name][1])


def validate_solver_options(name: str, options: Mapping[str, Any], field: str = "options") -> Dict[str, Any]:
    """Return a new dict of ``options`` for solver ``name`` with defaults filled in.

    Unknown keys, wrong types and out-of-range values raise, naming ``field`` and what is accepted.
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
