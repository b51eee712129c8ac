"""``deq_language_modeling``: fairseq's language modeling task with segment memory.

Batches stream each row through the corpus contiguously (Transformer-XL's ordered iterator), so
the model's memory of the previous segment carries over between updates and during validation
and ``fairseq-eval-lm``. The memory is reset at the start of every epoch and every validation.
"""
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import torch
from omegaconf import II
from torch import nn

from fairseq.data import iterators
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from deq_core import DEQLayer, DEQStatsMeter, UsageError

from ..data import StreamCollater, segments_per_column, stream_batches
from ..precision import PrecisionFlags, check_precision_flags

logger = logging.getLogger(__name__)

__all__ = ["DEQLanguageModelingTask", "DEQLanguageModelingConfig"]


@dataclass
class DEQLanguageModelingConfig(LanguageModelingConfig, PrecisionFlags):
    """Same options as ``language_modeling``; ``--batch-size`` is the number of parallel streams
    per GPU and ``--tokens-per-sample`` the segment length. The precision, distributed and
    batching flags are fairseq's own, read to refuse combinations that cannot run on this device
    or would evaluate without memory, and to warn of a resume that would fail."""

    # fairseq's flags the task reads: how a checkpoint reaches the other data-parallel ranks,
    # and whether --max-tokens was given.
    distributed_world_size: int = II("distributed_training.distributed_world_size")
    distributed_rank: int = II("distributed_training.distributed_rank")
    load_checkpoint_on_all_dp_ranks: bool = II("checkpoint.load_checkpoint_on_all_dp_ranks")
    max_tokens: Optional[int] = II("dataset.max_tokens")


@register_task("deq_language_modeling", dataclass=DEQLanguageModelingConfig)
class DEQLanguageModelingTask(LanguageModelingTask):
    """Language modeling over contiguous streams, for models with a segment memory."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None) -> None:
        check_precision_flags(args)
        _warn_if_resume_would_fail(args)
        if args.tokens_per_sample < 1:
            raise UsageError(f"--tokens-per-sample must be >= 1, got {args.tokens_per_sample}")
        if str(args.sample_break_mode) != "none":
            raise UsageError("--task deq_language_modeling streams the corpus as one token sequence: "
                             f"use --sample-break-mode none (got {args.sample_break_mode!r})")
        if targets not in (None, ["future"]):
            raise UsageError(f"--task deq_language_modeling predicts the next token only, got targets {targets}")
        super().__init__(args, dictionary, output_dictionary, targets)
        self._models: List["weakref.ref[nn.Module]"] = []

    def build_model(self, cfg: Any, from_checkpoint: bool = False):
        """fairseq's model factory; refuses models without segment memory."""
        model = super().build_model(cfg, from_checkpoint)
        self._models.append(weakref.ref(model))  # for the solver summary of eval_lm_dataloader
        if not getattr(model, "supports_segment_memory", False):
            raise UsageError(f"--task deq_language_modeling feeds a segment memory, which "
                             f"{type(model).__name__} does not have: use --arch deq_transformer_lm* "
                             f"or --task language_modeling")
        return model

    def get_batch_iterator(self, dataset, max_tokens: Optional[int] = None, max_sentences: Optional[int] = None,
                           max_positions=None, ignore_invalid_inputs: bool = False,
                           required_batch_size_multiple: int = 1, seed: int = 1, num_shards: int = 1,
                           shard_id: int = 0, num_workers: int = 0, epoch: int = 1, data_buffer_size: int = 0,
                           disable_iterator_cache: bool = False, skip_remainder_batch: bool = False,
                           grouped_shuffling: bool = False, update_epoch_batch_itr: bool = False):
        """For the task's own splits (training, validation, ``fairseq-eval-lm``), an unshuffled
        iterator whose row ``b`` continues the same text from batch to batch, with segment memory.
        Any other dataset (hub ``score()``/``sample()``, ``fairseq-interactive``: built by
        ``build_dataset_for_inference``) is batched as fairseq's language modeling task does, every
        input on its own, with no memory: unrelated sentences never share context."""
        if not any(ds is dataset for ds in self.datasets.values()):
            return super().get_batch_iterator(
                dataset, max_tokens=max_tokens, max_sentences=max_sentences, max_positions=max_positions,
                ignore_invalid_inputs=ignore_invalid_inputs, required_batch_size_multiple=required_batch_size_multiple,
                seed=seed, num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                data_buffer_size=data_buffer_size, disable_iterator_cache=disable_iterator_cache,
                skip_remainder_batch=skip_remainder_batch, grouped_shuffling=grouped_shuffling,
                update_epoch_batch_itr=update_epoch_batch_itr)
        if not disable_iterator_cache and dataset in self.dataset_to_epoch_iter:
            return self.dataset_to_epoch_iter[dataset]
        streams = self._streams(max_tokens, max_sentences)
        segments = segments_per_column(len(dataset), streams * num_shards)
        key = next((split for split, ds in self.datasets.items() if ds is dataset), "stream")
        logger.info(f"{key}: {streams} streams per shard x {num_shards} shards, {segments} segments "
                    f"of {self.args.tokens_per_sample} tokens each")
        epoch_iter = iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=StreamCollater(dataset, key, segments),
            batch_sampler=stream_batches(len(dataset), streams, num_shards, shard_id),
            seed=seed,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            disable_shuffling=True,
        )
        if not disable_iterator_cache:
            self.dataset_to_epoch_iter[dataset] = epoch_iter
        return epoch_iter

    def _streams(self, max_tokens: Optional[int], max_sentences: Optional[int]) -> int:
        per_batch = max_tokens // self.args.tokens_per_sample if max_tokens else None
        limits = [n for n in (max_sentences, per_batch) if n is not None]
        if not limits or min(limits) < 1:
            raise UsageError("--task deq_language_modeling needs --batch-size (the number of parallel streams) "
                             f"or --max-tokens >= --tokens-per-sample ({self.args.tokens_per_sample}), "
                             f"got batch size {max_sentences} and max tokens {max_tokens}")
        return min(limits)

    def eval_lm_dataloader(self, dataset, max_tokens: Optional[int] = 36000, batch_size: Optional[int] = None,
                           max_positions=None, num_shards: int = 1, shard_id: int = 0, num_workers: int = 1,
                           data_buffer_size: int = 10, context_window: int = 0):
        """``fairseq-eval-lm``'s batches: the streamed split, with the solver summary logged at the end."""
        if context_window > 0:
            raise UsageError("--context-window does not apply to --task deq_language_modeling: the segment "
                             "memory (--mem-len) gives every segment its left context; drop --context-window "
                             "or use --task language_modeling")
        if batch_size is None and _read(self.args, "max_tokens", None) is None:
            streams = self._streams(max_tokens, None)
            raise UsageError(f"fairseq-eval-lm --task deq_language_modeling needs --batch-size, the number of parallel "
                             f"streams (e.g. 10, as Transformer-XL evaluates): fairseq's default --max-tokens "
                             f"{max_tokens} would make {streams} streams of --tokens-per-sample "
                             f"{self.args.tokens_per_sample}, and a stream's first segment has no memory")
        batches = self.get_batch_iterator(
            dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size, num_shards=num_shards,
            shard_id=shard_id, num_workers=num_workers, data_buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)
        layers = [m for ref in self._models if ref() is not None for m in ref().modules() if isinstance(m, DEQLayer)]
        return _SolverSummary(batches, layers)

    def train_step(self, sample, model, criterion, optimizer, update_num: int, ignore_grad: bool = False):
        """fairseq's training step; the backward solve's absolute residual is reported in the units
        of the unscaled loss (under ``--fp16``/``--amp`` the gradient it solves for is scaled)."""
        loss, sample_size, logging_output = super().train_step(sample, model, criterion, optimizer, update_num,
                                                                ignore_grad)
        scale = _loss_scale(optimizer)
        if scale != 1.0 and "deq_b_abs_res" in logging_output:
            logging_output["deq_b_abs_res"] = logging_output["deq_b_abs_res"] / scale
        return loss, sample_size, logging_output

    def begin_epoch(self, epoch: int, model) -> None:
        """A new pass over the training streams: forget the memory of earlier epochs (a run
        resumed mid-epoch keeps the memory its checkpoint restored); tell the model the epoch."""
        model.reset_memory(keep_epoch=epoch)
        model.set_epoch(epoch)

    def begin_valid_epoch(self, epoch: int, model) -> None:
        """Validation starts its streams from scratch; the training streams' memory is kept."""
        model.reset_memory(training=False)


