"""Snapshots as one file (our header, then the state machine's payload), written off the driver.

The header (`DUMP_HEADER`, then msgpack) holds pysyncobj's last and previous entries and the
cluster; its state machine index is patched in last, once the payload is written.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, BinaryIO

import msgpack
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.serializer import Serializer

from kvstore.replication.raft_log import Entry

if TYPE_CHECKING:
    from kvstore.replication.pysyncobj_engine.raft_group import RaftGroup

log = logging.getLogger(__name__)

DUMP_MAGIC = b"KVRSNAP1"
DUMP_HEADER = struct.Struct(">8sQI")  # magic, state machine index (patched in last), header size


class AsyncSerializer(Serializer):
    """Snapshots written on the replicator's snapshot thread, as one file: header + payload."""

    def __init__(self, group: RaftGroup, path: str, chunk_bytes: int) -> None:
        super().__init__(path, chunk_bytes, False, None, None, None)
        self._group = group
        self._path = path
        self._job: Future[bool] | None = None
        self._job_id: int | None = None
        self._lock = threading.Lock()
        self._cancelled = False

    def serialize(self, data: Any, id: int) -> None:  # pysyncobj's signature
        if self._job is not None or getattr(self, "_Serializer__incomingTransmissionFile", None) is not None:
            return
        _, last, prev, cluster = data
        self._job_id = id
        self._cancelled = False
        replicator = self._group._kv_replicator
        self._job = replicator._snapshots.submit(self._write, tuple(last), tuple(prev), [n.address for n in cluster])

    def checkSerializing(self) -> tuple[int, int | None]:  # noqa: N802
        job = self._job
        if job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if not job.done():
            return SERIALIZER_STATE.SERIALIZING, self._job_id
        self._job = None
        ok = job.exception() is None and bool(job.result())
        if ok:
            self.__dict__["_Serializer__transmissions"] = {}  # as the library does: resend from the new file
        return (SERIALIZER_STATE.SUCCESS if ok else SERIALIZER_STATE.FAILED), self._job_id

    def cancel(self) -> None:
        """Make a snapshot in progress end without replacing the current file."""
        with self._lock:
            self._cancelled = True

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802
        if data is not None and data[1]:  # the first chunk of an incoming snapshot
            with self._lock:
                self._cancelled = True  # our own dump in progress must not replace the leader's
        return bool(super().setTransmissionData(data))

    def deserialize(self) -> tuple[Any, ...]:
        return (None, *self._group._kv_load_dump(self._path))

    def _write(self, last: Entry, prev: Entry, cluster: list[str]) -> bool:
        group = self._group
        replicator = group._kv_replicator
        tmp = self._path + ".tmp"
        try:
            with open(tmp, "wb") as out:
                header = msgpack.packb({"last": list(last), "prev": list(prev), "cluster": cluster}, use_bin_type=True)
                out.write(DUMP_HEADER.pack(DUMP_MAGIC, 0, len(header)) + header)
                sm_index = replicator._sm.snapshot(group._kv_partition, out)
                out.seek(0)
                out.write(DUMP_HEADER.pack(DUMP_MAGIC, sm_index, len(header)))
                out.flush()
                if replicator.config.synced:
                    os.fsync(out.fileno())
            with self._lock:
                if self._cancelled:
                    os.unlink(tmp)
                    return False
                os.replace(tmp, self._path)
            if replicator.config.synced:
                _fsync_dir(os.path.dirname(self._path))
            log.info("snapshot written partition=%d index=%d sm_index=%d", group._kv_partition, last[1], sm_index)
            return True
        except Exception:
            log.exception("snapshot failed partition=%d", group._kv_partition)
            return False
        finally:
            replicator._driver.mark_threadsafe(group._kv_partition)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_dump_header(inp: BinaryIO) -> dict[str, Any]:
    """Read our header and leave `inp` at the state machine's payload."""
    magic, sm_index, size = DUMP_HEADER.unpack(inp.read(DUMP_HEADER.size))
    if magic != DUMP_MAGIC:
        raise ValueError(f"not a kvstore snapshot (magic {magic!r})")
    header: dict[str, Any] = msgpack.unpackb(inp.read(size), raw=False)
    header["sm_index"] = sm_index
    return header
