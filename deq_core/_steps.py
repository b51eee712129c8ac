"""Optimizer steps followed by the equilibrium layers whose parameters they update.

One global optimizer step post-hook (registered when the first layer is built) tells every live
layer holding a parameter of the stepping optimizer that a step happened, so that a training
loop which knows nothing about DEQs still advances pretraining and the JR schedule.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

_LAYERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_HANDLE: Optional[RemovableHandle] = None


def follow_optimizer_steps(layer: Any) -> None:
    """Have ``layer._optimizer_stepped()`` called after each step of an optimizer holding one of
    its parameters (the layer is held weakly)."""
    global _HANDLE
    _LAYERS.add(layer)
    if _HANDLE is None:
        _HANDLE = register_optimizer_step_post_hook(_after_step)


def _after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    layers = list(_LAYERS)
    if not layers:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in layers:
        if any(id(p) in held for p in layer.parameters()):
            layer._optimizer_stepped()
