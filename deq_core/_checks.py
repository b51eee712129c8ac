"""Checks of how a DEQLayer is called: unsupported calling patterns, inputs, and a JR term that
never reaches the loss."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from ._warn import warn_user
from .state import State, StateSpec


def check_calling_pattern(layer: nn.Module, grad: bool) -> None:
    """Refuse nn.DataParallel replicas and a forward inside a backward pass (checkpointing)."""
    if getattr(layer, "_is_replica", False):  # what nn.DataParallel's replicate() sets
        raise RuntimeError(
            "DEQLayer does not support nn.DataParallel: its (z, DEQStats) output cannot be gathered "
            "and the replicas' statistics never reach the wrapped module. Use "
            "torch.nn.parallel.DistributedDataParallel (one process per GPU, e.g. torchrun), which "
            "both plugins' training entry points support")
    if grad and torch._C._current_graph_task_id() != -1:  # autograd is running a backward in this thread
        raise RuntimeError(
            "DEQLayer ran its forward inside a backward pass, which is what torch.utils.checkpoint "
            "does when it recomputes a checkpointed region: with use_reentrant=True the first "
            "forward ran without gradients, so the JR term was lost; with use_reentrant=False the "
            "whole solve would be recomputed for every vector-Jacobian product of the backward "
            "solve. Checkpointing is not supported around a DEQLayer and not needed for it: the "
            "implicit backward keeps one application of f, whatever the number of solver steps. "
            "Checkpoint the modules before and after the layer instead")


def check_finite(inputs: Sequence[Any], kwargs: Mapping[str, Any], z0: Optional[State]) -> None:
    """Raise naming every floating-point input (and z0) holding NaN or inf (one host read)."""
    named: Dict[str, torch.Tensor] = {}
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            named[f"input {i}"] = x
    for k, x in kwargs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            named[f"keyword input {k!r}"] = x
    if z0 is not None:
        for i, x in enumerate(z0 if isinstance(z0, (list, tuple)) else (z0,)):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                named[f"z0[{i}]"] = x
    if not named:
        return
    flags = torch.stack([torch.isfinite(x).all() for x in named.values()])
    if bool(flags.all()):
        return
    bad = [name for name, ok in zip(named, flags.tolist()) if not ok]
    raise ValueError(f"non-finite values (NaN or inf) in {', '.join(bad)} of the equilibrium layer")


def check_z0(spec: StateSpec, inputs: Sequence[Any]) -> None:
    """A given z0 must share the batch size and (outside autocast) the dtype of the first
    floating-point input (the tensor the default z0 is shaped like), or f would fail on it
    without naming it."""
    first = next((i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()
                  and x.dim() >= 1), None)
    if first is None:
        return
    x = inputs[first]
    if x.shape[0] != spec.sample_shape[0]:
        raise ValueError(f"z0 has batch size {spec.sample_shape[0]} but input {first} of the equilibrium layer has "
                         f"{x.shape[0]}: pass z0 with the inputs' batch size (or omit it for the default)")
    if x.dtype != spec.dtype and not torch.is_autocast_enabled(x.device.type):  # autocast casts the inputs
        raise TypeError(f"z0 has dtype {spec.dtype} but input {first} of the equilibrium layer has {x.dtype}: f runs "
                        "in the state's dtype, so pass z0 in the inputs' dtype (autocast still runs f in half "
                        "precision)")


class JRWatch:
    """Whether a backward pass reaches a training pass's output but not its JR term (the loss
    left the term out), reported once per layer."""

    def __init__(self) -> None:
        self._reached: Optional[Dict[str, bool]] = None
        self.warned = False

    def start(self, out: torch.Tensor, jac: Optional[torch.Tensor]) -> None:
        """Watch this pass's output and JR estimate (nothing to watch without either)."""
        self._reached = None
        if jac is None or not out.requires_grad:
            return
        reached = self._reached = {"output": False, "jr": False}
        out.register_hook(lambda grad: reached.__setitem__("output", True))
        jac.register_hook(lambda grad: reached.__setitem__("jr", True))

    def check(self) -> None:
        """After the backward of the watched pass (at the next step or pass): warn once if it
        reached the output and not the JR term."""
        reached, self._reached = self._reached, None
        if reached is None or not reached["output"] or reached["jr"] or self.warned:
            return
        self.warned = True
        warn_user(
            "DEQLayer computed the Jacobian-regularization term in training, and a backward pass reached "
            "the layer's output but not the JR term: the loss does not include it, so JR has no effect "
            "and only costs time. Add stats.jr_term to the loss (timm models: model.deq_stats.jr_term, "
            "or train with python -m timm_deq.train / timm_deq.DEQClassificationTask; fairseq: "
            "--criterion cross_entropy_jr or adaptive_loss_jr), or set jac_weight=0 to turn JR off",
            RuntimeWarning)
