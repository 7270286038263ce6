"""The partition state machine: applies replicated commands to the node's `Store`.

Implements `kvstore.replication.StateMachine`. `apply` is deterministic, skips entries at or
below the partition's stored applied index (replays after a restart), writes the data and
the new index in one engine write, and never raises: a malformed command is reported as an
error result and counted as applied, so one bad entry cannot block its group forever.
"""

from __future__ import annotations

import logging
from typing import BinaryIO

import numpy as np

from kvstore.replication.command import Command, CommandError, decode
from kvstore.store import Store

log = logging.getLogger(__name__)

OK = b"ok"
SKIPPED = b"skipped"
ERROR_PREFIX = b"error:"


class StoreStateMachine:
    """Applies commands of every local partition to one `Store`. Thread-safe via the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def apply(self, partition: int, command: bytes, index: int) -> bytes:
        try:
            cmd = decode(command)
            if cmd.partition != partition:
                raise CommandError(f"command for partition {cmd.partition} applied to {partition}")
            return OK if self._apply(cmd, index) else SKIPPED
        except Exception as exc:  # never raise from apply: the group would retry it forever
            log.error("apply failed partition=%d index=%d error=%r", partition, index, exc)
            self._mark_applied(partition, index)
            return ERROR_PREFIX + repr(exc).encode()

    def _apply(self, cmd: Command, index: int) -> bool:
        ids = np.frombuffer(cmd.ids, dtype="<u8").astype(np.uint64)
        deletes = np.frombuffer(cmd.deletes, dtype="<u8").astype(np.uint64)
        if cmd.records is not None:
            values = list(cmd.records)
        elif cmd.values is not None and len(ids):
            width = cmd.row_bytes
            values = [cmd.values[i : i + width] for i in range(0, len(cmd.values), width)]
        else:
            values = []
        return self.store.apply_batch(cmd.partition, cmd.table_id, ids, values, deletes, index)

    def _mark_applied(self, partition: int, index: int) -> None:
        try:
            self.store.apply_batch(partition, 0, np.empty(0, np.uint64), [], np.empty(0, np.uint64), index)
        except Exception:  # the engine itself is failing; the group will stall and say so
            log.exception("cannot record applied index partition=%d index=%d", partition, index)

    def applied_index(self, partition: int) -> int:
        return self.store.applied_index(partition)

    def snapshot(self, partition: int, out: BinaryIO) -> int:
        return self.store.dump_partition(partition, out)

    def restore(self, partition: int, inp: BinaryIO) -> None:
        self.store.restore_partition(partition, inp)
