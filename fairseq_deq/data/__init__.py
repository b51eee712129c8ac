"""Data helpers: the ordered, stream-preserving batching of the segment-memory task."""
from .stream_batches import StreamCollater, segments_per_column, stream_batches

__all__ = ["StreamCollater", "segments_per_column", "stream_batches"]
