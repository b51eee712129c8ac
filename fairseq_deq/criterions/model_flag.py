"""The model a JR criterion serves, read from fairseq's config when the criterion is built."""
# No ``from __future__ import annotations`` here: fairseq reads the dataclass field types at run time.
from dataclasses import dataclass
from typing import Any, Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.models import ARCH_MODEL_REGISTRY
from omegaconf import II

from deq_core import UsageError

__all__ = ["ModelFlag", "check_model_returns_deq_stats"]


@dataclass
class ModelFlag(FairseqDataclass):
    """fairseq's ``--arch`` (``model._name``), mirrored into a criterion config so that it can check it."""

    arch: Optional[str] = II("model._name")


def check_model_returns_deq_stats(cfg: Any, criterion: str) -> None:
    """Refuse, before any data loads, a model class that does not return DEQ statistics.

    Args:
        cfg: a criterion config holding :class:`ModelFlag`'s field (missing or unresolved: no check).
        criterion: the criterion's name, for the message.

    Raises:
        UsageError: the architecture's model class lacks ``returns_deq_stats = True``.
    """
    try:
        arch = getattr(cfg, "arch", None)
    except Exception:  # an interpolation that cannot resolve outside fairseq-train's config
        return
    model = ARCH_MODEL_REGISTRY.get(arch) if isinstance(arch, str) else None
    if model is not None and not getattr(model, "returns_deq_stats", False):
        raise UsageError(f"--criterion {criterion} needs a model whose decoder returns DEQ statistics "
                         f"(--arch deq_transformer_lm*, or a model class with returns_deq_stats = True), got --arch "
                         f"{arch}: use the criterion without _jr")
