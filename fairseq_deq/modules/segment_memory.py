"""Segment memory: the detached attention inputs of the previous segment(s) of each stream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

__all__ = ["SegmentMemory"]


@dataclass
class _Entry:
    states: torch.Tensor   # (B, <= length, d), detached
    next_segment: int
    training: bool


class SegmentMemory:
    """Memory of ``length`` positions per batch row, one entry per stream key (a data split).

    A batch of stream ``key`` at segment index ``s`` reads the memory only when the entry was
    written by segment ``s - 1`` of the same stream (so a fresh epoch, a new evaluation, a resumed
    run or an unrelated batch starts without memory); rows are the same columns of the corpus
    in every batch of a stream, and a final batch may have fewer rows. Not part of the state dict.
    Reads and writes are Python bookkeeping keyed by stream and segment, kept out of
    ``torch.compile`` graphs (compiling them would guard on every segment index).
    """

    def __init__(self, length: int) -> None:
        if length < 0:
            raise ValueError(f"memory length must be >= 0, got {length}")
        self.length = length
        self._entries: Dict[str, _Entry] = {}

    @torch.compiler.disable
    def read(self, key: str, segment: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The memory for a ``like``-shaped batch ``(B, T, d)`` of segment ``segment``, or None."""
        entry = self._entries.get(key)
        if (self.length == 0 or entry is None or entry.next_segment != segment
                or entry.states.shape[0] < like.shape[0] or entry.states.device != like.device):
            return None
        return entry.states[: like.shape[0]].to(like.dtype)

    @torch.compiler.disable
    def write(self, key: str, segment: int, previous: Optional[torch.Tensor], current: torch.Tensor,
              training: bool) -> None:
        """Keep the last ``length`` positions of ``[previous; current]`` for segment ``segment + 1``."""
        if self.length == 0:
            return
        states = current if previous is None else torch.cat([previous, current], dim=1)
        self._entries[key] = _Entry(states[:, -self.length:].detach(), segment + 1, training)

    def reset(self, training: Optional[bool] = None) -> None:
        """Forget every stream (``training=None``) or those written in training/eval mode."""
        if training is None:
            self._entries.clear()
        else:
            self._entries = {k: e for k, e in self._entries.items() if e.training != training}
