"""``deq_language_modeling``: fairseq's language modeling task with segment memory.

Batches stream each row through the corpus contiguously (Transformer-XL's ordered iterator), so
the model's memory of the previous segment carries over between updates and during validation
and ``fairseq-eval-lm``. The memory is reset at the start of every epoch and every validation.
"""
import logging
from dataclasses import dataclass
from typing import Any, Optional

from fairseq.data import iterators
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from ..data import StreamCollater, segments_per_column, stream_batches
from ..precision import PrecisionFlags, check_precision_flags

logger = logging.getLogger(__name__)

__all__ = ["DEQLanguageModelingTask", "DEQLanguageModelingConfig"]


@dataclass
class DEQLanguageModelingConfig(LanguageModelingConfig, PrecisionFlags):
    """Same options as ``language_modeling``; ``--batch-size`` is the number of parallel streams
    per GPU and ``--tokens-per-sample`` the segment length. The precision flags are fairseq's own,
    read to refuse combinations that cannot run on this device."""


@register_task("deq_language_modeling", dataclass=DEQLanguageModelingConfig)
class DEQLanguageModelingTask(LanguageModelingTask):
    """Language modeling over contiguous streams, for models with a segment memory."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None) -> None:
        check_precision_flags(args)
        if str(args.sample_break_mode) != "none":
            raise ValueError("--task deq_language_modeling streams the corpus as one token sequence: "
                             f"use --sample-break-mode none (got {args.sample_break_mode!r})")
        if targets not in (None, ["future"]):
            raise ValueError(f"--task deq_language_modeling predicts the next token only, got targets {targets}")
        super().__init__(args, dictionary, output_dictionary, targets)

    def build_model(self, cfg: Any, from_checkpoint: bool = False):
        model = super().build_model(cfg, from_checkpoint)
        if not getattr(model, "supports_segment_memory", False):
            raise ValueError(f"--task deq_language_modeling feeds a segment memory, which "
                             f"{type(model).__name__} does not have: use --arch deq_transformer_lm* "
                             f"or --task language_modeling")
        return model

    def get_batch_iterator(self, dataset, max_tokens: Optional[int] = None, max_sentences: Optional[int] = None,
                           max_positions=None, ignore_invalid_inputs: bool = False,
                           required_batch_size_multiple: int = 1, seed: int = 1, num_shards: int = 1,
                           shard_id: int = 0, num_workers: int = 0, epoch: int = 1, data_buffer_size: int = 0,
                           disable_iterator_cache: bool = False, skip_remainder_batch: bool = False,
                           grouped_shuffling: bool = False, update_epoch_batch_itr: bool = False):
        """An unshuffled iterator whose row ``b`` continues the same text from batch to batch."""
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
            raise ValueError("--task deq_language_modeling needs --batch-size (the number of parallel streams) "
                             f"or --max-tokens >= --tokens-per-sample ({self.args.tokens_per_sample}), "
                             f"got batch size {max_sentences} and max tokens {max_tokens}")
        return min(limits)

    def eval_lm_dataloader(self, dataset, max_tokens: Optional[int] = 36000, batch_size: Optional[int] = None,
                           max_positions=None, num_shards: int = 1, shard_id: int = 0, num_workers: int = 1,
                           data_buffer_size: int = 10, context_window: int = 0):
        if context_window > 0:
            raise ValueError("--context-window does not apply to --task deq_language_modeling: the segment "
                             "memory (--mem-len) gives every segment its left context; drop --context-window "
                             "or use --task language_modeling")
        return self.get_batch_iterator(
            dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size, num_shards=num_shards,
            shard_id=shard_id, num_workers=num_workers, data_buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)

    def begin_epoch(self, epoch: int, model) -> None:
        """A new pass over the training streams: forget all memory; tell the model the epoch."""
        model.reset_memory()
        model.set_epoch(epoch)

    def begin_valid_epoch(self, epoch: int, model) -> None:
        """Validation starts its streams from scratch; the training streams' memory is kept."""
        model.reset_memory(training=False)
