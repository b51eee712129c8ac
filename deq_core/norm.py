"""DEQ weight normalization, computed once per equilibrium pass rather than per solver step."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Tuple, Type

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm, weight_norm

__all__ = ["apply_weight_norm", "remove_weight_norm", "DEFAULT_WEIGHT_NORM_TYPES"]

DEFAULT_WEIGHT_NORM_TYPES: Tuple[Type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def apply_weight_norm(module: nn.Module, types: Iterable[Type[nn.Module]] = DEFAULT_WEIGHT_NORM_TYPES,
                      name: str = "weight", dim: int = 0) -> nn.Module:
    """Reparametrize ``name`` of ``module`` and of every submodule of one of ``types`` as
    ``g * v / ||v||`` (norm over all dimensions but ``dim``), with ``g`` initialised to ``||v||``.

    This is torch's ``weight_norm`` parametrization; inside a :class:`~deq_core.DEQLayer` the
    normalized weights are computed once per forward pass and shared by all solver iterations
    (through ``torch.nn.utils.parametrize.cached``). Returns ``module``.
    """
    types = tuple(types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"types must be nn.Module subclasses, got {types!r}")
    targets = [m for m in module.modules() if isinstance(m, types)]
    if not targets:
        raise ValueError(f"no submodule of {type(module).__name__} is one of {[t.__name__ for t in types]}")
    for m in targets:
        if parametrize.is_parametrized(m, name):
            raise ValueError(f"{type(m).__name__}.{name} is already parametrized")
        if not isinstance(getattr(m, name, None), nn.Parameter):
            raise ValueError(f"{type(m).__name__} has no parameter named {name!r}")
        weight_norm(m, name=name, dim=dim)
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Fold every weight-norm parametrization back into a plain weight (the inverse of
    :func:`apply_weight_norm`, keeping the current normalized values).

    Other parametrizations (spectral norm) are left alone; a weight holding weight norm together
    with another parametrization raises ``ValueError``.

    Args:
        module: the module whose submodules are searched.
        name: the parametrized parameter's name.

    Returns:
        ``module``.
    """
    return _fold_parametrizations(module, name, _WeightNorm, "weight norm")


def _describe(parametrizations: Iterable[nn.Module]) -> str:
    """The parametrizations' class names, comma-separated, for error messages."""
    return ", ".join(type(p).__name__ for p in parametrizations)


def _fold_parametrizations(module: nn.Module, name: str, kind: Type[nn.Module], label: str,
                           context: Callable[[nn.ModuleList], ContextManager] = lambda _: contextlib.nullcontext(),
                           ) -> nn.Module:
    """Fold every parametrization of type ``kind`` of ``name`` in ``module``'s submodules back into
    a plain weight (keeping its current value, computed inside ``context(parametrizations)``);
    weights parametrized otherwise are left alone, and a weight holding ``kind`` together with
    another parametrization raises ``ValueError`` (``label`` names ``kind`` there). Returns ``module``."""
    for m in list(module.modules()):
        if not parametrize.is_parametrized(m, name):
            continue
        plist = m.parametrizations[name]
        if not any(isinstance(p, kind) for p in plist):
            continue
        if len(plist) != 1:
            raise ValueError(f"{type(m).__name__}.{name} holds {label} with other parametrizations "
                             f"({_describe(plist)}); remove them with "
                             "torch.nn.utils.parametrize.remove_parametrizations")
        with context(plist):
            parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return module