def _read(cfg: Any, name: str, default: Any) -> Any:
    try:
        value = getattr(cfg, name, default)
    except Exception:  # an interpolation that cannot resolve outside fairseq-train's config
        return default
    return default if value is None else value


def _loss_scale(optimizer: Any) -> float:
    """The loss scale of fairseq's ``--fp16`` (a DynamicLossScaler) or ``--amp`` (a GradScaler) optimizer, else 1."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None:
        return 1.0
    return float(scaler.loss_scale if hasattr(scaler, "loss_scale") else scaler.get_scale())


def _warn_if_resume_would_fail(cfg: Any) -> None:
    """fairseq sends a resumed checkpoint from rank 0 to the others through ``torch.load``, whose
    ``weights_only=True`` default (torch >= 2.6) refuses the omegaconf config in it: without
    ``--load-checkpoint-on-all-dp-ranks`` a multi-process run cannot resume. Say so when it starts."""
    world = int(_read(cfg, "distributed_world_size", 1))
    if (world > 1 and int(_read(cfg, "distributed_rank", 0)) == 0
            and not _read(cfg, "load_checkpoint_on_all_dp_ranks", False)
            and torch.torch_version.TorchVersion(torch.__version__) >= (2, 6)
            and os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() not in ("1", "y", "yes", "true")):
        logger.warning(f"this run has {world} processes: resuming it from a checkpoint needs "
                       "--load-checkpoint-on-all-dp-ranks (fairseq broadcasts the checkpoint through torch.load, "
                       f"which refuses fairseq's config in it with weights_only=True, torch {torch.__version__}'s default)")


class _SolverSummary:
    """Batches of ``fairseq-eval-lm`` that, once exhausted, log the equilibrium layers' mean
    forward solver steps and residuals over the evaluation (beside the perplexity eval-lm logs)."""

    def __init__(self, batches: Any, layers: List[DEQLayer]) -> None:
        self.batches, self.layers = batches, layers

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def n(self) -> int:
        return getattr(self.batches, "n", 0)

    def __iter__(self) -> Iterator[Any]:
        meter = DEQStatsMeter()
        for batch in self.batches:
            seen = [layer.stats for layer in self.layers]
            yield batch
            for layer, before in zip(self.layers, seen):
                if layer.stats is not None and layer.stats is not before:
                    meter.update(layer.stats)
        summary = meter.summary()
        if summary:
            logger.info("DEQ forward solve over the evaluation: {:.2f} steps per position, abs. residual {:.3g}, "
                        "rel. residual {:.3g}, stalled {:.3f}, diverged {:.3f}".format(
                            summary["f_steps"], summary["f_abs_res"], summary["f_rel_res"],
                            summary["f_stalled"], summary["f_diverged"]))
