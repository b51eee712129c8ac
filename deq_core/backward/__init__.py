"""Backward modes: how a forward pass of a DEQLayer gets its gradient.

Each mode is a :class:`BackwardMode` subclass registered by name (``DEQConfig.backward``); the
built-in ones are ``implicit`` (:class:`ImplicitBackward`), ``phantom`` (:class:`PhantomBackward`)
and ``unrolled`` (:class:`UnrolledBackward`, also every pretraining pass). A user's own mode is a
subclass registered with :func:`register_backward`, selected by its name like the built-in ones.
"""
from .base import BackwardMode, ForwardPass, SolvingMode
from .registry import get_backward, list_backward_modes, register_backward, unregister_backward
from .implicit import ImplicitBackward  # noqa: E402 (registers "implicit", after the registry)
from .phantom import PhantomBackward  # noqa: E402
from .unrolled import UnrolledBackward  # noqa: E402

__all__ = ["BackwardMode", "SolvingMode", "ForwardPass", "register_backward", "unregister_backward", "get_backward",
           "list_backward_modes", "ImplicitBackward", "PhantomBackward", "UnrolledBackward"]
