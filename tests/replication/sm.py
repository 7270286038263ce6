"""A RocksDB-backed state machine for replication tests: records (index, command) per partition."""

from __future__ import annotations

import struct
import threading
import time
from typing import BinaryIO

import msgpack
import rocksdict as rd

_APPLIED = struct.Struct(">cI")
_ENTRY = struct.Struct(">cIQ")


class RecordingStateMachine:
    """Stores every applied command under its log index, and the applied index, in one write batch."""

    def __init__(self, path: str, *, snapshot_delay_s: float = 0.0, restore_delay_s: float = 0.0) -> None:
        self._snapshot_delay_s = snapshot_delay_s
        self._restore_delay_s = restore_delay_s
        opts = rd.Options(raw_mode=True)
        opts.create_if_missing(True)
        self._db = rd.Rdict(path, opts)
        self._lock = threading.Lock()
        self.fail_on: bytes | None = None  # a command that makes apply raise (tests the guard)

    def apply(self, partition: int, command: bytes, index: int) -> bytes | None:
        with self._lock:
            if index <= self._applied_locked(partition):
                return b"skipped"
            if self.fail_on is not None and command == self.fail_on:
                raise RuntimeError("apply failure requested by the test")
            batch = rd.WriteBatch(raw_mode=True)
            batch.put(_ENTRY.pack(b"E", partition, index), command)
            batch.put(_APPLIED.pack(b"A", partition), index.to_bytes(8, "big"))
            self._db.write(batch)
            return b"ok:%d" % index

    def applied_index(self, partition: int) -> int:
        with self._lock:
            return self._applied_locked(partition)

    def _applied_locked(self, partition: int) -> int:
        raw = self._db.get(_APPLIED.pack(b"A", partition))
        return 0 if raw is None else int.from_bytes(raw, "big")

    def entries(self, partition: int) -> list[tuple[int, bytes]]:
        with self._lock:
            return self._entries_locked(partition)

    def _entries_locked(self, partition: int) -> list[tuple[int, bytes]]:
        start, end = _ENTRY.pack(b"E", partition, 0), _ENTRY.pack(b"E", partition + 1, 0)
        out = []
        for key, value in self._db.items(from_key=start):
            assert isinstance(key, bytes) and isinstance(value, bytes)  # raw mode
            if key >= end:
                break
            out.append((_ENTRY.unpack(key)[2], value))
        return out

    def commands(self, partition: int) -> list[bytes]:
        return [command for _, command in self.entries(partition)]

    def snapshot(self, partition: int, out: BinaryIO) -> int:
        with self._lock:
            applied = self._applied_locked(partition)
            entries = self._entries_locked(partition)
        out.write(msgpack.packb([applied, entries], use_bin_type=True))
        time.sleep(self._snapshot_delay_s)  # widens the window a crash test aims at
        return applied

    def restore(self, partition: int, inp: BinaryIO) -> None:
        applied, entries = msgpack.unpackb(inp.read(), raw=False)
        time.sleep(self._restore_delay_s)  # a large partition's restore, in tests
        with self._lock:
            batch = rd.WriteBatch(raw_mode=True)
            batch.delete_range(_ENTRY.pack(b"E", partition, 0), _ENTRY.pack(b"E", partition + 1, 0))
            for index, command in entries:
                batch.put(_ENTRY.pack(b"E", partition, index), command)
            batch.put(_APPLIED.pack(b"A", partition), int(applied).to_bytes(8, "big"))
            self._db.write(batch)

    def close(self) -> None:
        self._db.close()
