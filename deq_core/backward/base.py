"""The interface of a backward mode: what a forward pass gives it, what it returns."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Tuple

import torch

from ..correction import StepRecorder, correction_steps
from ..jacobian import jac_frobenius_estimate
from ..solvers import SolverResult, SolveSpec

if TYPE_CHECKING:
    from ..config import DEQConfig
    from ..flat_map import FlatMap
    from ..stats import DEQStats

__all__ = ["BackwardMode", "ForwardPass", "SolvingMode", "Unread"]

#: A condition under which a mode leaves some of its fields unread: (the setting that causes it,
#: the fields, why), e.g. ``("b_init='zero'", ("b_refine_steps",), "... read with forward_inverse only")``.
Unread = Tuple[str, Tuple[str, ...], str]


@dataclass
class ForwardPass:
    """What one forward pass of a :class:`~deq_core.DEQLayer` gives its backward mode.

    Attributes:
        fn: f on flat states.
        z0: the flat initial state (detached).
        config: the layer's config for this pass.
        training: whether the layer is in training mode.
        grad: whether gradients are enabled (the pass will be differentiated).
        jac_on: whether this pass computes the Jacobian-regularization estimate.
        shortened_by: the training forward limit's jitter draw.
        solve_map: ``fn`` as the no-grad forward solve evaluates it (through ``torch.compile``
            when ``compile_f`` is on).
    """

    fn: "FlatMap"
    z0: torch.Tensor
    config: "DEQConfig"
    training: bool
    grad: bool
    jac_on: bool
    shortened_by: int
    solve_map: Callable[[torch.Tensor], torch.Tensor]

    @property
    def forward_spec(self) -> SolveSpec:
        """The forward solve of this pass (its limits by training/evaluation and jitter)."""
        return self.config.forward_solve(self.training, self.shortened_by)

    def jac(self, f_out: torch.Tensor, z_in: torch.Tensor) -> Optional[torch.Tensor]:
        """The batch-mean JR estimate at ``z_in`` (``f_out = f(z_in)``) when this pass computes it;
        ``None`` otherwise, and for an empty batch (no term, not NaN)."""
        if not self.jac_on or f_out.shape[0] == 0:
            return None
        cfg = self.config
        return jac_frobenius_estimate(f_out, z_in, cfg.jac_probes, cfg.jac_probe).mean()


class BackwardMode(ABC):
    """How a forward pass gets its gradient: a mode takes the :class:`ForwardPass`, produces the
    forward's outcome (:meth:`solve`), then the output ``f(z*)`` with its gradient and the JR
    estimate (:meth:`attach`); a mode whose backward pass solves records that solve's outcome in
    the pass's statistics.

    A mode is created per pass from the layer's config (``mode = cls(config)``), so it may keep
    what :meth:`solve` computed for :meth:`attach`. Register a subclass with
    :func:`~deq_core.register_backward` to select it by ``DEQConfig.backward``.

    Attributes:
        name: the registered name (``DEQConfig.backward``), set by the registry.
        reads: the config fields only this mode reads: set away from their defaults while another
            mode is configured, they are reported as having no effect.
        corrects: whether fixed-point correction runs in this mode.
        solves: whether :meth:`solve` runs a solver (its result has convergence flags).
    """

    name: ClassVar[str] = ""
    reads: ClassVar[Tuple[str, ...]] = ()
    corrects: ClassVar[bool] = False
    solves: ClassVar[bool] = True

    def __init__(self, config: "DEQConfig") -> None:
        self.config = config

    @classmethod
    def check(cls, config: "DEQConfig") -> None:
        """Refuse a config this mode cannot run, naming the fields (called when a config selecting
        the mode is built; the default accepts every config).

        Args:
            config: the config being built (its fields are checked one by one already).
        """

    @classmethod
    def unread(cls, config: "DEQConfig") -> Optional[Unread]:
        """Fields of this mode that the config's other settings leave unread, when the mode is
        configured (the default: none).

        Args:
            config: the config.

        Returns:
            ``(setting, fields, why)`` or ``None``; the fields are reported when set away from
            their defaults.
        """
        return None

    @abstractmethod
    def solve(self, fp: ForwardPass) -> Tuple[SolverResult, int]:
        """The forward's outcome for the statistics, and the forward limit it ran with.

        Args:
            fp: the forward pass.

        Returns:
            ``(result, max_iter)``.
        """

    @abstractmethod
    def attach(self, fp: ForwardPass, result: SolverResult,
               stats: "DEQStats") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The layer's flat output ``f(z*)`` with this mode's gradient, and the JR estimate.

        Args:
            fp: the forward pass.
            result: what :meth:`solve` returned.
            stats: the pass's statistics, for what the mode records (its backward solve's
                outcome, correction states).

        Returns:
            ``(z, jac)``: ``z`` a flat ``(B, D)`` tensor in the state dtype, ``jac`` the
            differentiable batch-mean estimate or ``None``.
        """


class SolvingMode(BackwardMode):
    """A mode whose forward is the configured no-grad solve, with its output f at the returned
    iterate; without gradients the output is the solver's ``f(z*)``, with them :meth:`gradient`
    gives it. In training passes with gradients it records fixed-point correction's states when
    correction is on and the mode ``corrects``."""

    _recorder: Optional[StepRecorder] = None

    def solve(self, fp: ForwardPass) -> Tuple[SolverResult, int]:
        spec = fp.forward_spec
        steps = correction_steps(fp.config, spec.max_iter) if self.corrects and fp.training and fp.grad else None
        self._recorder = StepRecorder(steps) if steps else None
        call = fp.solve_map if self._recorder is None else self._recorder.wrap(fp.solve_map)
        inverse = self.wants_inverse(fp)
        with torch.no_grad():
            result = spec.run(call, fp.z0, precision=fp.fn.precision, sequence_length=fp.fn.sequence_length,
                              inverse=inverse)
        if inverse and result.inverse is None:
            raise RuntimeError(f"the forward solver {spec.solver!r} was asked for its inverse-Jacobian estimate and "
                               "returned none (SolverResult.inverse)")
        return result, spec.max_iter

    def wants_inverse(self, fp: ForwardPass) -> bool:
        """Whether the forward solve returns its inverse-Jacobian estimate (the default: no)."""
        return False

    def attach(self, fp: ForwardPass, result: SolverResult,
               stats: "DEQStats") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not fp.grad:
            return (result.fz if result.fz is not None else fp.fn(result.z)), None
        z, jac = self.gradient(fp, result, stats)
        if self.corrects and fp.training and fp.config.fp_correction:
            recorder = self._recorder or StepRecorder(())  # fp_correction_states=1: the output only
            stats.record_correction(recorder.steps, recorder.states(fp.fn, result, fp.config),
                                    fp.config.fp_correction_gamma)
        return z, jac

    @abstractmethod
    def gradient(self, fp: ForwardPass, result: SolverResult,
                 stats: "DEQStats") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The flat output ``f(z*)`` at ``result.z`` with this mode's gradient, and the JR estimate
        (a pass with gradients).

        Args:
            fp: the forward pass.
            result: the forward solve's result.
            stats: the pass's statistics.

        Returns:
            ``(z, jac)`` as for :meth:`~deq_core.BackwardMode.attach`.
        """
