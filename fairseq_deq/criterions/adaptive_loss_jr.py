"""``adaptive_loss_jr``: fairseq's adaptive-softmax loss plus the equilibrium layer's JR term."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.adaptive_loss import AdaptiveLoss, AdaptiveLossConfig

from deq_core import UsageError

from ..precision import PrecisionFlags, check_precision_flags
from .deq_terms import add_correction_terms, add_deq_terms, reduce_deq_metrics, warn_if_jr_is_off
from .model_flag import ModelFlag, check_model_returns_deq_stats

__all__ = ["AdaptiveLossJR", "AdaptiveLossJRConfig"]


@dataclass
class AdaptiveLossJRConfig(AdaptiveLossConfig, PrecisionFlags, ModelFlag):
    """``adaptive_loss``'s options; the precision flags and ``--arch`` are fairseq's own,
    read for checks."""


@register_criterion("adaptive_loss_jr", dataclass=AdaptiveLossJRConfig)
class AdaptiveLossJR(AdaptiveLoss):
    """Adaptive-softmax loss (summed over tokens, as fairseq's ``adaptive_loss``) + sample size x
    JR term, with fixed-point correction when the model's layer returns correction states; logs the forward/backward solver steps and residuals and the JR estimate.

    Like ``adaptive_loss`` it needs ``--ddp-backend legacy_ddp`` (checked when it is built), and
    it computes summed losses only (``reduce=True``): the clusters' per-token losses have
    different lengths. Precision flags that cannot run on this device are refused
    (:func:`~fairseq_deq.precision.check_precision_flags`).
    """

    _jr_checked = False  # whether the first training pass looked for a JR weight

    @classmethod
    def build_criterion(cls, cfg: AdaptiveLossJRConfig, task):
        """fairseq's factory: the criterion for ``cfg`` and ``task``."""
        check_precision_flags(cfg)
        check_model_returns_deq_stats(cfg, "adaptive_loss_jr")
        return super().build_criterion(cfg, task)

    def forward(self, model, sample: Dict[str, Any], reduce: bool = True) -> Tuple[torch.Tensor, int, Dict[str, Any]]:
        """fairseq's adaptive loss of ``sample`` plus the JR term; returns (loss, sample size, logging output)."""
        if not reduce:
            raise ValueError("adaptive_loss_jr computes the summed loss only (reduce=True)")
        adaptive_softmax = getattr(model.decoder, "adaptive_softmax", None)
        if adaptive_softmax is None:
            raise UsageError("--criterion adaptive_loss_jr needs a model with an adaptive softmax: set "
                             "--adaptive-softmax-cutoff, or use --criterion cross_entropy_jr")
        if model.training and not self._jr_checked:
            self._jr_checked = True
            warn_if_jr_is_off(model, "adaptive_loss_jr")
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)
        nsentences = target.size(0)
        target = target.reshape(-1)
        loss = self._summed_loss(adaptive_softmax, net_output[0], target)
        ntokens = utils.strip_pad(target, self.padding_idx).numel()
        sample_size = nsentences if self.sentence_avg else ntokens
        logging_output = {
            "loss": loss.data,
            "ntokens": ntokens,
            "nsentences": nsentences,
            "sample_size": sample_size,
        }
        loss = add_correction_terms(loss, net_output, model.decoder,
                                    lambda features: self._summed_loss(adaptive_softmax, features, target),
                                    logging_output)
        loss = add_deq_terms(loss, net_output, sample_size, logging_output, "adaptive_loss_jr")
        return loss, sample_size, logging_output

    def _summed_loss(self, adaptive_softmax, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The adaptive softmax's summed cross entropy of ``features`` against the flat ``target``."""
        logits, targets = adaptive_softmax(features, target)
        loss = features.new_zeros(1)
        for cluster_logits, cluster_target in zip(logits, targets):
            if cluster_target is not None:
                loss = loss + F.cross_entropy(cluster_logits, cluster_target, ignore_index=self.padding_idx,
                                              reduction="sum")
        return loss

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict[str, Any]]) -> None:
        """fairseq's metrics of the adaptive loss, then the solver and JR metrics."""
        AdaptiveLoss.reduce_metrics(logging_outputs)
        reduce_deq_metrics(logging_outputs)
