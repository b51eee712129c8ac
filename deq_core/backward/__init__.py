"""Backward modes: how a forward pass of a DEQLayer gets its gradient.

Each mode is a :class:`~deq_core.BackwardMode` subclass registered by name (``DEQConfig.backward``);
the built-in ones are ``implicit`` (:class:`~deq_core.ImplicitBackward`), ``phantom``
(:class:`~deq_core.PhantomBackward`), ``unrolled`` (:class:`~deq_core.UnrolledBackward`, also
every pretraining pass) and ``reversible`` (:class:`~deq_core.ReversibleBackward`). A user's own mode is a subclass registered with
:func:`~deq_core.register_backward`, selected by its name like the built-in ones.
"""
from .base import BackwardMode, ForwardPass, SolvingMode
from .registry import get_backward, list_backward_modes, register_backward, unregister_backward
from .implicit import ImplicitBackward  # noqa: E402 (registers "implicit", after the registry)
from .phantom import PhantomBackward  # noqa: E402
from .unrolled import UnrolledBackward  # noqa: E402
from .reversible import ReversibleBackward  # noqa: E402

__all__ = ["BackwardMode", "SolvingMode", "ForwardPass", "register_backward", "unregister_backward", "get_backward",
           "list_backward_modes", "ImplicitBackward", "PhantomBackward", "UnrolledBackward", "ReversibleBackward"]
