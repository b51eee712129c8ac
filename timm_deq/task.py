"""timm training task for models holding deep equilibrium layers: the classification loss of
timm's criterion plus the layers' Jacobian-regularization term (and fixed-point correction)."""
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from timm.task import ClassificationTask
from timm.utils import unwrap_model

from deq_core import DEQLayer, DEQStats, fixed_point_correction

__all__ = ['DEQClassificationTask', 'deq_layers', 'set_deq_step']


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

    With fixed-point correction on (``--fp-correction-states``/``--fp-correction-steps``) the
    criterion is also applied to the logits of each correction state of the model's equilibrium
    layer, weighted as :func:`deq_core.fixed_point_correction` does (``gamma^(n-1-k)``, the output
    weight 1). The logits of a state come from the model's ``forward_from_deq_state(z)`` (the
    logits ``forward`` computes from the layer's output z), which the model must define; a model
    with more than one layer holding correction states is refused. ``correction_term`` in the
    result is what correction added to the criterion (0 when off).
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, object]:
        """The model's output, timm's criterion and the layers' JR terms (see the class docstring)."""
        output = self.trainable_module(input)
        task_loss = self.criterion(output, target)
        stats = [layer.stats for layer in deq_layers(self.trainable_module) if layer.stats is not None]
        jr_term = sum((s.jr_term for s in stats), task_loss.new_zeros(()))
        corrected = self._corrected_loss(output, target, task_loss, stats)
        return {
            'loss': corrected + jr_term,
            'output': output,
            'task_loss': task_loss,
            'jr_term': jr_term,
            'correction_term': (corrected - task_loss).detach() if corrected is not task_loss
            else task_loss.new_zeros(()),
            'deq_stats': stats,
        }

    def _corrected_loss(self, output: torch.Tensor, target: torch.Tensor, task_loss: torch.Tensor,
                        stats: List[DEQStats]) -> torch.Tensor:
        """The criterion over the correction states' logits and the output (``task_loss`` itself
        when no layer has correction states this pass)."""
        corrected = [s for s in stats if s.correction_states]
        if not corrected:
            return task_loss
        if len(corrected) > 1:
            raise ValueError(f'fixed-point correction is supported for models with one equilibrium layer; '
                             f'{len(corrected)} layers returned correction states')
        head: Optional[Callable[..., torch.Tensor]] = getattr(
            unwrap_model(self.trainable_module), 'forward_from_deq_state', None)
        if head is None:
            raise ValueError(f'fixed-point correction (fp_correction_states/fp_correction_steps) supervises states '
                             f'of the equilibrium layer, and {type(unwrap_model(self.trainable_module)).__name__} '
                             'has no forward_from_deq_state(z) method mapping such a state to logits; define it '
                             'or turn correction off')
        stat = corrected[0]
        logits = [head(z) for z in stat.correction_states]

        def loss_fn(out: torch.Tensor) -> torch.Tensor:
            return task_loss if out is output else self.criterion(out, target)

        return fixed_point_correction([*logits, output], loss_fn, stat.correction_gamma)
