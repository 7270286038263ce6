"""`Engine` on RocksDB via rocksdict: the only module that imports rocksdict.

One database per node, one column family per partition (`p<N>`), raw mode (bytes in and
out). Every column family is opened with the same options, so the block cache we size is
the one used (rocksdict otherwise silently keeps an 8 MiB cache on reopen).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import cast

import rocksdict as rd

log = logging.getLogger(__name__)

_CF_PREFIX = "p"


def _cf_name(partition: int) -> str:
    return f"{_CF_PREFIX}{partition}"


class RocksEngine:
    """RocksDB-backed `Engine`. Writes go through the WAL (kill -9 safe, not fsynced)."""

    def __init__(self, path: str, *, block_cache_bytes: int = 256 * 1024 * 1024) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._opts = self._options(block_cache_bytes)
        existing = rd.Rdict.list_cf(path, self._opts) if os.path.exists(os.path.join(path, "CURRENT")) else []
        families = {name: self._opts for name in existing}
        self._db = rd.Rdict(path, self._opts, column_families=families)
        self._cfs: dict[int, rd.Rdict] = {}
        self._handles: dict[int, rd.ColumnFamily] = {}
        for name in existing:
            if name.startswith(_CF_PREFIX) and name[1:].isdigit():
                self._open_cf(int(name[1:]))
        log.info("rocksdb opened path=%s partitions=%d", path, len(self._cfs))

    @staticmethod
    def _options(block_cache_bytes: int) -> rd.Options:
        opts = rd.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        table = rd.BlockBasedOptions()
        table.set_block_cache(rd.Cache(block_cache_bytes))
        table.set_bloom_filter(10, False)
        opts.set_block_based_table_factory(table)
        return opts

    def _open_cf(self, partition: int) -> rd.Rdict:
        cf = self._cfs.get(partition)
        if cf is None:
            name = _cf_name(partition)
            try:
                cf = self._db.get_column_family(name)
            except Exception:  # rocksdict raises a bare Exception for a missing family
                cf = self._db.create_column_family(name, self._opts)
            self._cfs[partition] = cf
            self._handles[partition] = self._db.get_column_family_handle(name)
        return cf

    def multi_get(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        cf = self._cfs.get(partition)
        if cf is None:
            return [None] * len(keys)
        # rocksdict's stub types a multi-get as Any | None; with a list of keys it is a list.
        return cast("list[bytes | None]", cf[list(keys)])

    def write(self, partition: int, keys: Sequence[bytes], values: Sequence[bytes | None]) -> None:
        self._open_cf(partition)
        batch = rd.WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._handles[partition])
        for key, value in zip(keys, values, strict=True):
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self._db.write(batch)

    def delete_range(self, partition: int, begin: bytes, end: bytes) -> None:
        cf = self._cfs.get(partition)
        # begin > end is an empty range here; RocksDB refuses it, and rocksdict then keeps
        # failing every later call on the database with the same error.
        if cf is not None and begin < end:
            cf.delete_range(begin, end)

    def items(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        # A RocksDB iterator reads from an implicit snapshot taken when it is created, here.
        cf = self._cfs.get(partition)
        if cf is None:
            return iter(())
        return cast(Iterator[tuple[bytes, bytes]], iter(cf.items()))

    def keys(self, partition: int, begin: bytes, end: bytes) -> Iterator[bytes]:
        cf = self._cfs.get(partition)
        if cf is None:
            return iter(())
        return itertools.takewhile(lambda key: key < end, cast(Iterator[bytes], cf.keys(from_key=begin)))

    def partitions(self) -> list[int]:
        return sorted(self._cfs)

    def drop_partition(self, partition: int) -> None:
        if self._cfs.pop(partition, None) is not None:
            self._handles.pop(partition, None)
            self._db.drop_column_family(_cf_name(partition))

    def size_bytes(self) -> int:
        total = 0
        for cf in self._cfs.values():
            total += int(cf.property_int_value("rocksdb.total-sst-files-size") or 0)
            total += int(cf.property_int_value("rocksdb.cur-size-all-mem-tables") or 0)
        return total

    def close(self) -> None:
        self._cfs.clear()
        self._handles.clear()
        self._db.close()
