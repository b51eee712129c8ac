"""Per-sample rows of solver state in one buffer, and the row gathers that select between them."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

__all__ = ["RowBuffer"]

_GATHER_PIECE = 4096  # elements: a piece of a row that one thread of a gather copies


def _gather_chunks(dim: int) -> int:
    """The most pieces of at least ``_GATHER_PIECE`` elements that a row of ``dim`` splits into
    evenly (1 for short rows or a ``dim`` without such a divisor)."""
    for chunks in range(max(dim // _GATHER_PIECE, 1), 1, -1):
        if dim % chunks == 0:
            return chunks
    return 1


class RowBuffer:
    """Named regions of one ``(rows, D)`` buffer for a batch of ``B`` samples: region ``name``
    with ``k`` rows per sample holds ``B k`` rows, sample by sample (row ``j`` of sample ``b`` is
    its ``b k + j``-th row), so a region of one row per sample is a ``(B, D)`` state and one of
    ``k`` is a ``(B, k, D)`` history (:meth:`history`).

    :meth:`select` is a per-sample choice between two sources as one row gather
    (``index_select``, a copy of ``B`` rows) rather than a masked select, which reads both.

    Args:
        like: a ``(B, D)`` tensor giving the batch, width, dtype and device.
        regions: ``(name, rows per sample)`` in buffer order.
    """

    def __init__(self, like: torch.Tensor, regions: Sequence[Tuple[str, int]]) -> None:
        batch, dim = like.shape
        self.batch = batch
        self._start: Dict[str, int] = {}
        self._per: Dict[str, int] = {}
        total = 0
        for name, per in regions:
            if name in self._start or per < 1:
                raise ValueError(f"region {name!r}: names must be unique and hold >= 1 row per sample")
            self._start[name], self._per[name] = total, per
            total += batch * per
        self.buffer = like.new_empty(total, dim)
        self._views = {name: self.buffer[self._start[name]:self._end(name)] for name in self._start}
        # A gather copies each row as `chunks` pieces: torch's CPU index_select splits its work
        # over the indices, so a few long rows would leave threads idle. Piece p of buffer row r
        # is piece r * chunks + p; per region, their ids as a (B, rows per sample, chunks) view.
        chunks = self._chunks = _gather_chunks(dim)
        self._pieces = self.buffer.view(total * chunks, dim // chunks)
        ids = torch.arange(total * chunks, device=like.device).view(total, chunks)
        self._piece_ids = {name: ids[self._start[name]:self._end(name)].view(batch, per, chunks)
                           for name, per in self._per.items()}
        self._piece_index = torch.empty(batch, chunks, dtype=ids.dtype, device=like.device)
        self._plans: Dict[Tuple[str, Tuple[str, int], Tuple[str, int]], Tuple] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        """Region ``name`` as ``(B * rows per sample, D)`` rows (a ``(B, D)`` state for one)."""
        return self._views[name]

    def history(self, name: str) -> torch.Tensor:
        """Region ``name`` as a ``(B, rows per sample, D)`` view."""
        return self[name].view(self.batch, self._per[name], -1)

    def select(self, out: str, mask: torch.Tensor, chosen: Tuple[str, int], other: Tuple[str, int]) -> None:
        """Write into the one-row region ``out``, per sample, its row of ``chosen`` where ``mask``
        and of ``other`` elsewhere; a source is ``(region, row of each sample in it)``.

        The gather reads the view spanning both sources, which must not hold ``out``. Allocates
        nothing and reads nothing back to the host: two or three operations on the device.
        """
        key = (out, chosen, other)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(out, chosen, other)
        source, target, chosen_ids, other_ids, shift = plan
        index = torch.where(mask[:, None], chosen_ids, other_ids, out=self._piece_index)
        if shift:
            index.sub_(shift)  # ids relative to the source view
        torch.index_select(source, 0, index.view(-1), out=target)

    def _plan(self, out: str, chosen: Tuple[str, int], other: Tuple[str, int]) -> Tuple:
        """The views a :meth:`select` reads and writes (no new storage), checked once per choice."""
        lo = min(self._start[chosen[0]], self._start[other[0]])
        hi = max(self._end(chosen[0]), self._end(other[0]))
        start = self._start[out]
        if self._per[out] != 1 or start < hi and start + self.batch > lo:
            raise ValueError(f"cannot gather into {out!r} from {chosen[0]!r} and {other[0]!r}")
        c = self._chunks
        return (self._pieces[lo * c:hi * c], self._pieces[start * c:self._end(out) * c],
                self._piece_ids[chosen[0]][:, chosen[1]], self._piece_ids[other[0]][:, other[1]], lo * c)

    def _end(self, name: str) -> int:
        return self._start[name] + self.batch * self._per[name]
