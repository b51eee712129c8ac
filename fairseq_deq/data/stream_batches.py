"""Transformer-XL's ordered batching: the corpus as parallel contiguous streams.

The token stream of a split, cut into blocks of ``tokens_per_sample`` (fairseq's
``TokenBlockDataset`` with ``--sample-break-mode none``), is divided into ``columns`` contiguous
runs of blocks. Batch ``s`` holds block ``s`` of every column, so row ``b`` of consecutive batches
continues the same text and a model can carry a memory from one batch to the next.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

__all__ = ["stream_batches", "segments_per_column", "StreamCollater"]


def stream_batches(num_blocks: int, batch_size: int, num_shards: int = 1, shard_id: int = 0) -> List[List[int]]:
    """Block indices of each batch of shard ``shard_id``: rows are the shard's ``batch_size``
    columns, column ``c`` being blocks ``c * S ... c * S + S - 1`` with ``S`` segments per column.

    Every block appears once over all shards; when the blocks do not fill every column the last
    columns are short, so the final batches lose rows at the end (never in the middle, which
    keeps row ``b`` on the same column). A shard may then end with empty batches, which fairseq
    handles as dummy batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    columns = batch_size * num_shards
    segments = segments_per_column(num_blocks, columns)
    first = shard_id * batch_size
    return [[c * segments + s for c in range(first, first + batch_size) if c * segments + s < num_blocks]
            for s in range(segments)]


def segments_per_column(num_blocks: int, columns: int) -> int:
    """Blocks per column (the number of batches of an epoch) when ``columns`` streams share them."""
    return max(1, math.ceil(num_blocks / columns))


class StreamCollater:
    """``dataset.collater`` plus the stream position the model needs for its memory:
    ``net_input["mem_key"]`` (the stream, e.g. the split name) and ``net_input["mem_segment"]``."""

    def __init__(self, dataset: Any, key: str, segments: int) -> None:
        self.dataset, self.key, self.segments = dataset, key, segments

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        batch = self.dataset.collater(samples)
        if batch:
            batch["net_input"]["mem_key"] = self.key
            batch["net_input"]["mem_segment"] = int(samples[0]["id"]) % self.segments
        return batch
