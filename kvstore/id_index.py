"""A fixed-capacity hash index from uint64 id to int slot, probed with numpy for whole batches.

The cache tier looks up hundreds of ids per request. A Python dict costs a call and a few
dependent cache misses per id (about 0.3 µs each, the largest item in a node's profile at
K=1000); this open-addressing table with linear probing answers a batch with a handful of
vectorised passes, one per probe step. Load stays at or below one half, so a hit takes
about 1.5 probes and a miss about 2.5.

Not thread-safe: the owner serialises access.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kvclient._ring import mix64

_EMPTY, _FULL, _GONE = 0, 1, 2
_MAX_PROBES = 64


class IdIndex:
    """Maps up to `max_entries` distinct uint64 ids to int64 values."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(0, max_entries)
        size = 8
        while size < 2 * self.max_entries:
            size *= 2
        self._mask = np.uint64(size - 1)
        self._keys = np.zeros(size, dtype=np.uint64)
        self._values = np.zeros(size, dtype=np.int64)
        self._state = np.zeros(size, dtype=np.uint8)
        self._count = 0
        self._gone = 0

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return int(self._keys.nbytes + self._values.nbytes + self._state.nbytes)

    def _home(self, ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        return (mix64(ids) & self._mask).astype(np.int64)

    def _positions(self, ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """Return the table position holding each id, or -1 where absent."""
        out = np.full(len(ids), -1, dtype=np.int64)
        active = np.arange(len(ids))
        pos = self._home(ids)
        mask = int(self._mask)
        for _ in range(_MAX_PROBES):
            if not len(active):
                break
            state = self._state[pos]
            hit = (state == _FULL) & (self._keys[pos] == ids[active])
            out[active[hit]] = pos[hit]
            more = ~hit & (state != _EMPTY)
            active, pos = active[more], (pos[more] + 1) & mask
        else:
            self._rebuild()  # a pathological chain: rehash and look again
            return self._positions(ids)
        return out

    def get(self, ids: npt.NDArray[np.uint64], missing: int = -1) -> npt.NDArray[np.int64]:
        """Return each id's value, `missing` where absent."""
        if self._count == 0:
            return np.full(len(ids), missing, dtype=np.int64)
        pos = self._positions(ids)
        found = pos >= 0
        out = np.full(len(ids), missing, dtype=np.int64)
        out[found] = self._values[pos[found]]
        return out

    def put(self, ids: npt.NDArray[np.uint64], values: npt.NDArray[np.int64]) -> None:
        """Set `ids[i] -> values[i]`. Ids must be unique; raises OverflowError past capacity."""
        pos = self._positions(ids)
        present = pos >= 0
        new_ids, new_values = ids[~present], values[~present]
        if self._count + len(new_ids) > self.max_entries:  # before any change: all or nothing
            raise OverflowError(f"IdIndex: {self._count + len(new_ids)} entries > {self.max_entries}")
        self._values[pos[present]] = values[present]
        if self._gone and self._count + self._gone + len(new_ids) > len(self._state) * 3 // 4:
            self._rebuild()
        self._insert_new(new_ids, new_values)

    def _insert_new(self, ids: npt.NDArray[np.uint64], values: npt.NDArray[np.int64]) -> None:
        active = np.arange(len(ids))
        pos = self._home(ids)
        mask = int(self._mask)
        while len(active):
            free = self._state[pos] != _FULL
            # Several new ids may reach the same free position in one pass: the first wins.
            cand_pos, first = np.unique(pos[free], return_index=True)
            winners = active[free][first]
            self._gone -= int((self._state[cand_pos] == _GONE).sum())
            self._keys[cand_pos] = ids[winners]
            self._values[cand_pos] = values[winners]
            self._state[cand_pos] = _FULL
            self._count += len(winners)
            placed = np.zeros(len(active), dtype=np.bool_)
            placed[np.flatnonzero(free)[first]] = True
            active, pos = active[~placed], (pos[~placed] + 1) & mask

    def delete(self, ids: npt.NDArray[np.uint64]) -> None:
        """Remove ids (absent ones are ignored)."""
        if self._count == 0 or len(ids) == 0:
            return
        pos = self._positions(ids)
        pos = np.unique(pos[pos >= 0])
        self._state[pos] = _GONE
        self._count -= len(pos)
        self._gone += len(pos)

    def clear(self) -> None:
        self._state[:] = _EMPTY
        self._count = self._gone = 0

    def _rebuild(self) -> None:
        live = self._state == _FULL
        ids, values = self._keys[live].copy(), self._values[live].copy()
        self.clear()
        self._insert_new(ids, values)
