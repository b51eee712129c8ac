"""Segment memory: the detached attention inputs of the previous segment(s) of each stream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

__all__ = ["SegmentMemory"]


@dataclass
class _Entry:
    states: torch.Tensor   # (B, <= length, d), detached
    next_segment: int
    training: bool
    epoch: Optional[int] = None


class SegmentMemory:
    """Memory of ``length`` positions per batch row, one entry per stream key (a data split).

    A batch of stream ``key`` at segment index ``s`` reads the memory only when the entry was
    written by segment ``s - 1`` of the same stream (so a fresh epoch, a new evaluation, a resumed
    run or an unrelated batch starts without memory); rows are the same columns of the corpus
    in every batch of a stream, and a final batch may have fewer rows. The training streams'
    entries are saved with the model (:meth:`state_dict`), so that a run resumed mid-epoch
    continues with the memory it had. Reads and writes are Python bookkeeping keyed by stream and
    segment, kept out of ``torch.compile`` graphs (compiling them would guard on every segment
    index).
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
        if self.length == 0 or entry is None or entry.next_segment != segment or entry.states.shape[0] < like.shape[0]:
            return None
        return entry.states[: like.shape[0]].to(device=like.device, dtype=like.dtype)

    @torch.compiler.disable
    def write(self, key: str, segment: int, previous: Optional[torch.Tensor], current: torch.Tensor,
              training: bool, epoch: Optional[int] = None) -> None:
        """Keep the last ``length`` positions of ``[previous; current]`` for segment ``segment + 1``
        (``epoch``: the training epoch that wrote them)."""
        if self.length == 0:
            return
        states = current if previous is None else torch.cat([previous, current], dim=1)
        self._entries[key] = _Entry(states[:, -self.length:].detach(), segment + 1, training, epoch)

    def reset(self, training: Optional[bool] = None, keep_epoch: Optional[int] = None) -> None:
        """Forget every stream (``training=None``) or those written in training/eval mode;
        with ``keep_epoch``, keep the training streams written in that epoch (a resumed run)."""
        def forget(e: _Entry) -> bool:
            if keep_epoch is not None and e.training and e.epoch == keep_epoch:
                return False
            return training is None or e.training == training

        self._entries = {k: e for k, e in self._entries.items() if not forget(e)}

    def state_dict(self) -> Dict[str, Any]:
        """The training streams' entries (evaluation starts its streams afresh anyway)."""
        return {k: {"states": e.states, "next_segment": e.next_segment, "epoch": e.epoch}
                for k, e in self._entries.items() if e.training}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Replace the training streams' entries by those of :meth:`state_dict`."""
        self.reset(training=True)
        for key, e in state.items():
            self._entries[key] = _Entry(e["states"], int(e["next_segment"]), True, e["epoch"])
