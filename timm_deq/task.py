"""timm training task for models holding deep equilibrium layers: the classification loss of
timm's criterion plus the layers' Jacobian-regularization term."""
from typing import Dict, List, Optional

import torch
from torch import nn

from timm.task import ClassificationTask
from timm.utils import unwrap_model

from deq_core import DEQLayer, DEQStats

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


class DEQStatsMeter:
    """Running means of solver statistics, kept on the device and read only by :meth:`summary`
    (no host read per step). JR is averaged over the steps where it ran."""

    _KEYS = ('f_steps', 'f_abs_res', 'f_rel_res', 'f_stalled', 'f_diverged', 'b_steps', 'b_abs_res', 'b_rel_res',
             'b_stalled', 'b_diverged', 'jac_frobenius')

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None

    def update(self, stats: DEQStats) -> None:
        means = stats.means()
        zero = stats.f_abs_res.new_zeros((), dtype=torch.float32)
        vec = torch.stack([means.get(k, zero) for k in self._KEYS])
        cnt = torch.tensor([float(k in means) for k in self._KEYS], device=vec.device)
        if self._sums is None:
            self._sums, self._counts = vec, cnt
        else:
            self._sums, self._counts = self._sums + vec, self._counts + cnt

    def state(self) -> Optional[torch.Tensor]:
        """Sums and counts as one tensor (for an all-reduce across processes)."""
        return None if self._sums is None else torch.cat([self._sums, self._counts])

    def summary(self, state: Optional[torch.Tensor] = None) -> Dict[str, float]:
        state = self.state() if state is None else state
        if state is None:
            return {}
        n = len(self._KEYS)
        sums, counts = state[:n].tolist(), state[n:].tolist()
        # Every key every time (NaN when unseen, e.g. no backward solve while pretraining), so
        # per-epoch CSV rows keep the same columns.
        out = {k: s / c if c > 0 else float('nan') for k, s, c in zip(self._KEYS, sums, counts)}
        out['jac_steps'] = counts[-1] / max(counts[0], 1.0)
        return out
