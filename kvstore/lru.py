"""Byte-budgeted caches of hot rows in front of the engine.

`VectorCache` keeps fixed-size rows in one preallocated numpy slab and evicts with CLOCK
(second chance), the LRU approximation of PostgreSQL's buffer pool and Linux's page cache:
a hit only sets a bit, so a batch of hits is one vectorised store instead of a per-key
reordering, a batch lookup is a few numpy passes over an `IdIndex`, and a gather of 1,000
rows is one fancy index (`performance-floors.md`: ~30x cheaper than rocksdict).
`RecordCache` is an exact LRU of variable-size byte strings.

Accounting: every entry is charged its payload plus `ENTRY_OVERHEAD_BYTES`, an upper bound
of its index cost (a dict entry and its int key for records; at most ~80 bytes of id index,
slot key and flags for vectors), and the slab is sized so that its full capacity fits the
budget: `size_bytes <= budget_bytes` always. Not thread-safe: `Store` serialises access.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from kvstore.id_index import IdIndex

ENTRY_OVERHEAD_BYTES = 112
_MIN_WINDOW = 1024


class VectorCache:
    """A CLOCK cache of fixed-size rows keyed by uint64 id."""

    def __init__(self, row_bytes: int, budget_bytes: int) -> None:
        if row_bytes <= 0:
            raise ValueError(f"row_bytes: {row_bytes} must be > 0")
        self.row_bytes = row_bytes
        self.budget_bytes = max(0, budget_bytes)
        self.capacity = self.budget_bytes // (row_bytes + ENTRY_OVERHEAD_BYTES)
        self._slab = np.empty((self.capacity, row_bytes), dtype=np.uint8)
        self._key_of = np.zeros(self.capacity, dtype=np.uint64)
        self._used = np.zeros(self.capacity, dtype=np.bool_)
        self._ref = np.zeros(self.capacity, dtype=np.bool_)
        self._index = IdIndex(self.capacity)  # id -> slot
        self._hand = 0
        self._fill = 0

    def __len__(self) -> int:
        return len(self._index)

    @property
    def size_bytes(self) -> int:
        return len(self._index) * (self.row_bytes + ENTRY_OVERHEAD_BYTES)

    def lookup(self, ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """Return each id's slot (-1 where absent) and mark the hits as recently used."""
        slots = self._index.get(ids).astype(np.intp, copy=False)
        self._ref[slots[slots >= 0]] = True
        return slots

    def rows(self, slots: npt.NDArray[np.intp]) -> npt.NDArray[np.uint8]:
        """Return a copy of the rows in `slots` (all valid)."""
        return self._slab[slots]

    def insert(self, ids: npt.NDArray[np.uint64], rows: npt.NDArray[np.uint8]) -> None:
        """Store `rows[i]` under `ids[i]`, evicting cold rows as needed. Ids must be unique."""
        if self.capacity == 0 or len(ids) == 0:
            return
        if len(ids) > self.capacity:
            self.discard(ids[: -self.capacity])  # their cached rows would be stale
            ids, rows = ids[-self.capacity :], rows[-self.capacity :]
        slots = self.lookup(ids)
        present = slots >= 0
        self._slab[slots[present]] = rows[present]
        new = ~present
        if new.any():
            fresh = self._claim(int(new.sum()), keep=slots[present])
            new_ids = ids[new]
            self._slab[fresh] = rows[new]
            self._key_of[fresh] = new_ids
            self._used[fresh] = True
            self._index.put(new_ids, fresh.astype(np.int64))

    def holding(self, ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """Return the positions in `ids` of the ids cached now (no reference bit is set)."""
        return np.flatnonzero(self._index.get(ids) >= 0)

    def discard(self, ids: npt.NDArray[np.uint64]) -> None:
        """Forget `ids` (absent ids are ignored)."""
        slots = self._index.get(ids)
        gone = slots[slots >= 0]
        self._index.delete(ids)
        self._used[gone] = False
        self._ref[gone] = False

    def clear(self) -> None:
        self._index.clear()
        self._used[:] = False
        self._ref[:] = False
        self._hand = self._fill = 0

    def _claim(self, count: int, keep: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
        """Return `count` distinct slots: never-used ones first, then CLOCK victims.

        Slots in `keep` (rows this insert just updated) are never chosen.
        """
        claimed: list[npt.NDArray[np.intp]] = [keep[:0]]
        fresh = min(count, self.capacity - self._fill)
        if fresh:
            claimed.append(np.arange(self._fill, self._fill + fresh, dtype=np.intp))
            self._fill += fresh
            count -= fresh
        while count > 0:
            # Set before every sweep (a sweep clears the bits it passes) so that neither this
            # call's slots nor the kept ones become victims, which would hand a slot out twice.
            self._ref[keep] = True
            self._ref[np.concatenate(claimed)] = True
            victims = self._sweep(count)
            self._evict(victims)
            claimed.append(victims)
            count -= len(victims)
        out = np.concatenate(claimed)
        self._ref[out] = True
        return out

    def _sweep(self, count: int) -> npt.NDArray[np.intp]:
        """Advance the clock hand; return up to `count` slots without a reference bit."""
        window = min(self.capacity, max(_MIN_WINDOW, 4 * count))
        idx = (self._hand + np.arange(window)) % self.capacity
        cold = np.flatnonzero(~self._ref[idx])[:count]
        passed = window if len(cold) < count else int(cold[-1]) + 1
        self._ref[idx[:passed]] = False
        self._hand = (self._hand + passed) % self.capacity
        return idx[cold].astype(np.intp)

    def _evict(self, slots: npt.NDArray[np.intp]) -> None:
        live = slots[self._used[slots]]
        self._index.delete(self._key_of[live])
        self._used[live] = False


class RecordCache:
    """An exact LRU of variable-size byte records keyed by uint64 id."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self._entries: OrderedDict[int, bytes] = OrderedDict()
        self.size_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, ids: npt.NDArray[np.uint64]) -> list[bytes | None]:
        """Return each id's record (None where absent), marking hits as most recent."""
        out: list[bytes | None] = []
        for key in ids.tolist():
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            out.append(value)
        return out

    def insert(self, ids: npt.NDArray[np.uint64], records: Sequence[bytes]) -> None:
        """Store records, evicting least recently used ones to stay within the budget."""
        for key, value in zip(ids.tolist(), records, strict=True):
            self._drop(key)
            cost = len(value) + ENTRY_OVERHEAD_BYTES
            if cost > self.budget_bytes:
                continue
            while self.size_bytes + cost > self.budget_bytes:
                old_key = next(iter(self._entries))
                self._drop(old_key)
            self._entries[key] = value
            self.size_bytes += cost

    def holding(self, ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """Return the positions in `ids` of the ids cached now (their recency is unchanged)."""
        entries = self._entries
        return np.array([i for i, key in enumerate(ids.tolist()) if key in entries], dtype=np.intp)

    def discard(self, ids: npt.NDArray[np.uint64]) -> None:
        for key in ids.tolist():
            self._drop(key)

    def clear(self) -> None:
        self._entries.clear()
        self.size_bytes = 0

    def _drop(self, key: int) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self.size_bytes -= len(value) + ENTRY_OVERHEAD_BYTES
