"""The Raft logs of every local group in one small RocksDB per node.

Keys: ``b"L" + partition (4 bytes BE) + index (8 bytes BE)`` -> ``term (8 bytes BE) + entry``;
``b"M" + partition`` -> msgpack ``[current_term, voted_for, commit_index]``. Compaction and
truncation are single range deletes, so a crash leaves either the old or the new log, never
a half-rewritten one.

Changes are buffered in one write batch and written by `LogStore.flush`, which the driver
calls once per round and before any byte goes to a socket (so an entry is in RocksDB before
it is acknowledged or a vote is sent): one write, not one per entry. The write goes through
RocksDB's WAL (survives kill -9); in synced mode it is also fsynced (survives power loss),
one fsync per round instead of one per entry.

This is a second module importing rocksdict besides `kvstore.rocks_engine`: the log is the
replication engine's private storage and needs ordered scans the `Engine` interface lacks.
Thread-safety: the batch is guarded by a lock; one `GroupLog` is used by one thread.
"""

from __future__ import annotations

import logging
import os
import struct
import threading

import msgpack
import rocksdict as rd

log = logging.getLogger(__name__)

_ENTRY = struct.Struct(">cIQ")
_META = struct.Struct(">cI")
_TERM = struct.Struct(">Q")

Entry = tuple[bytes, int, int]  # (command, index, term), pysyncobj's journal entry shape


class LogStore:
    """One RocksDB holding the logs and Raft metadata of every local group."""

    def __init__(self, path: str, *, synced: bool = False) -> None:
        os.makedirs(path, exist_ok=True)
        opts = rd.Options(raw_mode=True)
        opts.create_if_missing(True)
        self._db = rd.Rdict(path, opts)
        self._write_opt = rd.WriteOptions()
        self._write_opt.sync = synced
        self._lazy_opt = rd.WriteOptions()  # the commit index is a hint: never worth an fsync
        self.synced = synced
        self._lock = threading.Lock()
        self._batch = rd.WriteBatch(raw_mode=True)
        self._batch_needs_sync = False
        self.writes = 0  # RocksDB writes made by `flush` (a counter for benches and tests)

    def flush(self) -> None:
        """Write every buffered change in one RocksDB write (fsynced in synced mode if needed)."""
        with self._lock:
            if self._batch.is_empty():
                return
            batch, self._batch = self._batch, rd.WriteBatch(raw_mode=True)
            opt = self._write_opt if self._batch_needs_sync else self._lazy_opt
            self._batch_needs_sync = False
            self._db.write(batch, opt)
            self.writes += 1

    def _buffer_put(self, key: bytes, value: bytes, *, sync: bool = True) -> None:
        with self._lock:
            self._batch.put(key, value)
            self._batch_needs_sync |= sync

    def _buffer_delete_range(self, start: bytes, end: bytes) -> None:
        with self._lock:
            self._batch.delete_range(start, end)
            self._batch_needs_sync = True

    def group(self, partition: int) -> GroupLog:
        """Return the log of one partition's group (loaded from disk)."""
        return GroupLog(self, partition)

    def load(self, partition: int) -> list[Entry]:
        self.flush()
        start, end = _ENTRY.pack(b"L", partition, 0), _ENTRY.pack(b"L", partition + 1, 0)
        entries: list[Entry] = []
        for key, value in self._db.items(from_key=start):
            assert isinstance(key, bytes) and isinstance(value, bytes)  # raw mode
            if key >= end:
                break
            entries.append((value[_TERM.size :], _ENTRY.unpack(key)[2], _TERM.unpack_from(value)[0]))
        return entries

    def append(self, partition: int, command: bytes, index: int, term: int) -> None:
        self._buffer_put(_ENTRY.pack(b"L", partition, index), _TERM.pack(term) + command)

    def delete_entries(self, partition: int, first: int, end: int) -> None:
        """Delete the entries with first <= index < end in one atomic range delete."""
        if first < end:
            self._buffer_delete_range(_ENTRY.pack(b"L", partition, first), _ENTRY.pack(b"L", partition, end))

    def drop(self, partition: int) -> None:
        """Delete a group's log and metadata."""
        self._buffer_delete_range(_ENTRY.pack(b"L", partition, 0), _ENTRY.pack(b"L", partition + 1, 0))
        self._buffer_delete_range(_META.pack(b"M", partition), _META.pack(b"M", partition + 1))
        self.flush()

    def load_meta(self, partition: int) -> tuple[int, str | None, int]:
        self.flush()
        raw = self._db.get(_META.pack(b"M", partition))
        if raw is None:
            return 0, None, 1
        term, voted, commit = msgpack.unpackb(raw, raw=False)
        return int(term), voted, int(commit)

    def store_meta(self, partition: int, term: int, voted: str | None, commit: int, *, sync: bool = True) -> None:
        self._buffer_put(_META.pack(b"M", partition), msgpack.packb([term, voted, commit]), sync=sync)

    def close(self) -> None:
        self.flush()
        self._db.close()


class GroupLog:
    """One group's log: an in-memory list (what pysyncobj reads) mirrored in the `LogStore`."""

    def __init__(self, store: LogStore, partition: int) -> None:
        self._store = store
        self.partition = partition
        self.entries: list[Entry] = store.load(partition)
        self.size_bytes = sum(len(e[0]) for e in self.entries)
        self.term, self.voted_for, self.commit_index = store.load_meta(partition)

    def add(self, command: bytes, index: int, term: int) -> None:
        if self.entries and index != self.entries[-1][1] + 1:
            # pysyncobj only appends the next index; anything else would break list positions.
            raise ValueError(f"partition {self.partition}: append of index {index} after {self.entries[-1][1]}")
        self._store.append(self.partition, command, index, term)
        self.entries.append((command, index, term))
        self.size_bytes += len(command)

    def clear(self) -> None:
        if self.entries:
            self._store.delete_entries(self.partition, 0, self.entries[-1][1] + 1)
        self.entries = []
        self.size_bytes = 0

    def delete_from(self, position: int) -> None:
        """Drop the entries at list positions >= `position` (a conflicting suffix)."""
        if position < len(self.entries):
            self._store.delete_entries(self.partition, self.entries[position][1], self.entries[-1][1] + 1)
            self.size_bytes -= sum(len(e[0]) for e in self.entries[position:])
            del self.entries[position:]

    def delete_to(self, position: int) -> None:
        """Drop the entries at list positions < `position` (compaction)."""
        if position > 0 and self.entries:
            position = min(position, len(self.entries))
            self._store.delete_entries(self.partition, self.entries[0][1], self.entries[position - 1][1] + 1)
            self.size_bytes -= sum(len(e[0]) for e in self.entries[:position])
            del self.entries[:position]

    def set_commit_index(self, commit_index: int) -> None:
        if commit_index != self.commit_index:
            self.commit_index = commit_index
            self._store.store_meta(self.partition, self.term, self.voted_for, commit_index, sync=False)

    def set_term(self, term: int, voted_for: str | None) -> None:
        self.term, self.voted_for = term, voted_for
        self._store.store_meta(self.partition, term, voted_for, self.commit_index)

    def trim_before(self, index: int, term: int) -> bool:
        """Drop entries before `index` if the log holds (index, term); return whether it does."""
        first = self.entries[0][1] if self.entries else 0
        pos = index - first
        if not self.entries or pos < 0 or pos >= len(self.entries) or self.entries[pos][2] != term:
            return False
        self.delete_to(pos)
        return True
