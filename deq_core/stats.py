"""What an equilibrium layer did in one forward (and backward) pass."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._warn import warn_user
from .solvers import SolverResult
from .state import State

__all__ = ["DEQStats", "DEQStatsMeter", "BACKWARD_SUMMARY"]

# The entries of DEQStats.backward_summary(): 1 once the backward solve ran, then batch means.
BACKWARD_SUMMARY = ("ran", "b_steps", "b_abs_res", "b_rel_res", "b_stalled", "b_diverged")


@dataclass(eq=False)
class DEQStats:
    """Solver statistics of one pass; per-sample tensors stay on the device and have one entry per
    solver sample: ``(B,)``, or ``(B * L,)`` for the forward fields with ``sample_dims=2`` (the
    backward solve keeps one sample per batch element).

    ``jac_frobenius`` is the differentiable batch-mean estimate of ``||J_f(z*)||_F^2 / d`` when
    JR ran this step (else ``None``), ``jac_weight`` the JR weight it ran with, and
    :attr:`jr_term` their product, the term to add to the training loss. The backward fields are
    filled in when the implicit backward pass runs (for the reversible mode they describe its
    reconstruction of the trajectory: :meth:`record_reversal`). :meth:`to_dict` turns everything into Python
    floats with a single host read; :meth:`backward_summary` gives the backward means as a
    device vector filled in place, for loggers that keep their values before ``backward()``.

    With fixed-point correction on (``DEQConfig.fp_correction_states``/``fp_correction_steps``) a
    training pass with gradients, in the implicit or phantom mode and after pretraining, also
    carries ``correction_states``: the solver's iterates at the solver steps ``correction_steps``
    (in that order), each in the structure and dtype of the layer's output and differentiable by
    a phantom gradient from it (see :class:`~deq_core.DEQLayer`), and ``correction_gamma``, the
    weight of :func:`~deq_core.fixed_point_correction`. Both lists are empty for
    ``fp_correction_states=1`` and ``None`` in every pass where correction does not run.
    """

    mode: str
    f_steps: torch.Tensor
    f_abs_res: torch.Tensor
    f_rel_res: torch.Tensor
    f_diverged: torch.Tensor
    f_max_iter: int
    f_converged: Optional[torch.Tensor] = None
    f_stalled: Optional[torch.Tensor] = None
    host_reads: int = 0
    jac_frobenius: Optional[torch.Tensor] = None
    jac_weight: float = 0.0
    b_steps: Optional[torch.Tensor] = None
    b_abs_res: Optional[torch.Tensor] = None
    b_rel_res: Optional[torch.Tensor] = None
    b_diverged: Optional[torch.Tensor] = None
    b_converged: Optional[torch.Tensor] = None
    b_stalled: Optional[torch.Tensor] = None
    correction_states: Optional[List[State]] = field(default=None, repr=False)
    correction_steps: Optional[Tuple[int, ...]] = None
    correction_gamma: float = 0.0
    _summary: Optional[torch.Tensor] = field(default=None, repr=False)

    @classmethod
    def from_solve(cls, mode: str, result: SolverResult, max_iter: int, solved: bool = True) -> "DEQStats":
        """The statistics of a forward pass (JR, correction and the backward solve are recorded
        later, by :meth:`record_jr`, :meth:`record_correction` and :meth:`record_backward`).

        Args:
            mode: the backward mode's name (``"unrolled"`` for a pretraining pass).
            result: the forward's outcome.
            max_iter: the forward limit the pass ran with.
            solved: whether a solver produced ``result`` (an unrolled stack has no convergence
                flags: ``f_converged`` and ``f_stalled`` are ``None``).

        Returns:
            the new :class:`DEQStats`.
        """
        return cls(mode=mode, f_steps=result.steps, f_abs_res=result.abs_res, f_rel_res=result.rel_res,
                   f_diverged=result.diverged, f_converged=result.converged if solved else None,
                   f_stalled=result.stalled if solved else None, f_max_iter=max_iter,
                   host_reads=result.host_reads)

    def record_jr(self, jac_frobenius: Optional[torch.Tensor], jac_weight: float) -> None:
        """Store the pass's JR estimate and the weight it ran with (the weight only when it ran).

        Args:
            jac_frobenius: the differentiable estimate, or ``None`` when JR did not run.
            jac_weight: the JR weight of this step.
        """
        self.jac_frobenius = jac_frobenius
        self.jac_weight = jac_weight if jac_frobenius is not None else 0.0

    def record_correction(self, steps: Sequence[int], states: Sequence[State], gamma: float) -> None:
        """Store fixed-point correction's states (called by a backward mode that runs it).

        Args:
            steps: the solver steps of the states.
            states: the states, in the structure and dtype of the output.
            gamma: the weight of :func:`~deq_core.fixed_point_correction`.
        """
        self.correction_steps, self.correction_states = tuple(steps), list(states)
        self.correction_gamma = float(gamma)

    def record_backward(self, result: SolverResult) -> None:
        """Store the implicit backward solve's outcome (called by the layer's backward pass).

        Args:
            result: the backward solver's result.
        """
        self.b_steps, self.b_abs_res = result.steps, result.abs_res
        self.b_rel_res, self.b_diverged = result.rel_res, result.diverged
        self.b_converged, self.b_stalled = result.converged, result.stalled
        self.host_reads += result.host_reads
        if self._summary is not None:
            self._fill_summary()

    def record_reversal(self, abs_error: torch.Tensor, rel_error: torch.Tensor, vjps: int) -> None:
        """Store how a reversible backward pass went, in the backward fields: ``b_steps`` its
        vector-Jacobian products, ``b_abs_res``/``b_rel_res`` the error of the initial state it
        rebuilt (absolute, and over the final state's norm), ``b_diverged`` where that is not
        finite (``b_converged`` elsewhere; nothing stalls).

        Args:
            abs_error: per batch element, ``(B,)``.
            rel_error: per batch element, ``(B,)``.
            vjps: the vector-Jacobian products of the pass.
        """
        finite = torch.isfinite(rel_error)
        steps = torch.full_like(finite, vjps, dtype=torch.int32)
        self.record_backward(SolverResult(z=rel_error, steps=steps, abs_res=abs_error, rel_res=rel_error,
                                          converged=finite, diverged=~finite))

    def backward_summary(self) -> torch.Tensor:
        """The backward solve's means as a float32 device vector with the entries named by
        :data:`BACKWARD_SUMMARY` (ran, then the means of steps, abs and rel residual, stalled and
        diverged fractions), all 0 until the backward solve runs and written in place when it does.

        For loggers that must keep their values before ``backward()`` runs (fairseq's criterions
        return their logging outputs first). Ask for it before ``backward()``; asked after, it
        holds the recorded values already.

        Returns:
            a ``(len(BACKWARD_SUMMARY),)`` tensor on the device of the forward statistics.
        """
        if self._summary is None:
            self._summary = torch.zeros(len(BACKWARD_SUMMARY), device=self.f_steps.device)
            if self.b_steps is not None:
                self._fill_summary()
        return self._summary

    def _fill_summary(self) -> None:
        means = self.means()
        means["ran"] = torch.ones((), device=self._summary.device)
        self._summary.copy_(torch.stack([means[key] for key in BACKWARD_SUMMARY]))

    @property
    def jr_term(self) -> Union[torch.Tensor, float]:
        """``jac_weight * jac_frobenius`` when JR ran this step, else 0.0: add it to the training loss."""
        if self.jac_frobenius is None or self.jac_weight == 0.0:
            return 0.0
        return self.jac_weight * self.jac_frobenius

    @property
    def jac_loss(self) -> Optional[torch.Tensor]:
        """Deprecated name of ``jac_frobenius`` (the unweighted estimate)."""
        _deprecated("jac_loss", "jac_frobenius (the unweighted JR estimate)")
        return self.jac_frobenius

    @property
    def jr_loss(self) -> Union[torch.Tensor, float]:
        """Deprecated name of :attr:`jr_term` (the weighted term to add to the loss)."""
        _deprecated("jr_loss", "jr_term (the weighted JR term to add to the loss)")
        return self.jr_term

    @property
    def diverged(self) -> torch.Tensor:
        """Whether any sample's forward (or backward) solve diverged, as a 0-d device tensor."""
        flag = self.f_diverged.any()
        return flag | self.b_diverged.any() if self.b_diverged is not None else flag

    def means(self) -> Dict[str, torch.Tensor]:
        """Batch means as detached 0-d float32 tensors on the stats' device (no host read), for
        loggers that accumulate on the device: forward steps and residuals, the diverged,
        converged and stalled (at the precision floor) fractions, the backward ones once the
        backward solve ran, and ``jac_frobenius`` when JR ran (none over an empty batch).
        :meth:`to_dict` reads the same values (and a few more) to the host."""
        out: Dict[str, torch.Tensor] = {}

        def add(key: str, t: Optional[torch.Tensor]) -> None:
            if t is not None and t.numel():  # a pass over no samples has no means
                out[key] = t.detach().float().mean().reshape(())

        add("f_steps", self.f_steps)
        add("f_abs_res", self.f_abs_res)
        add("f_rel_res", self.f_rel_res)
        add("f_diverged", self.f_diverged)
        add("f_converged", self.f_converged)
        add("f_stalled", self.f_stalled)
        if self.b_steps is not None:
            add("b_steps", self.b_steps)
            add("b_abs_res", self.b_abs_res)
            add("b_rel_res", self.b_rel_res)
            add("b_diverged", self.b_diverged)
            add("b_converged", self.b_converged)
            add("b_stalled", self.b_stalled)
        add("jac_frobenius", self.jac_frobenius)
        return out

    def to_dict(self) -> Dict[str, float]:
        """Summary as Python floats (one host read): :meth:`means`, the largest step count, the
        forward limit used and the JR weight."""
        means = self.means()
        if self.f_steps.numel():
            means["f_steps_max"] = self.f_steps.detach().float().max()
        out = dict(zip(means, torch.stack(list(means.values())).tolist())) if means else {}
        out["f_max_iter"] = float(self.f_max_iter)
        out["jac_weight"] = float(self.jac_weight)
        return out

    def detach(self) -> "DEQStats":
        """A copy holding no autograd graph (safe to keep, deep-copy or pickle)."""
        out = copy.copy(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(out, f.name, value.detach())
        if self.correction_states is not None:
            out.correction_states = [_map_state(torch.Tensor.detach, s) for s in self.correction_states]
        return out

    def __deepcopy__(self, memo: Dict[int, Any]) -> "DEQStats":
        out = self.detach()
        for f in fields(out):
            value = getattr(out, f.name)
            if isinstance(value, torch.Tensor):
                setattr(out, f.name, value.clone())
        if out.correction_states is not None:
            out.correction_states = [_map_state(torch.Tensor.clone, s) for s in out.correction_states]
        return out


def _map_state(fn: Any, state: State) -> State:
    """``fn`` applied to each tensor of a state, keeping its structure."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    return type(state)(fn(t) for t in state)


def _deprecated(old: str, new: str) -> None:
    warn_user(f"DEQStats.{old} is deprecated and will be removed in the next release; use {new}", FutureWarning)


class DEQStatsMeter:
    """Running means of the statistics of many passes, kept on the device and read only by
    :meth:`summary` (no host read per pass), for a training loop's or an evaluation's log.
    The JR estimate is averaged over the passes where it ran; ``jac_steps`` is that share."""

    KEYS = ("f_steps", "f_abs_res", "f_rel_res", "f_stalled", "f_diverged", "b_steps", "b_abs_res", "b_rel_res",
            "b_stalled", "b_diverged", "jac_frobenius")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every pass."""
        self._sums: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None

    def update(self, stats: DEQStats) -> None:
        """Add one pass (after its backward, so that the backward solve is counted too).

        Args:
            stats: the pass's statistics.
        """
        means = stats.means()
        zero = stats.f_abs_res.new_zeros((), dtype=torch.float32)
        vec = torch.stack([means.get(k, zero) for k in self.KEYS])
        cnt = torch.tensor([float(k in means) for k in self.KEYS], device=vec.device)
        if self._sums is None:
            self._sums, self._counts = vec, cnt
        else:
            self._sums, self._counts = self._sums + vec, self._counts + cnt

    def state(self) -> Optional[torch.Tensor]:
        """Sums and counts as one tensor (for an all-reduce across processes)."""
        return None if self._sums is None else torch.cat([self._sums, self._counts])

    def summary(self, state: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """The means as Python floats (one host read).

        Args:
            state: a :meth:`state` summed over processes (default: this meter's own).

        Returns:
            every key of ``KEYS`` (NaN when unseen, e.g. no backward solve while pretraining,
            so that per-epoch rows keep their columns) and ``jac_steps``; empty before any pass.
        """
        state = self.state() if state is None else state
        if state is None:
            return {}
        n = len(self.KEYS)
        sums, counts = state[:n].tolist(), state[n:].tolist()
        out = {k: s / c if c > 0 else float("nan") for k, s, c in zip(self.KEYS, sums, counts)}
        out["jac_steps"] = counts[-1] / max(counts[0], 1.0)
        return out
