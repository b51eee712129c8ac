"""Segment memory: the detached attention inputs of the previous segment(s) of each stream."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from fairseq.distributed import utils as distributed_utils
from torch import nn

__all__ = ["SegmentMemory"]

logger = logging.getLogger(__name__)

_FIELDS = ("states", "next_segment", "epoch")


@dataclass
class _Entry:
    states: torch.Tensor   # (B, <= length, d), detached
    next_segment: int
    training: bool
    epoch: Optional[int] = None


def _data_parallel() -> Tuple[Any, int, int]:
    """fairseq's data-parallel group, this process's rank in it and its size (None, 0, 1 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    group = distributed_utils.get_data_parallel_group()
    return group, dist.get_rank(group), dist.get_world_size(group)


class SegmentMemory(nn.Module):
    """Memory of ``length`` positions per batch row, one entry per stream key (a data split).

    A batch of stream ``key`` at segment index ``s`` reads the memory only when the entry was
    written by segment ``s - 1`` of the same stream (so a fresh epoch, a new evaluation, a resumed
    run or an unrelated batch starts without memory); rows are the same columns of the corpus
    in every batch of a stream, and a final batch may have fewer rows. Reads and writes are Python
    bookkeeping keyed by stream and segment, kept out of ``torch.compile`` graphs (compiling them
    would guard on every segment index).

    The training streams' entries are part of the module's state dict, so that a run resumed
    mid-epoch continues with the memory it had: entry ``<key>@<rank>/<world>`` holds tensors
    ``states``, ``next_segment`` and ``epoch`` (-1: none) of data-parallel rank ``rank`` out of
    ``world``. fairseq saves the state of rank 0 only, so under data parallelism every training
    write also gathers the other ranks' entries to rank 0 (one small all-gather of their shapes
    and one gather of the states per write); on loading, each rank takes its own entry, and an
    entry written by another number of ranks (other streams) is dropped. Every value is a
    tensor, as tools that average checkpoints expect.
    """

    def __init__(self, length: int) -> None:
        super().__init__()
        if length < 0:
            raise ValueError(f"memory length must be >= 0, got {length}")
        self.length = length
        self._entries: Dict[str, _Entry] = {}
        self._peers: Dict[str, _Entry] = {}  # rank 0: the other ranks' training entries, by saved name

    def extra_repr(self) -> str:
        return f"length={self.length}"

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
        (``epoch``: the training epoch that wrote them). In training under data parallelism every
        rank must write in the same order (fairseq's trainer does: each rank runs every step)."""
        if self.length == 0:
            return
        states = current if previous is None else torch.cat([previous, current], dim=1)
        entry = _Entry(states[:, -self.length:].detach(), segment + 1, training, epoch)
        self._entries[key] = entry
        if training:
            self._gather_to_first_rank(key, entry)

    def _gather_to_first_rank(self, key: str, entry: _Entry) -> None:
        group, rank, world = _data_parallel()
        if world == 1:
            return
        states = entry.states
        meta = torch.tensor([states.shape[0], states.shape[1], entry.next_segment,
                             -1 if entry.epoch is None else entry.epoch], device=states.device)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        shapes = [m.tolist() for m in metas]
        rows, length = max(s[0] for s in shapes), max(s[1] for s in shapes)
        padded = states.new_zeros(rows, length, states.shape[2])
        padded[: states.shape[0], : states.shape[1]] = states
        received: Optional[List[torch.Tensor]] = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
        dist.gather(padded, received, dst=dist.get_global_rank(group, 0), group=group)
        if received is None:
            return
        for peer in range(1, world):
            b, t, next_segment, epoch = shapes[peer]
            self._peers[f"{key}@{peer}/{world}"] = _Entry(received[peer][:b, :t], next_segment, True,
                                                         None if epoch < 0 else epoch)

    def reset(self, training: Optional[bool] = None, keep_epoch: Optional[int] = None) -> None:
        """Forget every stream (``training=None``) or those written in training/eval mode;
        with ``keep_epoch``, keep the training streams written in that epoch (a resumed run)."""
        def forget(e: _Entry) -> bool:
            if keep_epoch is not None and e.training and e.epoch == keep_epoch:
                return False
            return training is None or e.training == training

        self._entries = {k: e for k, e in self._entries.items() if not forget(e)}
        self._peers = {k: e for k, e in self._peers.items() if not forget(e)}

    # -- state dict ----------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        _, rank, world = _data_parallel()
        entries = {f"{k}@{rank}/{world}": e for k, e in self._entries.items() if e.training}
        entries.update(self._peers)
        for name, e in entries.items():
            destination[f"{prefix}{name}.states"] = e.states
            destination[f"{prefix}{name}.next_segment"] = torch.tensor(e.next_segment)
            destination[f"{prefix}{name}.epoch"] = torch.tensor(-1 if e.epoch is None else e.epoch)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict[str, Any],
                              strict: bool, missing_keys: List[str], unexpected_keys: List[str],
                              error_msgs: List[str]) -> None:
        saved: Dict[str, Dict[str, Any]] = {}
        for full_key, value in state_dict.items():
            if full_key.startswith(prefix):
                name, _, field = full_key[len(prefix):].rpartition(".")
                if field not in _FIELDS or "@" not in name:
                    unexpected_keys.append(full_key)
                else:
                    saved.setdefault(name, {})[field] = value
        _, rank, world = _data_parallel()
        self.reset(training=True)
        self._peers = {}
        dropped = set()
        for name, fields in saved.items():
            if set(fields) != set(_FIELDS):
                error_msgs.append(f"segment memory entry {prefix}{name} lacks "
                                  f"{sorted(set(_FIELDS) - set(fields))}")
                continue
            key, _, owner = name.rpartition("@")
            owner_rank, _, owner_world = owner.partition("/")
            epoch = int(fields["epoch"])
            entry = _Entry(fields["states"], int(fields["next_segment"]), True, None if epoch < 0 else epoch)
            if owner_world != str(world):
                dropped.add(owner_world)
            elif owner_rank == str(rank):
                self._entries[key] = entry
            elif rank == 0:
                self._peers[name] = entry
        if dropped:
            logger.info(f"the segment memory was saved by {' and '.join(sorted(dropped))} data-parallel rank(s) and "
                        f"this process is one of {world}: the streams are laid out differently, so training "
                        "starts them without memory")
