"""Our replicated command: a batch of puts and deletes for one partition of one table.

Pure: no I/O, no clocks. The bytes are what the Raft log stores and every replica applies,
so the format is versioned (first byte) and decoding never trusts its input.

Layout (version 1): ``b"\\x01" + msgpack([partition, table_id, ids, values, records, deletes])``

- ``ids``: packed little-endian uint64 ids of the puts (8 bytes each);
- ``values``: packed rows of the puts, ``len(values) == n * row_bytes`` (embedding tables),
  or None;
- ``records``: one bytes value per put id (feature tables, msgpack records), or None;
- ``deletes``: packed little-endian uint64 ids to delete (applied after the puts).

Exactly one of ``values`` / ``records`` is set when there are puts; neither when there are
none.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

__all__ = ["VERSION", "Command", "CommandError", "decode", "encode"]

VERSION = 1
_ID_BYTES = 8


class CommandError(ValueError):
    """A command is malformed or of an unknown version."""


@dataclass(frozen=True)
class Command:
    """A batch of puts and deletes for one partition of one table."""

    partition: int
    table_id: int
    ids: bytes = b""
    values: bytes | None = None
    records: tuple[bytes, ...] | None = None
    deletes: bytes = b""

    @property
    def put_count(self) -> int:
        return len(self.ids) // _ID_BYTES

    @property
    def delete_count(self) -> int:
        return len(self.deletes) // _ID_BYTES

    @property
    def row_bytes(self) -> int:
        """Return the width of one packed row (0 without packed values)."""
        if self.values is None or not self.put_count:
            return 0
        return len(self.values) // self.put_count

    def validate(self) -> None:
        """Raise CommandError naming the field when the command is inconsistent."""
        if not 0 <= self.partition < 2**32:
            raise CommandError(f"partition {self.partition} outside [0, 2**32)")
        if not 0 <= self.table_id < 2**32:
            raise CommandError(f"table_id {self.table_id} outside [0, 2**32)")
        for name, buf in (("ids", self.ids), ("deletes", self.deletes)):
            if len(buf) % _ID_BYTES:
                raise CommandError(f"{name}: {len(buf)} bytes is not a multiple of {_ID_BYTES}")
        n = self.put_count
        if self.values is not None and self.records is not None:
            raise CommandError("values and records are both set")
        if n and self.values is None and self.records is None:
            raise CommandError(f"{n} put ids without values or records")
        if self.values is not None and (len(self.values) % max(n, 1) or (n == 0) != (len(self.values) == 0)):
            raise CommandError(f"values: {len(self.values)} bytes do not split into {n} equal rows")
        if self.records is not None and len(self.records) != n:
            raise CommandError(f"records: {len(self.records)} != {n} put ids")


def encode(command: Command) -> bytes:
    """Return the versioned bytes of `command`; raise CommandError if it is inconsistent."""
    command.validate()
    records = list(command.records) if command.records is not None else None
    body = [command.partition, command.table_id, command.ids, command.values, records, command.deletes]
    return bytes((VERSION,)) + msgpack.packb(body, use_bin_type=True)


def decode(data: bytes) -> Command:
    """Return the command in `data`; raise CommandError for any malformed or unknown input."""
    if not data:
        raise CommandError("empty command")
    if data[0] != VERSION:
        raise CommandError(f"command version {data[0]} != {VERSION}")
    try:
        body = msgpack.unpackb(data[1:], raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise CommandError(f"undecodable command body: {exc}") from exc
    if not isinstance(body, list) or len(body) != 6:
        raise CommandError("command body is not a 6-element list")
    partition, table_id, ids, values, records, deletes = body
    _check_types(partition, table_id, ids, values, records, deletes)
    command = Command(
        partition=partition,
        table_id=table_id,
        ids=ids,
        values=values,
        records=tuple(records) if records is not None else None,
        deletes=deletes,
    )
    command.validate()
    return command


def _check_types(
    partition: object, table_id: object, ids: object, values: object, records: object, deletes: object
) -> None:
    if not isinstance(partition, int) or not isinstance(table_id, int):
        raise CommandError("partition and table_id must be integers")
    if not isinstance(ids, bytes) or not isinstance(deletes, bytes):
        raise CommandError("ids and deletes must be bytes")
    if values is not None and not isinstance(values, bytes):
        raise CommandError("values must be bytes or nil")
    if records is not None and not (isinstance(records, list) and all(isinstance(r, bytes) for r in records)):
        raise CommandError("records must be a list of bytes or nil")
