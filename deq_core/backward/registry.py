"""Name -> backward mode registry (``DEQConfig.backward``)."""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Type

from .base import BackwardMode

__all__ = ["register_backward", "unregister_backward", "get_backward", "list_backward_modes"]

_MODES: Dict[str, Type[BackwardMode]] = {}


def register_backward(name: str, *, overwrite: bool = False) -> Callable[[Type[BackwardMode]], Type[BackwardMode]]:
    """Class decorator registering a :class:`BackwardMode` subclass under ``name``, the value of
    ``DEQConfig.backward`` (and of the command lines' ``--backward``) that selects it.

    Args:
        name: the mode's name.
        overwrite: replace a mode registered under ``name`` already.

    Returns:
        a decorator that returns the class, its ``name`` set.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backward mode name must be a non-empty string, got {name!r}")

    def deco(cls: Type[BackwardMode]) -> Type[BackwardMode]:
        if not (isinstance(cls, type) and issubclass(cls, BackwardMode)):
            raise TypeError(f"register_backward({name!r}) takes a BackwardMode subclass, got {cls!r}")
        if name in _MODES and not overwrite:
            raise ValueError(f"a backward mode named {name!r} is already registered; pass overwrite=True")
        cls.name = name
        _MODES[name] = cls
        return cls

    return deco


def unregister_backward(name: str) -> None:
    """Remove the backward mode registered under ``name`` (an unknown name raises)."""
    get_backward(name)
    del _MODES[name]


def get_backward(name: str) -> Type[BackwardMode]:
    """The mode class registered under ``name``; an unknown name raises listing the registered ones."""
    if name not in _MODES:
        raise ValueError(f"unknown backward mode {name!r}; registered: {list(list_backward_modes())}")
    return _MODES[name]


def list_backward_modes() -> Tuple[str, ...]:
    """The registered backward mode names, in registration order (the built-in ones first)."""
    return tuple(_MODES)
