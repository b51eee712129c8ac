"""The typed, validated configuration of an equilibrium layer: its fields, their checks, and
the forward solve they describe."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ._warn import warn_user
from .backward import get_backward, list_backward_modes
from .correction import CHAIN_FIELDS, CORRECTION_FIELDS, parse_steps
from .errors import OptionTypeError, OptionValueError
from .solvers import (DIVERGENCE_FACTOR, STOP_MODES, SolveSpec, list_solvers, solves_affine_only,
                      validate_solver_options)
from .spectral_norm import CONFIG_FIELDS as SPECTRAL_NORM_FIELDS

__all__ = ["DEQConfig", "BACKWARD_INITS", "STOP_MODES", "PROBE_DISTRIBUTIONS"]

# Initial points of the implicit backward solve: zero, or the forward solver's inverse-Jacobian
# estimate applied to the incoming gradient.
BACKWARD_INITS = ("zero", "forward_inverse")
PROBE_DISTRIBUTIONS = ("normal", "rademacher")
DEFAULT_COMPILE_BACKEND = "inductor"

Choices = Union[Tuple[str, ...], Callable[..., Tuple[str, ...]]]


def _opt(default: Any, help: str, kind: Any = None, choices: Optional[Choices] = None,
         low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
         optional: bool = False) -> Any:
    """A config field: its default, help, type, choices (a tuple, or a function returning the
    accepted names: the registered solvers, say) and numeric range."""
    meta = {"help": help, "kind": kind if kind is not None else type(default), "choices": choices,
            "low": low, "high": high, "low_open": low_open, "optional": optional}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def _compile_backends(value: Optional[str] = None) -> Tuple[str, ...]:
    """torch.compile's registered backends; the default one is accepted without importing
    torch._dynamo (a second or more of import time)."""
    if value == DEFAULT_COMPILE_BACKEND:
        return (value,)
    import torch._dynamo

    return tuple(torch._dynamo.list_backends(exclude_tags=()))


@dataclass(frozen=True)
class DEQConfig:
    """Everything an equilibrium layer needs to know: solvers, backward mode, JR, pretraining.

    Build it with keyword arguments or :meth:`from_dict` (a command line with
    :func:`deq_core.cli.config_from_args`); every value is checked (type, range, choices) and the
    caller's objects are copied, never modified. A refused value raises an
    :class:`~deq_core.OptionError` (a ``ValueError`` or ``TypeError``) naming its fields.
    Solver-specific options (``f_solver_options``/``b_solver_options``) are checked against the
    named solver's registered options, mode-specific settings by the backward mode. A field set
    away from its default that the other settings leave unread is reported once, when the config
    is built (what reads each field is stated where it is read: the backward modes'
    ``reads``, the correction and spectral-norm modules' field lists).
    """

    # Forward solve.
    f_solver: str = _opt("anderson", "forward solver", choices=list_solvers)
    f_max_iter: int = _opt(30, "forward iteration limit (evaluations of f)", low=1)
    f_tol: float = _opt(1e-3, "forward tolerance on the residual of the stop mode", low=0.0, low_open=True)
    f_stop_mode: str = _opt("abs", "forward residual: abs ||f(z)-z|| or rel ||f(z)-z||/||f(z)||",
                            choices=STOP_MODES)
    f_solver_options: Dict[str, Any] = _opt({}, "forward solver options (e.g. m, beta, lam for anderson)")
    f_max_iter_jitter: int = _opt(0, "in training, reduce the forward limit by a random 0..N each step", low=0)
    eval_max_iter: Optional[int] = _opt(None, "forward limit in eval mode (default: f_max_iter)",
                                        kind=int, low=1, optional=True)
    eval_tol: Optional[float] = _opt(None, "forward tolerance in eval mode (default: f_tol)", kind=float,
                                     low=0.0, low_open=True, optional=True)
    # Backward.
    backward: str = _opt("implicit", "gradient: implicit (IFT), phantom (k damped steps), unrolled, reversible "
                         "(a coupled iteration reversed exactly), or a registered mode (deq_core.backward)",
                         choices=list_backward_modes)
    b_solver: str = _opt("broyden", "backward solver for the implicit gradient (gmres: restarted GMRES, for this "
                         "linear system only; b_solver_options restart=m)", choices=list_solvers)
    b_max_iter: int = _opt(30, "backward iteration limit", low=1)
    b_tol: float = _opt(1e-4, "backward tolerance", low=0.0, low_open=True)
    b_stop_mode: str = _opt("rel", "backward residual mode (rel: independent of the loss scale)",
                            choices=STOP_MODES)
    b_solver_options: Dict[str, Any] = _opt({}, "backward solver options")
    b_init: str = _opt("zero", "initial point u0 of the implicit backward solve u = u J + grad: zero, or "
                       "forward_inverse: u0 = grad (I - J)^-1 as estimated by the forward Broyden solve's "
                       "low-rank inverse Jacobian (SHINE, Ramzi et al. 2022), needs f_solver='broyden'; the "
                       "estimate's vectors (at most the forward memory per sample) are kept until the backward",
                       choices=BACKWARD_INITS)
    b_refine_steps: Optional[int] = _opt(None, "with b_init=forward_inverse: backward solver steps from the "
                                         "estimate, replacing b_max_iter (the solve costs k + 1 vector-Jacobian "
                                         "products, the first the estimate's residual; 0: the estimate is the "
                                         "gradient; None: the usual b_max_iter/b_tol solve, started there)",
                                         kind=int, low=0, optional=True)
    phantom_steps: int = _opt(5, "phantom gradient: number of damped unrolled steps from z*", low=1)
    phantom_damping: float = _opt(0.8, "phantom gradient: damping of each step", low=0.0, high=1.0,
                                  low_open=True)
    reversible_beta: float = _opt(0.5, "reversible mode: the relaxation b of the coupled iteration, in (0, 2) and "
                                  "not 1 (the reversal divides by 1 - b, so rounding grows by about 1/|1 - b| per "
                                  "reversed step)", low=0.0, high=2.0, low_open=True)
    reversible_steps: int = _opt(8, "reversible mode: coupled steps in every pass (2 evaluations of f each, plus "
                                 "the output's)", low=1)
    unrolled_layers: int = _opt(2, "applications of f in unrolled mode and during pretraining", low=1)
    # Solver behaviour shared by both directions.
    check_every: Optional[int] = _opt(None, "iterations between host reads of the stop test "
                                      "(None: 1 on CPU, 4 on accelerators; 0: never, run to the limit)",
                                      kind=int, low=0, optional=True)
    divergence_factor: float = _opt(DIVERGENCE_FACTOR, "a residual this many times the first one counts as divergence",
                                    low=1.0, low_open=True)
    sample_dims: int = _opt(1, "leading state dimensions that index the solvers' samples: 1 (the batch) or "
                            "2 (batch and position: every position of a sequence is its own sample for "
                            "every solver decision, and positions stop in order, so a causal f gives exactly "
                            "causal outputs; the state must be (batch, position, ...))", low=1, high=2)
    check_finite: bool = _opt(True, "raise on non-finite inputs (one host read per forward)")
    compile_f: bool = _opt(False, "run the forward solver's no-grad evaluations of f through "
                           "torch.compile (the one differentiable call of f stays eager: JR needs "
                           "double backward, which compiled graphs lack)")
    compile_backend: str = _opt(DEFAULT_COMPILE_BACKEND, "torch.compile backend for compile_f",
                                choices=_compile_backends)
    # Jacobian regularization.
    jac_weight: float = _opt(0.0, "JR weight gamma", low=0.0)
    jac_freq: float = _opt(1.0, "probability that JR is computed in a training step", low=0.0, high=1.0)
    jac_probes: int = _opt(1, "Hutchinson probes per JR estimate", low=1)
    jac_probe: str = _opt("normal", "probe distribution", choices=PROBE_DISTRIBUTIONS)
    jac_weight_increment: float = _opt(0.0, "added to the JR weight every jac_increment_every steps "
                                       "after pretraining", low=0.0)
    jac_increment_every: int = _opt(0, "steps between JR weight increments (0: never)", low=0)
    jac_stop_step: Optional[int] = _opt(None, "switch JR off from this step on", kind=int, low=0, optional=True)
    jac_stop_epoch: Optional[int] = _opt(None, "switch JR off from this epoch on", kind=int, low=0,
                                         optional=True)
    # Spectral normalization of f (applied when the layer is built).
    spectral_norm: bool = _opt(False, "spectral-normalize f's Linear/Conv1d/Conv2d weights when the layer is "
                               "built: W * s / sigma, sigma a power-iteration estimate of W's largest singular "
                               "value (of the reshaped (C_out, C_in*k...) kernel for convs), advanced once per "
                               "training forward pass; f must not be weight-normalized")
    spectral_norm_scale: Optional[float] = _opt(None, "spectral norm: the target norm s of each weight "
                                                "(default: 1)", kind=float, low=0.0, low_open=True,
                                                optional=True)
    spectral_norm_learn_scale: bool = _opt(False, "spectral norm: learn s per weight, starting from "
                                           "spectral_norm_scale")
    spectral_norm_clip: Optional[float] = _opt(None, "spectral norm: bound on |s| (each weight's norm is "
                                               "min(|s|, clip); a bound for a learned s)", kind=float, low=0.0,
                                               low_open=True, optional=True)
    # Fixed-point correction (training passes with gradients, implicit or phantom backward, after
    # pretraining): states along the forward solve supervised besides the output.
    fp_correction_states: int = _opt(0, "fixed-point correction: supervise n states of each training solve, the "
                                     "iterates at steps (i * limit) // n for i = 1..n-1 and the output (0: off; 1: "
                                     "the output only, today's loss); see DEQStats.correction_states", low=0)
    fp_correction_steps: str = _opt("", "fixed-point correction: the solver steps whose iterates are supervised "
                                    "besides the output, comma-separated, strictly increasing, each in "
                                    "1..f_max_iter (e.g. '10,20'; '': off); an alternative to "
                                    "fp_correction_states")
    fp_correction_gamma: float = _opt(0.8, "fixed-point correction: the k-th of n supervised states has loss weight "
                                      "gamma^(n-1-k), the output weight 1", low=0.0, high=1.0, low_open=True)
    # Pretraining.
    pretrain_steps: int = _opt(0, "steps trained as an unrolled weight-tied stack before solving", low=0)
    pretrain_jac_weight: float = _opt(0.0, "JR weight during pretraining", low=0.0)
    seed: int = _opt(0, "seed of the per-step random decisions (JR on/off, limit jitter)")

    def __post_init__(self) -> None:
        steps = self.fp_correction_steps
        if isinstance(steps, (list, tuple)):
            # A sequence of step indices is accepted and kept as its canonical text, the one form
            # that the command lines (argparse and fairseq) carry.
            object.__setattr__(self, "fp_correction_steps", ",".join(_step_text(s) for s in steps))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check_field(f, getattr(self, f.name)))
        for side in ("f", "b"):
            name = f"{side}_solver_options"
            try:
                opts = validate_solver_options(getattr(self, f"{side}_solver"), getattr(self, name), field=name)
            except ValueError as err:
                raise OptionValueError(str(err), name) from None
            except TypeError as err:
                raise OptionTypeError(str(err), name) from None
            object.__setattr__(self, name, opts)
        if solves_affine_only(self.f_solver):
            raise OptionValueError(f"f_solver={self.f_solver!r} solves affine maps only (a linear system such as the "
                                   f"implicit backward pass's), and the forward map is nonlinear; use it as b_solver, "
                                   f"and one of {[n for n in list_solvers() if not solves_affine_only(n)]} as f_solver",
                                   "f_solver")
        if self.f_max_iter_jitter >= self.f_max_iter:
            raise OptionValueError(f"f_max_iter_jitter must be < f_max_iter ({self.f_max_iter}), "
                                   f"got {self.f_max_iter_jitter}", "f_max_iter_jitter", "f_max_iter")
        self._check_correction()
        get_backward(self.backward).check(self)
        for setting, unread, why in self._unread():
            warn_user(f"{setting} does not use {', '.join(unread)}: they have no effect ({why})")

    def _check_correction(self) -> None:
        if self.fp_correction_states and self.fp_correction_steps:
            raise OptionValueError(f"set fp_correction_states (n states spaced over the limit) or fp_correction_steps "
                                   f"(explicit solver steps), not both; got fp_correction_states="
                                   f"{self.fp_correction_states} and fp_correction_steps={self.fp_correction_steps!r}",
                                   "fp_correction_steps", "fp_correction_states")
        shortest = self.f_max_iter - self.f_max_iter_jitter
        if self.fp_correction_states > shortest:
            limit = (f"f_max_iter - f_max_iter_jitter = {self.f_max_iter} - {self.f_max_iter_jitter}"
                     if self.f_max_iter_jitter else "f_max_iter")
            raise OptionValueError(f"fp_correction_states must be <= the shortest training forward limit, {limit} = "
                                   f"{shortest} (n states need n distinct solver steps), got "
                                   f"{self.fp_correction_states}", "fp_correction_states", "f_max_iter")
        try:
            steps = parse_steps(self.fp_correction_steps, self.f_max_iter)
        except ValueError as err:
            raise OptionValueError(str(err), "fp_correction_steps") from None
        object.__setattr__(self, "fp_correction_steps", ",".join(map(str, steps)))

    def _unread(self) -> List[Tuple[str, Tuple[str, ...], str]]:
        """``(setting, fields, why)`` for the fields set away from their defaults that the other
        settings leave unread, from what each reader declares it reads."""
        mode = get_backward(self.backward)
        correcting = mode.corrects and self.fp_correction
        read = set(mode.reads) | (set(CHAIN_FIELDS) if correcting else set())
        other = [f for name in list_backward_modes() if name != self.backward for f in get_backward(name).reads]
        if not mode.corrects:
            other += CORRECTION_FIELDS
        out = []
        unread = self._changed(f for f in self.field_names() if f in other and f not in read)
        if unread:
            out.append((f"backward={self.backward!r}", unread,
                        "options of another backward mode, perhaps a model's defaults for it"))
        conditional = mode.unread(self)
        if conditional is not None and self._changed(conditional[1]):
            out.append((conditional[0], self._changed(conditional[1]), conditional[2]))
        if not self.spectral_norm and self._changed(SPECTRAL_NORM_FIELDS):
            out.append(("spectral_norm=False", self._changed(SPECTRAL_NORM_FIELDS),
                        "set spectral_norm=True to spectral-normalize f"))
        gamma = self._changed(CORRECTION_FIELDS[2:])
        if mode.corrects and not self.fp_correction and gamma:
            out.append(("fixed-point correction is off (fp_correction_states=0, fp_correction_steps='') and", gamma,
                        "set fp_correction_states or fp_correction_steps to turn it on"))
        return out

    def _changed(self, names: Iterable[str]) -> Tuple[str, ...]:
        """``name=value`` of the fields among ``names`` set away from their defaults."""
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(self)}
        defaults["b_solver_options"] = validate_solver_options(self.b_solver, {})
        defaults["f_solver_options"] = validate_solver_options(self.f_solver, {})
        return tuple(f"{name}={getattr(self, name)!r}" for name in names if getattr(self, name) != defaults[name])

    @property
    def fp_correction(self) -> bool:
        """Whether fixed-point correction is on (``fp_correction_states`` or ``fp_correction_steps`` set)."""
        return self.fp_correction_states > 0 or bool(self.fp_correction_steps)

    def forward_solve(self, training: bool, shortened_by: int = 0) -> SolveSpec:
        """The forward solve of a training (or evaluation) pass.

        Args:
            training: use the training limits (``f_max_iter``, ``f_tol``) or the evaluation ones
                (``eval_max_iter``/``eval_tol``, defaulting to the training ones).
            shortened_by: iterations taken off the training limit (the step's jitter draw).

        Returns:
            the :class:`~deq_core.solvers.SolveSpec` of the forward solver.
        """
        if training:
            max_iter, tol = self.f_max_iter - shortened_by, self.f_tol
        else:
            max_iter, tol = self.eval_max_iter or self.f_max_iter, self.eval_tol or self.f_tol
        return SolveSpec(self.f_solver, max_iter, tol, self.f_stop_mode, self.check_every,
                         self.divergence_factor, dict(self.f_solver_options))

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The names of every config field, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: Optional["DEQConfig"] = None) -> "DEQConfig":
        """Build a config from a mapping of field values.

        Args:
            values: field names and values; an unknown name raises, suggesting the closest field.
            base: the config whose values the mapping overrides (default: the field defaults). A
                new ``f_solver``/``b_solver`` without its options drops the base's options.

        Returns:
            the validated config (the mapping's objects are copied).
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"DEQ options must be a mapping, got {type(values).__name__}")
        names = cls.field_names()
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise OptionValueError(f"unknown DEQ option(s): {', '.join(hints)}; accepted: {', '.join(names)}",
                                   *map(str, unknown))
        merged = dataclasses.asdict(base) if base is not None else {}
        for side in ("f", "b"):
            # Options of the base's solver do not carry over to a different solver.
            if f"{side}_solver" in values and f"{side}_solver_options" not in values:
                merged.pop(f"{side}_solver_options", None)
        merged.update({k: _copy(v) for k, v in values.items()})
        return cls(**merged)

    def replace(self, **changes: Any) -> "DEQConfig":
        """A copy with some fields changed (validated as :meth:`from_dict` does over this config)."""
        return self.from_dict(changes, base=self)

    def to_dict(self) -> Dict[str, Any]:
        """Every field and its value, as a new dict (option dicts copied)."""
        return {k: _copy(v) for k, v in dataclasses.asdict(self).items()}


def _step_text(step: Any) -> str:
    step = _python_scalar(step)
    if not isinstance(step, int) or isinstance(step, bool):
        raise OptionTypeError(f"fp_correction_steps must hold integer solver steps, got {step!r} "
                              f"({type(step).__name__})", "fp_correction_steps")
    return str(step)


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def _python_scalar(value: Any) -> Any:
    """A numpy scalar or a 0-d tensor as the Python number (or bool) it holds; anything else as is."""
    is_tensor = type(value).__module__.startswith("torch") and getattr(value, "dim", lambda: 1)() == 0
    is_numpy = type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0
    return value.item() if is_tensor or is_numpy else value


def _check_field(f: dataclasses.Field, value: Any) -> Any:
    meta = f.metadata
    kind, name = meta["kind"], f.name
    if kind in (int, float, bool):
        value = _python_scalar(value)
    if value is None:
        if meta["optional"]:
            return None
        raise OptionTypeError(f"{name} must not be None", name)
    if kind is dict:
        if not isinstance(value, Mapping):
            raise OptionTypeError(f"{name} must be a mapping of option names to values, got {value!r}", name)
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        allowed = kind.__name__ + (" or None" if meta["optional"] else "")
        raise OptionTypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})", name)
    choices = meta["choices"]
    if callable(choices):
        choices = choices(value) if choices is _compile_backends else choices()
    if choices is not None and value not in choices:
        raise OptionValueError(f"{name} must be one of {list(choices)}, got {value!r}", name)
    if kind in (int, float):
        low, high = meta["low"], meta["high"]
        if value != value:  # NaN
            raise OptionValueError(f"{name} must be a number, got NaN", name)
        if math.isinf(value):
            raise OptionValueError(f"{name} must be finite, got {value!r}", name)
        bad_low = low is not None and (value <= low if meta["low_open"] else value < low)
        bad_high = high is not None and value > high
        if bad_low or bad_high:
            lo = "" if low is None else (f"> {low}" if meta["low_open"] else f">= {low}")
            hi = "" if high is None else f"<= {high}"
            raise OptionValueError(f"{name} must be {' and '.join(s for s in (lo, hi) if s)}, got {value!r}", name)
    return value
