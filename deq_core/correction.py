"""Fixed-point correction (Bai et al. 2022, DEQ optical flow): states along the forward solve,
recorded without touching the solver, supervised besides the output."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import torch

from .backward.chain import damped_chain
from .solvers import SolverResult
from .state import State

if TYPE_CHECKING:
    from .config import DEQConfig
    from .flat_map import FlatMap

__all__ = ["fixed_point_correction", "correction_steps", "CORRECTION_FIELDS", "StepRecorder"]

S = TypeVar("S")

#: The config fields of fixed-point correction; the first two turn it on.
CORRECTION_FIELDS = ("fp_correction_states", "fp_correction_steps", "fp_correction_gamma")
#: The fields its states' phantom chains read besides its own.
CHAIN_FIELDS = ("phantom_steps", "phantom_damping")


def fixed_point_correction(states: Sequence[S], loss_fn: Callable[[S], torch.Tensor],
                           gamma: float) -> Union[torch.Tensor, float]:
    """The correction loss ``sum_k gamma^(n-1-k) loss_fn(states[k])`` over the n states.

    Args:
        states: the supervised states in solver order, the layer's output last: usually
            ``[*stats.correction_states, output]`` (or the model outputs computed from them).
        loss_fn: the loss of one state (e.g. the criterion of the logits a head computes from it).
        gamma: the geometric weight (``stats.correction_gamma``, from ``DEQConfig.fp_correction_gamma``):
            the last state has weight 1, the one before gamma, and so on.

    Returns:
        the weighted sum; with a single state it is ``loss_fn(states[0])`` itself, the loss
        without correction. Raises ``ValueError`` for an empty ``states``.
    """
    n = len(states)
    if n == 0:
        raise ValueError("fixed_point_correction needs at least one state (the layer's output)")
    total = None
    for k, state in enumerate(states):
        loss = loss_fn(state)
        term = loss if k == n - 1 else gamma ** (n - 1 - k) * loss  # the output's term unscaled
        total = term if total is None else total + term
    return total


def parse_steps(text: str, max_iter: int) -> Tuple[int, ...]:
    """The solver steps of ``fp_correction_steps`` (``"10,20"``; ``""`` for none), checked.

    Args:
        text: the field's value.
        max_iter: the forward limit the steps must lie within.

    Returns:
        the steps, strictly increasing; a malformed text raises ``ValueError``.
    """
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


def correction_steps(config: "DEQConfig", max_iter: int) -> Optional[Tuple[int, ...]]:
    """The solver steps whose states fixed-point correction supervises besides the output.

    Args:
        config: the layer's config.
        max_iter: the forward limit of the pass (``f_max_iter`` less the pass's jitter).

    Returns:
        ``None`` when correction is off; else the increasing steps: ``(i * max_iter) // n`` for
        ``i = 1..n-1`` with ``fp_correction_states = n`` (empty for n = 1), or the
        ``fp_correction_steps`` (some may exceed a jittered limit: those states are z*).
    """
    if config.fp_correction_states:
        n = config.fp_correction_states
        return tuple((i * max_iter) // n for i in range(1, n))
    if config.fp_correction_steps:
        return parse_steps(config.fp_correction_steps, config.f_max_iter)
    return None


class StepRecorder:
    """Wraps the map a solver is given and keeps a detached copy of the argument of its k-th call
    for each requested k (k = 1 is the first call, whose argument is the solver's z0): the
    solver's iterates at those steps, taken without touching the solver. Only the requested
    calls are copied, so it holds ``len(steps)`` states.

    Args:
        steps: the calls to record.
    """

    def __init__(self, steps: Sequence[int]) -> None:
        self.steps = tuple(steps)
        self.wanted = frozenset(steps)
        self.calls = 0
        self.saved: Dict[int, torch.Tensor] = {}

    def wrap(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn``, recording the requested calls' arguments."""
        def recording(z: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls in self.wanted:
                # A copy: solvers update their iterate buffers in place.
                self.saved[self.calls] = z.detach().clone()
            return fn(z)
        return recording

    def state_at(self, step: int, result: SolverResult) -> torch.Tensor:
        """The iterate at ``step`` per sample: the argument of the ``step``-th call where the sample
        was still active then (``result.steps >= step``) and that argument is finite, else the
        sample's z* (``result.z``): the solve, or the sample, stopped before that step."""
        saved = self.saved.get(step)
        if saved is None:
            return result.z.clone()
        keep = (result.steps >= step) & torch.isfinite(saved).all(dim=1)
        return torch.where(keep[:, None], saved, result.z)

    def states(self, fn: "FlatMap", result: SolverResult, config: "DEQConfig") -> List[State]:
        """The supervised states, in the structure and dtype of the layer's output: each the value
        of the iterate at its step exactly, with the gradient of a phantom chain from it
        (``z_k + (z' - stopgrad(z'))``, z' the chain's end)."""
        out = []
        for step in self.steps:
            z_k = self.state_at(step, result)
            end, _, _ = damped_chain(fn, z_k, config.phantom_steps, config.phantom_damping)
            out.append(fn.spec.unpack(z_k + (end - end.detach()), fn.spec.dtype))
        return out
