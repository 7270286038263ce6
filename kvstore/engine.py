"""The storage-engine interface, and an in-memory engine that implements it for tests.

A node keeps one engine; each partition is its own keyspace (a RocksDB column family in
`RocksEngine`) so it can be checkpointed, shipped or dropped whole. Keys and values are
bytes. Implementations are not thread-safe on their own: `Store` serialises access.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol


class Engine(Protocol):
    """Partitioned byte key-value storage."""

    def multi_get(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """Return the value of each key (None where absent); an unknown partition is empty."""
        ...

    def write(self, partition: int, keys: Sequence[bytes], values: Sequence[bytes | None]) -> None:
        """Apply puts (value bytes) and deletes (value None) atomically, in order."""
        ...

    def delete_range(self, partition: int, begin: bytes, end: bytes) -> None:
        """Delete every key k with begin <= k < end."""
        ...

    def items(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        """Return an iterator over a partition's (key, value) pairs in key order.

        The view is fixed when this call returns: later writes are not seen.
        """
        ...

    def keys(self, partition: int, begin: bytes, end: bytes) -> Iterator[bytes]:
        """Return an iterator over a partition's keys k with begin <= k < end, in key order.

        The view is fixed when this call returns, as for `items`.
        """
        ...

    def partitions(self) -> list[int]:
        """Return the partitions that have storage on this node."""
        ...

    def drop_partition(self, partition: int) -> None:
        """Remove a partition and all its data."""
        ...

    def size_bytes(self) -> int:
        """Return an estimate of the bytes on disk (or in memory)."""
        ...

    def close(self) -> None:
        """Flush and release the engine; it cannot be used afterwards."""
        ...


class MemEngine:
    """Dict-backed `Engine`; holds nothing across restarts."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[bytes, bytes]] = {}

    def multi_get(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        part = self._parts.get(partition, {})
        return [part.get(k) for k in keys]

    def write(self, partition: int, keys: Sequence[bytes], values: Sequence[bytes | None]) -> None:
        part = self._parts.setdefault(partition, {})
        for key, value in zip(keys, values, strict=True):
            if value is None:
                part.pop(key, None)
            else:
                part[key] = value

    def delete_range(self, partition: int, begin: bytes, end: bytes) -> None:
        part = self._parts.get(partition, {})
        for key in [k for k in part if begin <= k < end]:
            del part[key]

    def items(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        return iter(sorted(self._parts.get(partition, {}).items()))

    def keys(self, partition: int, begin: bytes, end: bytes) -> Iterator[bytes]:
        return iter(sorted(k for k in self._parts.get(partition, {}) if begin <= k < end))

    def partitions(self) -> list[int]:
        return sorted(self._parts)

    def drop_partition(self, partition: int) -> None:
        self._parts.pop(partition, None)

    def size_bytes(self) -> int:
        return sum(len(k) + len(v) for part in self._parts.values() for k, v in part.items())

    def close(self) -> None:
        self._parts.clear()
