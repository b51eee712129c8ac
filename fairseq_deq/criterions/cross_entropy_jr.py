"""``cross_entropy_jr``: fairseq's cross entropy plus the equilibrium layer's JR term."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

from ..precision import PrecisionFlags, check_precision_flags
from .deq_terms import add_correction_terms, add_deq_terms, reduce_deq_metrics, warn_if_jr_is_off
from .model_flag import ModelFlag, check_model_returns_deq_stats

__all__ = ["CrossEntropyJRCriterion", "CrossEntropyJRConfig"]


@dataclass
class CrossEntropyJRConfig(CrossEntropyCriterionConfig, PrecisionFlags, ModelFlag):
    """``cross_entropy``'s options; the precision flags and ``--arch`` are fairseq's own,
    read for checks."""


@register_criterion("cross_entropy_jr", dataclass=CrossEntropyJRConfig)
class CrossEntropyJRCriterion(CrossEntropyCriterion):
    """Token-level cross entropy (summed, as fairseq's ``cross_entropy``) + sample size x JR term,
    with fixed-point correction when the model's layer returns correction states; logs the forward/backward solver steps and residuals and the JR estimate. Refuses precision
    flags that cannot run on this device (:func:`~fairseq_deq.precision.check_precision_flags`)."""

    _jr_checked = False  # whether the first training pass looked for a JR weight

    @classmethod
    def build_criterion(cls, cfg: CrossEntropyJRConfig, task):
        """fairseq's factory: the criterion for ``cfg`` and ``task``."""
        check_precision_flags(cfg)
        check_model_returns_deq_stats(cfg, "cross_entropy_jr")
        return super().build_criterion(cfg, task)

    def forward(self, model, sample: Dict[str, Any], reduce: bool = True) -> Tuple[torch.Tensor, int, Dict[str, Any]]:
        """fairseq's cross entropy of ``sample`` (corrected) plus the JR term; returns (loss, sample size, logging output)."""
        if model.training and not self._jr_checked:
            self._jr_checked = True
            warn_if_jr_is_off(model, "cross_entropy_jr")
        net_output = model(**sample["net_input"])
        loss, _ = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        def loss_of_features(features: torch.Tensor) -> torch.Tensor:
            return self.compute_loss(model, (model.decoder.output_layer(features), net_output[1]), sample,
                                     reduce=reduce)[0]

        loss = add_correction_terms(loss, net_output, model.decoder, loss_of_features, logging_output, reduce)
        loss = add_deq_terms(loss, net_output, sample_size, logging_output, "cross_entropy_jr", reduce)
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict[str, Any]]) -> None:
        """fairseq's cross-entropy metrics, then the solver and JR metrics."""
        CrossEntropyCriterion.reduce_metrics(logging_outputs)
        reduce_deq_metrics(logging_outputs)
