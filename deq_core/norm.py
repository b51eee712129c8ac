"""DEQ weight normalization, computed once per equilibrium pass rather than per solver step."""
from __future__ import annotations

from typing import Iterable, Tuple, Type

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

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

    Args:
        module: the module whose submodules are searched.
        name: the parametrized parameter's name.

    Returns:
        ``module``.
    """
    for m in module.modules():
        if parametrize.is_parametrized(m, name):
            parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return module
