"""timm_deq: multiscale deep equilibrium models (MDEQ) registered with timm.

``import timm_deq`` makes ``timm.create_model('mdeq_small')`` and the other MDEQ variants available
(timm has no plugin discovery). Training: ``python -m timm_deq.train``; evaluation at several
solver limits: ``python -m timm_deq.validate``.
"""
from .models import MDEQ, MultiscaleCell
from .task import DEQClassificationTask, DEQStatsMeter, deq_layers, set_deq_step

__all__ = ['MDEQ', 'MultiscaleCell', 'DEQClassificationTask', 'DEQStatsMeter', 'deq_layers', 'set_deq_step']
