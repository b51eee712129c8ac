"""The typed, validated configuration of an equilibrium layer."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from ._warn import warn_user
from .solvers import DIVERGENCE_FACTOR, STOP_MODES, SolveSpec, list_solvers, returns_inverse, validate_solver_options

__all__ = ["DEQConfig", "BACKWARD_MODES", "BACKWARD_INITS", "STOP_MODES", "PROBE_DISTRIBUTIONS", "add_deq_args",
           "parse_solver_options"]

BACKWARD_MODES = ("implicit", "phantom", "unrolled")
# Initial points of the implicit backward solve: zero, or the forward solver's inverse-Jacobian
# estimate applied to the incoming gradient.
BACKWARD_INITS = ("zero", "forward_inverse")
PROBE_DISTRIBUTIONS = ("normal", "rademacher")
DEFAULT_COMPILE_BACKEND = "inductor"
# Fields only the phantom backward reads, and those only the implicit backward's solve reads.
_PHANTOM_FIELDS = ("phantom_steps", "phantom_damping")
_BACKWARD_SOLVE_FIELDS = ("b_solver", "b_max_iter", "b_tol", "b_stop_mode", "b_solver_options", "b_init",
                          "b_refine_steps")
# Fields only read when spectral_norm is on.
_SPECTRAL_NORM_FIELDS = ("spectral_norm_scale", "spectral_norm_learn_scale", "spectral_norm_clip")
# Fields of fixed-point correction; the first two switch it on, the last is only read when it is on.
_CORRECTION_FIELDS = ("fp_correction_states", "fp_correction_steps", "fp_correction_gamma")


def _opt(default: Any, help: str, kind: Any = None, choices: Optional[Iterable[str]] = None,
         low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
         optional: bool = False) -> Any:
    meta = {"help": help, "kind": kind if kind is not None else type(default), "choices": choices,
            "low": low, "high": high, "low_open": low_open, "optional": optional}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DEQConfig:
    """Everything an equilibrium layer needs to know: solvers, backward mode, JR, pretraining.

    Build it with keyword arguments, :meth:`from_dict` or :meth:`from_namespace`; every value is
    checked (type, range, choices) and the caller's objects are copied, never modified.
    Solver-specific options (``f_solver_options``/``b_solver_options``) are checked against the
    named solver's registered options.
    """

    # Forward solve.
    f_solver: str = _opt("anderson", "forward solver", choices="solvers")
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
    backward: str = _opt("implicit", "gradient: implicit (IFT), phantom (k damped steps) or unrolled",
                         choices=BACKWARD_MODES)
    b_solver: str = _opt("broyden", "backward solver for the implicit gradient", choices="solvers")
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
                                choices="compile_backends")
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
            solver = getattr(self, f"{side}_solver")
            opts = validate_solver_options(solver, getattr(self, f"{side}_solver_options"),
                                           field=f"{side}_solver_options")
            object.__setattr__(self, f"{side}_solver_options", opts)
        if self.f_max_iter_jitter >= self.f_max_iter:
            raise ValueError(f"f_max_iter_jitter must be < f_max_iter ({self.f_max_iter}), "
                             f"got {self.f_max_iter_jitter}")
        if self.forward_inverse and not returns_inverse(self.f_solver):
            raise ValueError(f"b_init='forward_inverse' applies the forward solver's inverse-Jacobian estimate, which "
                             f"f_solver={self.f_solver!r} does not keep: set f_solver='broyden' (the quasi-Newton "
                             "solver, whose low-rank estimate it uses), or b_init='zero'")
        self._check_correction()
        unused = self._ignored_by_spectral_norm()
        if unused:
            warn_user(f"spectral_norm=False does not use {', '.join(unused)}: they have no effect (set "
                      "spectral_norm=True to spectral-normalize f)")
        ignored = self._ignored_by_backward()
        if ignored:
            warn_user(f"backward={self.backward!r} does not use {', '.join(ignored)}: they have no effect "
                      "(options of another backward mode, perhaps a model's defaults for it)")
        unread = self._ignored_by_b_init()
        if unread:
            how = f"b_init={self.b_init!r}" + (f" with b_refine_steps={self.b_refine_steps}"
                                                if self.forward_inverse and self.b_refine_steps is not None else "")
            why = ("b_refine_steps is read with b_init='forward_inverse' only" if not self.forward_inverse
                   else "b_refine_steps replaces b_max_iter" + (", and at 0 steps no backward solver runs"
                                                                if self.b_refine_steps == 0 else ""))
            warn_user(f"{how} does not use {', '.join(unread)}: they have no effect ({why})")
        unread = self._ignored_by_correction()
        if unread:
            warn_user(f"fixed-point correction is off (fp_correction_states=0, fp_correction_steps='') and does "
                      f"not use {', '.join(unread)}: they have no effect (set fp_correction_states or "
                      "fp_correction_steps to turn it on)")

    def _ignored_by_backward(self) -> Tuple[str, ...]:
        """Fields set away from their defaults that the chosen backward mode never reads (the
        phantom steps are read by fixed-point correction in the implicit mode too)."""
        unused = {"implicit": () if self.fp_correction else _PHANTOM_FIELDS, "phantom": _BACKWARD_SOLVE_FIELDS,
                  "unrolled": _PHANTOM_FIELDS + _BACKWARD_SOLVE_FIELDS + _CORRECTION_FIELDS}[self.backward]
        return self._changed(unused)

    def _ignored_by_b_init(self) -> Tuple[str, ...]:
        """Implicit-backward fields set away from their defaults that its initial point leaves
        unread: b_refine_steps from zero; b_max_iter when b_refine_steps replaces it; the solver and
        its options at 0 steps (the solve then only measures the estimate's residual)."""
        if self.backward != "implicit":
            return ()
        if not self.forward_inverse:
            unused: Tuple[str, ...] = ("b_refine_steps",)
        elif self.b_refine_steps is None:
            unused = ()
        else:
            unused = ("b_max_iter",) + (("b_solver", "b_solver_options") if self.b_refine_steps == 0 else ())
        return self._changed(unused)

    def _changed(self, names: Tuple[str, ...]) -> Tuple[str, ...]:
        """``name=value`` of the fields among ``names`` set away from their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in names}
        defaults["b_solver_options"] = validate_solver_options(self.b_solver, {})
        return tuple(f"{name}={getattr(self, name)!r}" for name in names if getattr(self, name) != defaults[name])

    @property
    def forward_inverse(self) -> bool:
        """Whether the implicit backward starts from the forward solver's inverse-Jacobian estimate
        (``backward='implicit'`` and ``b_init='forward_inverse'``)."""
        return self.backward == "implicit" and self.b_init == "forward_inverse"

    def _ignored_by_spectral_norm(self) -> Tuple[str, ...]:
        """Spectral-norm options set away from their defaults while spectral_norm is off."""
        if self.spectral_norm:
            return ()
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in _SPECTRAL_NORM_FIELDS}
        return tuple(f"{name}={getattr(self, name)!r}" for name in _SPECTRAL_NORM_FIELDS
                     if getattr(self, name) != defaults[name])

    def _ignored_by_correction(self) -> Tuple[str, ...]:
        """Correction options set away from their defaults while fixed-point correction is off
        (in the unrolled backward mode :meth:`_ignored_by_backward` names them)."""
        if self.fp_correction or self.backward == "unrolled":
            return ()
        default = next(f.default for f in dataclasses.fields(self) if f.name == "fp_correction_gamma")
        return (f"fp_correction_gamma={self.fp_correction_gamma!r}",) if self.fp_correction_gamma != default else ()

    def _check_correction(self) -> None:
        if self.fp_correction_states and self.fp_correction_steps:
            raise ValueError(f"set fp_correction_states (n states spaced over the limit) or fp_correction_steps "
                             f"(explicit solver steps), not both; got fp_correction_states="
                             f"{self.fp_correction_states} and fp_correction_steps={self.fp_correction_steps!r}")
        shortest = self.f_max_iter - self.f_max_iter_jitter
        if self.fp_correction_states > shortest:
            limit = (f"f_max_iter - f_max_iter_jitter = {self.f_max_iter} - {self.f_max_iter_jitter}"
                     if self.f_max_iter_jitter else "f_max_iter")
            raise ValueError(f"fp_correction_states must be <= the shortest training forward limit, {limit} = "
                             f"{shortest} (n states need n distinct solver steps), got {self.fp_correction_states}")
        steps = _parse_steps(self.fp_correction_steps, self.f_max_iter)
        object.__setattr__(self, "fp_correction_steps", ",".join(map(str, steps)))

    @property
    def fp_correction(self) -> bool:
        """Whether fixed-point correction is on (``fp_correction_states`` or ``fp_correction_steps`` set)."""
        return self.fp_correction_states > 0 or bool(self.fp_correction_steps)

    def correction_steps(self, max_iter: int) -> Optional[Tuple[int, ...]]:
        """The solver steps whose states fixed-point correction supervises besides the output.

        Args:
            max_iter: the forward limit of the pass (``f_max_iter`` less the pass's jitter).

        Returns:
            ``None`` when correction is off; else the increasing steps: ``(i * max_iter) // n`` for
            ``i = 1..n-1`` with ``fp_correction_states = n`` (empty for n = 1), or the
            ``fp_correction_steps`` (some may exceed a jittered limit: those states are z*).
        """
        if self.fp_correction_states:
            n = self.fp_correction_states
            return tuple((i * max_iter) // n for i in range(1, n))
        if self.fp_correction_steps:
            return _parse_steps(self.fp_correction_steps, self.f_max_iter)
        return None

    # ----------------------------------------------------------------------------------------
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

    def backward_solve(self) -> SolveSpec:
        """The implicit backward pass's linear solve, as a :class:`~deq_core.solvers.SolveSpec`: at
        most ``b_max_iter`` evaluations, or ``b_refine_steps + 1`` from the forward's estimate (the
        first measures the estimate's residual)."""
        refined = self.forward_inverse and self.b_refine_steps is not None
        max_iter = self.b_refine_steps + 1 if refined else self.b_max_iter
        return SolveSpec(self.b_solver, max_iter, self.b_tol, self.b_stop_mode, self.check_every,
                         self.divergence_factor, dict(self.b_solver_options))

    # ----------------------------------------------------------------------------------------
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
            raise ValueError(f"unknown DEQ option(s): {', '.join(hints)}; accepted: {', '.join(names)}")
        merged = dataclasses.asdict(base) if base is not None else {}
        for side in ("f", "b"):
            # Options of the base's solver do not carry over to a different solver.
            if f"{side}_solver" in values and f"{side}_solver_options" not in values:
                merged.pop(f"{side}_solver_options", None)
        merged.update({k: _copy(v) for k, v in values.items()})
        return cls(**merged)

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace, prefix: str = "",
                       base: Optional["DEQConfig"] = None) -> "DEQConfig":
        """Build a config from an argparse namespace (as filled by :func:`add_deq_args`).

        Args:
            namespace: the parsed arguments; only attributes ``prefix + field`` are read.
            prefix: the flags' prefix.
            base: the config the given attributes override.

        Returns:
            the validated config.
        """
        values = {}
        for name in cls.field_names():
            attr = prefix + name
            if hasattr(namespace, attr):
                values[name] = getattr(namespace, attr)
        for side in ("f", "b"):
            # The parser's default options belong to its default solver: another one chosen on the
            # command line gets its own defaults (as from_dict gives a new solver without options).
            options = values.get(f"{side}_solver_options")
            if isinstance(options, _DefaultOptions) and values.get(f"{side}_solver", options.solver) != options.solver:
                del values[f"{side}_solver_options"]
        return cls.from_dict(values, base=base)

    def replace(self, **changes: Any) -> "DEQConfig":
        """A copy with some fields changed (validated as :meth:`from_dict` does over this config)."""
        return self.from_dict(changes, base=self)

    def to_dict(self) -> Dict[str, Any]:
        """Every field and its value, as a new dict (option dicts copied)."""
        return {k: _copy(v) for k, v in dataclasses.asdict(self).items()}


def _step_text(step: Any) -> str:
    step = _python_scalar(step)
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"fp_correction_steps must hold integer solver steps, got {step!r} ({type(step).__name__})")
    return str(step)


