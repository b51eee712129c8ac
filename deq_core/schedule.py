"""The training-step schedule of an equilibrium layer: the optimizer step count and epoch that
drive pretraining, the JR schedule and the per-step random decisions.

A layer learns its step count in one of three ways: the training loop tells it
(``set_num_updates``, as fairseq's trainer and ``timm_deq.train`` do, which then takes
precedence), it counts the steps of the optimizers holding its parameters (one global optimizer
step post-hook, registered when the first layer is built, tells every live layer holding a
parameter of the stepping optimizer), or a state dict gives it (the layer's ``schedule_state``
buffer, ``(num_updates, epoch or -1)``, which an EMA copy of a trained model also carries).
"""
from __future__ import annotations

import weakref
import zlib
from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from ._warn import warn_user

if TYPE_CHECKING:
    from .config import DEQConfig

__all__ = ["StepSchedule", "follow_optimizer_steps"]

# Training passes without any counted step after which a layer whose config depends on the step
# (pretraining, a JR schedule) warns that the step never advanced.
STEPLESS_PASSES_WARNING = 100

_LAYERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_HANDLE: Optional[RemovableHandle] = None


def follow_optimizer_steps(layer: Any) -> None:
    """Have ``layer._optimizer_stepped()`` called after each step of an optimizer holding one of
    its parameters (the layer is held weakly).

    Args:
        layer: a module with an ``_optimizer_stepped()`` method.
    """
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


class StepSchedule:
    """The step count, the epoch and the calls within the current step, kept as Python values so
    that a forward pass reads nothing back from the device; the layer's ``schedule_state`` buffer
    mirrors them (every method that changes them takes it)."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.num_updates = 0
        self.epoch: Optional[int] = None
        self.calls = 0
        self.stepless_passes = 0  # training passes before the first counted step; -1 after it
        self.explicit = False  # set_num_updates() was called: optimizer steps no longer count
        self.trained_since_step = False
        self.epoch_warned = False
        self._seen = _key(buffer)  # the buffer's (id, version) when last read or written

    def set_step(self, buffer: torch.Tensor, num_updates: int, explicit: bool = False) -> None:
        """Move to step ``num_updates`` (told by the loop when ``explicit``)."""
        self.explicit = self.explicit or explicit
        self.num_updates = num_updates
        self.calls = 0
        self.stepless_passes = -1
        buffer[0] = num_updates
        self._seen = _key(buffer)

    def set_epoch(self, buffer: torch.Tensor, epoch: int) -> None:
        """Move to epoch ``epoch``."""
        self.epoch = epoch
        buffer[1] = epoch
        self._seen = _key(buffer)

    def optimizer_stepped(self, buffer: torch.Tensor) -> None:
        """An optimizer holding the layer's parameters stepped: count it once per step that
        followed a training pass, unless the loop tells the step itself."""
        if self.explicit or not self.trained_since_step:
            return
        self.trained_since_step = False
        self.set_step(buffer, self.num_updates + 1)

    def read(self, buffer: torch.Tensor, force: bool = False) -> None:
        """Take the step and epoch from the buffer when something else wrote it since (a state
        dict, an EMA update of a copy), or always with ``force``."""
        if not force and _key(buffer) == self._seen:
            return
        updates, epoch = (int(v) for v in buffer.tolist())
        if updates != self.num_updates:
            self.calls = 0
        self.num_updates, self.epoch = updates, (None if epoch < 0 else epoch)
        self._seen = _key(buffer)

    def draw(self, config: "DEQConfig", name: str) -> Tuple[bool, int]:
        """This training call's random decisions (JR on?, forward-limit reduction), a function of
        (seed, name, step, call within step) only, so every process of a distributed run agrees
        and two layers named differently draw independently."""
        self.trained_since_step = True
        if self.stepless_passes >= 0:
            self._warn_if_stepless(config)
        if config.jac_stop_epoch is not None and self.epoch is None and not self.epoch_warned:
            self.epoch_warned = True
            warn_user(
                f"jac_stop_epoch={config.jac_stop_epoch} switches JR off from that epoch on, and this layer has not "
                "been told the epoch (set_epoch() was never called), so JR stays on. Call layer.set_epoch(epoch) at "
                "the start of each epoch (timm_deq.set_deq_step(model, step, epoch) for a whole model; "
                "timm_deq.train and fairseq's deq_language_modeling task do), or use jac_stop_step",
                RuntimeWarning)
        salt = zlib.crc32(name.encode())  # not hash(): that one differs between processes
        key = (((config.seed * 1_000_003 + salt) * 1_000_033 + self.num_updates) * 1_000_037
               + self.calls) % (2 ** 62)
        self.calls += 1
        u = torch.rand(2, generator=torch.Generator().manual_seed(key)).tolist()
        return u[0] < config.jac_freq, int(u[1] * (config.f_max_iter_jitter + 1))

    def _warn_if_stepless(self, config: "DEQConfig") -> None:
        self.stepless_passes += 1
        stepped = config.pretrain_steps > 0 or (config.jac_increment_every > 0 and config.jac_weight_increment > 0) \
            or config.jac_stop_step is not None
        if stepped and self.stepless_passes == STEPLESS_PASSES_WARNING:
            warn_user(
                f"DEQLayer has run {self.stepless_passes} training passes, set_num_updates() was never "
                "called and no optimizer holding the layer's parameters has stepped, so the step count is "
                f"still {self.num_updates}: pretraining (pretrain_steps={config.pretrain_steps}) and the JR "
                "schedule do not advance. Call set_num_updates(step) once per optimizer step (fairseq's "
                "trainer and timm_deq.train do), or step an optimizer that holds the layer's parameters",
                RuntimeWarning)


def _key(buffer: torch.Tensor) -> Tuple[int, int]:
    return id(buffer), buffer._version
