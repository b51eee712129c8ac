"""Fixed-point correction: a loss over states sampled along the forward solve (Bai et al. 2022)."""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar, Union

import torch

__all__ = ["fixed_point_correction"]

S = TypeVar("S")


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