def _parse_steps(text: str, max_iter: int) -> Tuple[int, ...]:
    """The solver steps of ``fp_correction_steps`` ("10,20"; "" for none), checked."""
    accepted = (f"comma-separated solver steps, integers in 1..f_max_iter={max_iter}, strictly increasing "
                "(e.g. '10,20'), or '' for none")
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    try:
        steps = tuple(int(item) for item in items)
    except ValueError:
        raise ValueError(f"fp_correction_steps must be {accepted}; got {text!r}") from None
    if any(k < 1 or k > max_iter for k in steps) or any(a >= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"fp_correction_steps must be {accepted}; got {text!r}")
    return steps


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


class _DefaultOptions(dict):
    """The default of a solver-options flag, which remembers the solver whose options it holds."""

    def __init__(self, options: Mapping[str, Any], solver: str) -> None:
        super().__init__(options)
        self.solver = solver


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
        raise TypeError(f"{name} must not be None")
    if kind is dict:
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping of option names to values, got {value!r}")
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        allowed = kind.__name__ + (" or None" if meta["optional"] else "")
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    choices = meta["choices"]
    if choices == "solvers":
        choices = list_solvers()
    elif choices == "compile_backends":
        choices = _compile_backends(value)
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    if kind in (int, float):
        low, high = meta["low"], meta["high"]
        if value != value:  # NaN
            raise ValueError(f"{name} must be a number, got NaN")
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value!r}")
        bad_low = low is not None and (value <= low if meta["low_open"] else value < low)
        bad_high = high is not None and value > high
        if bad_low or bad_high:
            lo = "" if low is None else (f"> {low}" if meta["low_open"] else f">= {low}")
            hi = "" if high is None else f"<= {high}"
            raise ValueError(f"{name} must be {' and '.join(s for s in (lo, hi) if s)}, got {value!r}")
    return value


