"""timm_deq: multiscale deep equilibrium models (MDEQ) registered with timm.

``import timm_deq`` makes ``timm.create_model('mdeq_small')`` and the other MDEQ variants available
(timm has no plugin discovery). Training: ``python -m timm_deq.train``; evaluation at several
solver limits: ``python -m timm_deq.validate``.

Needs timm >= 1.0.27 (the ``timm.task`` API the JR task builds on); the entry points need 1.0.31.
"""
# The first timm release whose ``timm.task.TrainingTask`` holds the model as ``trainable_module``
# (with ``get_trainable_module``), which DEQClassificationTask reads.
TIMM_FOR_MODELS = '1.0.27'


def _check_timm() -> None:
    """Raise an ImportError naming the timm release needed when the installed one lacks a feature."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f'timm_deq needs timm >= {TIMM_FOR_MODELS}, which is not installed: '
                          'pip install "deq-jr[timm]"') from err
    try:
        from timm.task import ClassificationTask, TrainingTask
    except ImportError:
        ClassificationTask = TrainingTask = None
    if ClassificationTask is None or not hasattr(TrainingTask, 'get_trainable_module'):
        raise ImportError(
            f'timm_deq needs timm >= {TIMM_FOR_MODELS} (timm.task.TrainingTask with get_trainable_module, the '
            f'task API its DEQClassificationTask builds on; 1.0.31 for timm_deq.train and timm_deq.validate); '
            f'timm {getattr(timm, "__version__", "?")} is installed. Upgrade with: pip install "timm>=1.0.31,<1.1"')


_check_timm()

from .models import MDEQ, MultiscaleCell  # noqa: E402  (after the check: these import timm)
from deq_core import DEQStatsMeter  # noqa: E402  (the meter timm_deq.train logs with)
from .task import DEQClassificationTask, deq_layers, set_deq_step  # noqa: E402

__all__ = ['MDEQ', 'MultiscaleCell', 'DEQClassificationTask', 'DEQStatsMeter', 'deq_layers', 'set_deq_step']
