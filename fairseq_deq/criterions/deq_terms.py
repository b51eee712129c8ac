"""What the JR criterions add to fairseq's losses: the JR term, fixed-point correction and the
solver metrics."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from fairseq import utils
from fairseq.logging import metrics
from torch import nn

from deq_core import BACKWARD_SUMMARY, DEQLayer, DEQStats, JRSchedule, UsageError, fixed_point_correction

__all__ = ["add_deq_terms", "add_correction_terms", "reduce_deq_metrics", "warn_if_jr_is_off"]

logger = logging.getLogger(__name__)

# logging-output key -> metric name (averaged over "deq_calls"; the backward ones over "deq_b_calls")
_FORWARD = {"deq_f_steps": "f_steps", "deq_f_abs_res": "f_abs_res", "deq_f_rel_res": "f_rel_res",
            "deq_f_stalled": "f_stalled", "deq_f_diverged": "f_diverged"}
_BACKWARD = BACKWARD_SUMMARY[1:]


def _decimals(name: str) -> int:
    """Residuals (often 1e-4 or below) keep 6 decimals in the logs, counts and fractions 3."""
    return 6 if name.endswith("_res") else 3


def add_deq_terms(loss: torch.Tensor, net_output: Tuple[Any, Dict[str, Any]], sample_size: int,
                  logging_output: Dict[str, Any], criterion: str, reduce: bool = True) -> torch.Tensor:
    """Return ``loss + sample_size * stats.jr_term`` and add the solver statistics to ``logging_output``
    (an unreduced, per-token loss is returned as it is: JR is a term of the summed training loss).

    fairseq's losses are sums over tokens (or sentences with ``--sentence-avg``) that the trainer
    divides by the summed sample size, so the JR term is scaled by the sample size: after the
    division the gradient is that of ``mean loss + gamma * JR`` (the paper's objective), also
    across data-parallel workers. Values stay on the device; they are read when logged.

    A pass with fixed-point correction states raises unless :func:`add_correction_terms` ran on
    this ``logging_output`` first (the states would cost memory and supervise nothing).
    """
    extra = net_output[1] if len(net_output) > 1 else None
    stats = extra.get("deq_stats") if isinstance(extra, dict) else None
    if not isinstance(stats, DEQStats):
        raise UsageError(f"--criterion {criterion} needs a model whose decoder returns DEQ statistics "
                         f"(--arch deq_transformer_lm*); use the criterion without _jr for other models")
    if stats.correction_states and "deq_fp_correction_calls" not in logging_output:
        raise UsageError(f"--criterion {criterion} applies fixed-point correction to summed losses (reduce=True) "
                         f"only, and this pass returned {len(stats.correction_states)} correction states "
                         "(--fp-correction-states/--fp-correction-steps) that no loss would use; turn correction off")
    out = logging_output
    means = stats.means()
    out["deq_calls"] = 1
    out.update({key: means[name] for key, name in _FORWARD.items() if name in means})
    backward = extra.get("deq_backward")
    if backward is not None:
        # Views of a vector the implicit backward pass fills in before the trainer reads them.
        names = ("b_calls",) + _BACKWARD
        out.update({"deq_" + name: value for name, value in zip(names, backward.unbind(0))})
    if stats.jac_frobenius is not None:
        out["deq_jr_calls"] = 1
        out["deq_jr"] = means["jac_frobenius"]
        out["deq_jr_weight"] = float(stats.jac_weight)
        if reduce:
            loss = loss + stats.jr_term * sample_size
    return loss


def warn_if_jr_is_off(model: nn.Module, criterion: str) -> bool:
    """Log a warning when no equilibrium layer of ``model`` ever runs JR (its weight is 0 at every
    step, or ``jac_freq`` is 0), so the JR criterion adds nothing; returns whether it warned."""
    layers = [m for m in model.modules() if isinstance(m, DEQLayer)]
    off = [layer for layer in layers
           if JRSchedule.from_config(layer.config).always_zero or layer.config.jac_freq == 0]
    if not layers or len(off) < len(layers):
        return False
    c = off[0].config
    logger.warning(f"--criterion {criterion} adds no JR term: the model's JR weight is 0 at every step "
                   f"(--jac-weight {c.jac_weight}, --jac-weight-increment {c.jac_weight_increment}, --jac-freq "
                   f"{c.jac_freq}); give --jac-weight (the paper's WikiText-103 models: 1.9)")
    return True


def add_correction_terms(loss: torch.Tensor, net_output: Tuple[Any, Dict[str, Any]], decoder: Any,
                         loss_of_features: Callable[[torch.Tensor], torch.Tensor],
                         logging_output: Dict[str, Any], reduce: bool = True) -> torch.Tensor:
    """Fixed-point correction of a summed loss: ``loss`` (of the output) plus
    ``gamma^(n-1-k) loss_of_features(decoder.features_from_deq_state(z_k))`` for each correction
    state z_k of the pass (:func:`deq_core.fixed_point_correction`); ``loss`` itself when the
    pass has none (correction off, evaluation, pretraining) or for an unreduced loss.

    Args:
        loss: the criterion's summed loss of the decoder's output.
        net_output: the model's ``(x, extra)``, ``extra["deq_stats"]`` the layer's statistics.
        decoder: the model's decoder; ``features_from_deq_state(z)`` must give, from a state of
            its equilibrium layer, the features ``extract_features`` gives from the fixed point
            (the final LayerNorm of a pre-LN model, the output dropout).
        loss_of_features: the criterion's summed loss of such features (output layer included).
        logging_output: gets ``deq_fp_correction`` (what correction added, detached).
        reduce: whether ``loss`` is summed.

    Returns:
        the corrected loss.
    """
    extra = net_output[1] if len(net_output) > 1 else None
    stats = extra.get("deq_stats") if isinstance(extra, dict) else None
    if not reduce or not isinstance(stats, DEQStats) or not stats.correction_states:
        return loss
    features_of = getattr(decoder, "features_from_deq_state", None)
    if features_of is None:
        raise UsageError(f"fixed-point correction (--fp-correction-states/--fp-correction-steps) needs "
                         f"{type(decoder).__name__}.features_from_deq_state(z), the decoder's features of a state "
                         "of its equilibrium layer; turn correction off for this model")
    features = [features_of(z) for z in stats.correction_states]

    def loss_fn(item: Optional[torch.Tensor]) -> torch.Tensor:
        return loss if item is None else loss_of_features(item)

    total = fixed_point_correction([*features, None], loss_fn, stats.correction_gamma)
    logging_output["deq_fp_correction_calls"] = 1
    logging_output["deq_fp_correction"] = (total - loss).detach()
    return total


def reduce_deq_metrics(logging_outputs: Sequence[Dict[str, Any]]) -> None:
    """Log averages of the solver statistics (summed over workers and micro-batches): the
    forward and backward solves', the fixed-point correction's, and JR's (``jr``, ``jr_weight``:
    the mean over the passes that ran JR, or the latest when none did; ``jr_passes``: how many
    passes ran it)."""
    def total(key: str) -> float:
        return float(utils.item(sum(log.get(key, 0) for log in logging_outputs)))

    calls = total("deq_calls")
    if calls > 0:
        for key, name in _FORWARD.items():
            if any(key in log for log in logging_outputs):
                metrics.log_scalar(name, total(key) / calls, calls, round=_decimals(name))
    b_calls = total("deq_b_calls")
    if b_calls > 0:
        for name in _BACKWARD:
            metrics.log_scalar(name, total("deq_" + name) / b_calls, b_calls, round=_decimals(name))
    fp_calls = total("deq_fp_correction_calls")
    if fp_calls > 0:
        # Per unit of sample size, as fairseq's loss (in nats, not bits).
        size = max(total("sample_size"), 1.0)
        metrics.log_scalar("fp_correction", total("deq_fp_correction") / size, size, round=4)
    jr_calls = total("deq_jr_calls")
    if b_calls > 0 or jr_calls > 0:  # training passes
        metrics.log_scalar_sum("jr_passes", jr_calls, round=0)
    if jr_calls > 0:
        metrics.log_scalar("jr", total("deq_jr") / jr_calls, jr_calls, round=4)
        metrics.log_scalar("jr_weight", total("deq_jr_weight") / jr_calls, jr_calls, round=3)
    else:
        # fairseq prints a meter that got no value since its last reset (a log interval without
        # JR) as None; a zero-weight update, as fairseq's own loss_scale, shows the latest
        # estimate there without entering any average.
        for name in ("jr", "jr_weight"):
            latest = next((agg[name].val for agg in metrics.get_active_aggregators()
                           if name in agg and getattr(agg[name], "val", None) is not None), None)
            if latest is not None:
                metrics.log_scalar(name, latest, weight=0, round=4 if name == "jr" else 3)