def _compile_backends(value: str) -> Tuple[str, ...]:
    """torch.compile's registered backends; the default one is accepted without importing
    torch._dynamo (a second or more of import time)."""
    if value == DEFAULT_COMPILE_BACKEND:
        return (value,)
    import torch._dynamo

    return tuple(torch._dynamo.list_backends(exclude_tags=()))


def parse_solver_options(text: str) -> Dict[str, Any]:
    """Parse ``key=value,key=value`` (values as Python literals) for the solver-options flags."""
    out: Dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"solver option {item!r} must be written key=value")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


def add_deq_args(parser: argparse.ArgumentParser, prefix: str = "", defaults: Optional[DEQConfig] = None,
                 exclude: Iterable[str] = (), suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """Add one ``--{prefix}{field}`` flag (dashes for underscores) per config field to ``parser``.

    Values are parsed but validated only by :meth:`DEQConfig.from_namespace`, so every error
    message comes from one place. With ``suppress_defaults`` a flag the user did not give leaves
    no attribute, so the namespace holds only explicit choices (to overlay on a model's own
    defaults). Returns ``parser``.
    """
    defaults = defaults or DEQConfig()
    group = parser.add_argument_group("deep equilibrium layer")
    skip = set(exclude)
    for f in dataclasses.fields(DEQConfig):
        if f.name in skip:
            continue
        meta = f.metadata
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = _copy(getattr(defaults, f.name))
        if meta["kind"] is dict:
            default = _DefaultOptions(default, getattr(defaults, f.name.replace("_options", "")))
        kw: Dict[str, Any] = {"default": argparse.SUPPRESS if suppress_defaults else default,
                              "dest": prefix + f.name, "help": meta["help"]}
        kind = meta["kind"]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is dict:
            kw["type"] = parse_solver_options
            kw["metavar"] = "KEY=VALUE[,...]"
        elif meta["optional"]:
            kw["type"] = _optional(kind)
        else:
            kw["type"] = kind
        if isinstance(meta["choices"], tuple):
            kw["choices"] = meta["choices"]
        group.add_argument(flag, **kw)
    return parser


def _optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse
