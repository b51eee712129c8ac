"""timm training task for models holding deep equilibrium layers: the classification loss of
timm's criterion plus the layers' Jacobian-regularization term."""
from typing import Dict, List, Optional

import torch
from torch import nn

from timm.task import ClassificationTask
from timm.utils import unwrap_model

from deq_core import DEQLayer, DEQStats, DEQStatsMeter  # noqa: F401  (DEQStatsMeter: re-exported)

__all__ = ['DEQClassificationTask', 'deq_layers', 'set_deq_step', 'DEQStatsMeter']


def deq_layers(model: nn.Module) -> List[DEQLayer]:
    """Every equilibrium layer inside ``model`` (DDP / compile wrappers are looked through)."""
    return [m for m in unwrap_model(model).modules() if isinstance(m, DEQLayer)]


def set_deq_step(model: Optional[nn.Module], num_updates: int, epoch: Optional[int] = None) -> None:
    """Give the optimizer step (and epoch) to every equilibrium layer of ``model``."""
    if model is None:
        return
    for layer in deq_layers(model):
        layer.set_num_updates(num_updates)
        if epoch is not None:
            layer.set_epoch(epoch)


class DEQClassificationTask(ClassificationTask):
    """``ClassificationTask`` whose loss adds ``stats.jr_term`` of each equilibrium layer.

    The criterion stays timm's (label smoothing, soft targets for Mixup/CutMix, BCE...). The result
    dict carries ``task_loss`` (the criterion alone), ``jr_term`` (the layers' JR terms, summed) and
    the layers' ``deq_stats``.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, object]:
        """The model's output, timm's criterion and the layers' JR terms (see the class docstring)."""
        output = self.trainable_module(input)
        task_loss = self.criterion(output, target)
        stats = [layer.stats for layer in deq_layers(self.trainable_module) if layer.stats is not None]
        jr_term = sum((s.jr_term for s in stats), task_loss.new_zeros(()))
        return {
            'loss': task_loss + jr_term,
            'output': output,
            'task_loss': task_loss,
            'jr_term': jr_term,
            'deq_stats': stats,
        }
