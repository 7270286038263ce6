"""A node's tables: the engine plus the cache tier, kept coherent on every write.

Engine keys are `table_id (4 bytes BE) + id (8 bytes BE)` inside the partition's keyspace,
so a dropped table is one range delete per partition and a re-created name (new table id)
never sees old rows. Embedding rows are stored in the table's dtype, little-endian; feature
records as msgpack bytes.

Thread-safe: one lock serialises engine and cache access, so a replication apply thread and
the request loop can share a `Store`.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import msgpack
import numpy as np
import numpy.typing as npt

from kvclient._codec import NUMPY_DTYPES
from kvclient._errors import UnknownTableError
from kvclient._proto import kvstore_pb2 as pb
from kvstore.engine import Engine
from kvstore.lru import ENTRY_OVERHEAD_BYTES, RecordCache, VectorCache

log = logging.getLogger(__name__)

_KEY_DTYPE = np.dtype([("table", ">u4"), ("id", ">u8")])
KEY_BYTES = _KEY_DTYPE.itemsize
# Table id 0 is never handed out, so its key range holds a partition's own bookkeeping.
APPLIED_KEY = b"\x00\x00\x00\x00applied"
SNAPSHOT_VERSION = 1
_NO_IDS = np.empty(0, dtype=np.uint64)


def encode_keys(table_id: int, ids: npt.NDArray[np.uint64]) -> list[bytes]:
    """Return the engine key of every id of one table (vectorised packing)."""
    packed = np.empty(len(ids), dtype=_KEY_DTYPE)
    packed["table"] = table_id
    packed["id"] = ids
    buf = packed.tobytes()
    return [buf[i : i + KEY_BYTES] for i in range(0, len(buf), KEY_BYTES)]


def decode_ids(keys: Sequence[bytes]) -> npt.NDArray[np.uint64]:
    """Return the ids of engine keys of one table (the inverse of `encode_keys`)."""
    return np.frombuffer(b"".join(keys), dtype=_KEY_DTYPE)["id"].astype(np.uint64)


def table_range(table_id: int) -> tuple[bytes, bytes]:
    """Return [begin, end) covering every engine key of one table."""
    return table_id.to_bytes(4, "big"), (table_id + 1).to_bytes(4, "big")


def last_occurrence(ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
    """Return the positions of each id's last occurrence, in first-seen order of those."""
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    return np.sort(len(ids) - 1 - first_in_reversed).astype(np.intp)


def split_by_partition(
    parts: npt.NDArray[np.intp],
) -> Iterable[tuple[int, npt.NDArray[np.intp]]]:
    """Yield (partition, positions) for every partition present, positions in input order."""
    order = np.argsort(parts, kind="stable")
    sorted_parts = parts[order]
    bounds = np.flatnonzero(np.diff(sorted_parts)) + 1
    for chunk in np.split(order, bounds):
        if len(chunk):
            yield int(parts[chunk[0]]), chunk


@dataclass
class StoreStats:
    """Counters a node reports."""

    cache_hits: int = 0
    cache_misses: int = 0
    keys_read: int = 0
    keys_written: int = 0


class Store:
    """Tables on one node: reads through the cache tier (filling it), writes to the engine (refreshing cached rows)."""

    def __init__(self, engine: Engine, cache_budget_bytes: int) -> None:
        self.engine = engine
        self.cache_budget_bytes = cache_budget_bytes
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._tables: dict[int, pb.TableSchema] = {}
        self._vectors: dict[int, VectorCache] = {}
        self._records: dict[int, RecordCache] = {}
        self._applied: dict[int, int] = {}  # the engine's APPLIED_KEY per partition, read once

    # ---- schema ----

    def set_tables(self, tables: Sequence[pb.TableSchema]) -> None:
        """Adopt the map's tables: drop the data of removed ones, size caches for the rest.

        The cache budget is shared equally among tables; a change of table count resizes
        (and so empties) the caches.
        """
        wanted = {t.table_id: t for t in tables}
        with self._lock:
            for table_id in set(self._tables) - set(wanted):
                self._drop_locked(table_id)
            if set(wanted) != set(self._tables):
                self._tables = dict(wanted)
                self._size_caches_locked()

    def _size_caches_locked(self) -> None:
        share = self.cache_budget_bytes // max(1, len(self._tables))
        self._vectors = {
            tid: VectorCache(t.dim * NUMPY_DTYPES[t.dtype].itemsize, share)
            for tid, t in self._tables.items()
            if t.kind == pb.EMBEDDING
        }
        self._records = {tid: RecordCache(share) for tid, t in self._tables.items() if t.kind == pb.FEATURES}

    def _drop_locked(self, table_id: int) -> None:
        begin, end = table_range(table_id)
        for partition in self.engine.partitions():
            self.engine.delete_range(partition, begin, end)
        log.info("table dropped table_id=%d", table_id)

    @property
    def cache_bytes(self) -> int:
        with self._lock:
            return sum(c.size_bytes for c in self._vectors.values()) + sum(c.size_bytes for c in self._records.values())

    def _vector_cache(self, table: pb.TableSchema) -> VectorCache:
        """The table's cache (lock held); a table dropped by a map adopted meanwhile is unknown."""
        cache = self._vectors.get(table.table_id)
        if cache is None:
            raise UnknownTableError(f"table {table.name!r} was dropped", field="table")
        return cache

    def _cache(self, table: pb.TableSchema) -> VectorCache | RecordCache:
        return self._record_cache(table) if table.kind == pb.FEATURES else self._vector_cache(table)

    def _record_cache(self, table: pb.TableSchema) -> RecordCache:
        cache = self._records.get(table.table_id)
        if cache is None:
            raise UnknownTableError(f"table {table.name!r} was dropped", field="table")
        return cache

    # ---- reads ----

    def get_vectors(
        self, table: pb.TableSchema, ids: npt.NDArray[np.uint64], parts: npt.NDArray[np.intp]
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.uint8]]:
        """Return (found mask, stored-dtype rows of the found ids as uint8 bytes, in order)."""
        with self._lock:
            cache = self._vector_cache(table)
            slots = cache.lookup(ids)
            found = slots >= 0
            misses = np.flatnonzero(~found)
            self._count_reads(len(ids), len(misses))
            if not len(misses):  # the hot path: one gather, no masks
                return found, cache.rows(slots)
            rows = np.empty((len(ids), cache.row_bytes), dtype=np.uint8)
            rows[found] = cache.rows(slots[found])
            self._read_misses(table, ids, parts, misses, found, rows)
            fetched = misses[found[misses]]
            _, first = np.unique(ids[fetched], return_index=True)  # the cache takes unique ids
            cache.insert(ids[fetched[first]], rows[fetched[first]])
            return found, rows[found]

    def _read_misses(
        self,
        table: pb.TableSchema,
        ids: npt.NDArray[np.uint64],
        parts: npt.NDArray[np.intp],
        misses: npt.NDArray[np.intp],
        found: npt.NDArray[np.bool_],
        rows: npt.NDArray[np.uint8],
    ) -> None:
        keys = encode_keys(table.table_id, ids[misses])
        for partition, sel in split_by_partition(parts[misses]):
            values = self.engine.multi_get(partition, [keys[i] for i in sel])
            hit = np.fromiter((v is not None for v in values), dtype=np.bool_, count=len(values))
            if hit.any():
                dest = misses[sel[hit]]
                payload = b"".join(v for v in values if v is not None)
                rows[dest] = np.frombuffer(payload, dtype=np.uint8).reshape(len(dest), -1)
                found[dest] = True

    def get_records(
        self, table: pb.TableSchema, ids: npt.NDArray[np.uint64], parts: npt.NDArray[np.intp]
    ) -> tuple[npt.NDArray[np.bool_], list[bytes]]:
        """Return (found mask, msgpack records of the found ids, in order)."""
        with self._lock:
            cache = self._record_cache(table)
            values = cache.get_many(ids)
            misses = np.array([i for i, v in enumerate(values) if v is None], dtype=np.intp)
            self._count_reads(len(ids), len(misses))
            if len(misses):
                keys = encode_keys(table.table_id, ids[misses])
                for partition, sel in split_by_partition(parts[misses]):
                    for i, value in zip(sel, self.engine.multi_get(partition, [keys[j] for j in sel]), strict=True):
                        values[misses[i]] = value
                filled = [int(i) for i in misses if values[i] is not None]
                cache.insert(ids[filled], [values[i] for i in filled])  # type: ignore[misc]
            found = np.fromiter((v is not None for v in values), dtype=np.bool_, count=len(values))
            return found, [v for v in values if v is not None]

    def warm(self, table: pb.TableSchema, partitions: Iterable[int], chunk: int = 4096) -> tuple[int, bool]:
        """Read `table`'s rows of `partitions` into its cache until the cache is full.

        Returns (rows added, whether it stopped because the cache was full). Rows already
        cached are left as they are and nothing is evicted. Each chunk is read and cached
        under the lock, so a write applied meanwhile is never overwritten by an older value;
        reads and writes go on between chunks. Not counted as reads in `stats`.
        """
        begin, end = table_range(table.table_id)
        added = 0
        for partition in partitions:
            with self._lock:
                keys = self.engine.keys(partition, begin, end)
            while True:
                with self._lock:
                    batch = list(itertools.islice(keys, chunk))
                    if not batch:
                        break
                    got, full = self._warm_locked(self._cache(table), partition, batch)
                added += got
                if full:
                    return added, True
        return added, False

    def _warm_locked(self, cache: VectorCache | RecordCache, partition: int, keys: list[bytes]) -> tuple[int, bool]:
        """Cache the rows of `keys` not cached yet while there is room; return (rows added, full)."""
        ids = decode_ids(keys)
        absent = np.setdiff1d(np.arange(len(keys)), cache.holding(ids), assume_unique=True).tolist()
        values = self.engine.multi_get(partition, [keys[i] for i in absent])
        stored = [(i, v) for i, v in zip(absent, values, strict=True) if v is not None]  # (position, value)
        if isinstance(cache, VectorCache):
            fits = stored[: cache.capacity - len(cache)]
            if fits:
                rows = np.frombuffer(b"".join(v for _, v in fits), dtype=np.uint8)
                cache.insert(ids[[i for i, _ in fits]], rows.reshape(len(fits), cache.row_bytes))
        else:
            fits, room = [], cache.budget_bytes - cache.size_bytes
            for i, v in stored:
                room -= len(v) + ENTRY_OVERHEAD_BYTES
                if room < 0:
                    break
                fits.append((i, v))
            cache.insert(ids[[i for i, _ in fits]], [v for _, v in fits])
        return len(fits), len(fits) < len(stored)

    def _count_reads(self, keys: int, misses: int) -> None:
        self.stats.keys_read += keys
        self.stats.cache_misses += misses
        self.stats.cache_hits += keys - misses

    # ---- writes ----

    def put_vectors(
        self,
        table: pb.TableSchema,
        ids: npt.NDArray[np.uint64],
        parts: npt.NDArray[np.intp],
        rows: npt.NDArray[np.generic],
    ) -> int:
        """Write rows (stored dtype) atomically per partition; a later duplicate id wins."""
        keep = last_occurrence(ids)
        ids, parts = ids[keep], parts[keep]
        raw = np.ascontiguousarray(rows[keep]).view(np.uint8).reshape(len(keep), -1)
        payload = raw.tobytes()
        width = raw.shape[1]
        values = [payload[i : i + width] for i in range(0, len(payload), width)]
        with self._lock:
            self._vector_cache(table)  # a table dropped meanwhile is refused before any write
            self._write_locked(table, ids, parts, values)
            self._refresh_cached_locked(table.table_id, ids, values, _NO_IDS)
        return len(keep)

    def put_records(
        self, table: pb.TableSchema, ids: npt.NDArray[np.uint64], parts: npt.NDArray[np.intp], records: Sequence[bytes]
    ) -> int:
        """Write feature records atomically per partition; a later duplicate id wins."""
        keep = last_occurrence(ids)
        values = [records[i] for i in keep]
        with self._lock:
            self._record_cache(table)
            self._write_locked(table, ids[keep], parts[keep], values)
            self._refresh_cached_locked(table.table_id, ids[keep], values, _NO_IDS)
        return len(keep)

    def delete(self, table: pb.TableSchema, ids: npt.NDArray[np.uint64], parts: npt.NDArray[np.intp]) -> int:
        """Delete ids (absent ones are fine); return how many distinct ids were deleted."""
        keep = last_occurrence(ids)
        with self._lock:
            self._cache(table)  # a table dropped meanwhile is refused before any write
            self._write_locked(table, ids[keep], parts[keep], [None] * len(keep))
            self._refresh_cached_locked(table.table_id, _NO_IDS, [], ids[keep])
        return len(keep)

    def _write_locked(
        self,
        table: pb.TableSchema,
        ids: npt.NDArray[np.uint64],
        parts: npt.NDArray[np.intp],
        values: Sequence[bytes | None],
    ) -> None:
        keys = encode_keys(table.table_id, ids)
        for partition, sel in split_by_partition(parts):
            self.engine.write(partition, [keys[i] for i in sel], [values[i] for i in sel])
        self.stats.keys_written += len(ids)

    # ---- replicated apply path ----

    def applied_index(self, partition: int) -> int:
        """Return the last replicated log index applied to `partition` (0 if none)."""
        with self._lock:
            return self._applied_locked(partition)

    def _applied_locked(self, partition: int) -> int:
        applied = self._applied.get(partition)
        if applied is None:  # only this class writes APPLIED_KEY, so the copy stays exact
            raw = self.engine.multi_get(partition, [APPLIED_KEY])[0]
            applied = self._applied[partition] = int.from_bytes(raw, "big") if raw else 0
        return applied

    def apply_batch(
        self,
        partition: int,
        table_id: int,
        put_ids: npt.NDArray[np.uint64],
        put_values: Sequence[bytes],
        delete_ids: npt.NDArray[np.uint64],
        index: int,
    ) -> bool:
        """Apply one replicated batch unless `index` is already applied; return whether it was.

        Puts, then deletes, then the new applied index go into one engine write, so a crash
        leaves either all of it or none, and a replay after restart is a no-op.
        The cached rows of the table are refreshed in the same critical section.
        """
        with self._lock:
            if index <= self._applied_locked(partition):
                return False
            keys = encode_keys(table_id, put_ids) + encode_keys(table_id, delete_ids) + [APPLIED_KEY]
            values: list[bytes | None] = [*put_values, *([None] * len(delete_ids)), index.to_bytes(8, "big")]
            self.engine.write(partition, keys, values)
            self._applied[partition] = index
            self.stats.keys_written += len(put_ids) + len(delete_ids)
            self._refresh_cached_locked(table_id, put_ids, put_values, delete_ids)
            return True

    def _refresh_cached_locked(
        self,
        table_id: int,
        put_ids: npt.NDArray[np.uint64],
        put_values: Sequence[bytes],
        delete_ids: npt.NDArray[np.uint64],
    ) -> None:
        """Give cached rows their new values and forget deleted ones; cache no new rows.

        Reads fill the cache, writes do not (no write-allocate, as RocksDB's block cache): a
        trainer's bulk load then cannot evict the rows serving reads keep hot, and a write of
        rows nobody reads costs one index probe instead of a cache insert (about half of a
        small replicated command's apply time).
        """
        cache: VectorCache | RecordCache | None = self._vectors.get(table_id)
        if cache is None:
            cache = self._records.get(table_id)
        if cache is None:
            return
        held = cache.holding(put_ids)
        if len(held):
            keep = held[last_occurrence(put_ids[held])]
            if isinstance(cache, VectorCache):
                rows = np.frombuffer(b"".join(put_values[i] for i in keep), dtype=np.uint8)
                cache.insert(put_ids[keep], rows.reshape(len(keep), cache.row_bytes))
            else:
                cache.insert(put_ids[keep], [put_values[i] for i in keep])
        cache.discard(delete_ids)

    def dump_partition(self, partition: int, out: BinaryIO) -> int:
        """Write a self-contained snapshot of `partition` to `out`; return its applied index.

        Reads from one engine iterator without holding the store lock, so applies go on.
        The applied index is read first: the data may include later entries, which is safe
        because replaying puts and deletes of whole rows from that index converges.
        """
        with self._lock:
            applied = self._applied_locked(partition)
            items = self.engine.items(partition)
        packer = msgpack.Packer(use_bin_type=True)
        out.write(packer.pack({"v": SNAPSHOT_VERSION, "partition": partition, "applied": applied}))
        for key, value in items:
            if key != APPLIED_KEY:
                out.write(packer.pack((key, value)))
        return applied

    def restore_partition(self, partition: int, inp: BinaryIO) -> int:
        """Replace `partition` with the snapshot in `inp`; return its applied index.

        Raises ValueError for a snapshot of another partition or format. The partition's
        cached rows of every table are dropped.
        """
        unpacker = msgpack.Unpacker(inp, raw=False, max_buffer_size=0)
        header = next(unpacker, None)
        if not isinstance(header, dict) or header.get("v") != SNAPSHOT_VERSION or header.get("partition") != partition:
            raise ValueError(
                f"snapshot: not a version {SNAPSHOT_VERSION} snapshot of partition {partition}: {header!r}"
            )
        with self._lock:
            self._applied.pop(partition, None)
            self.engine.drop_partition(partition)
            batch_keys: list[bytes] = []
            batch_values: list[bytes | None] = []
            for key, value in unpacker:
                batch_keys.append(key)
                batch_values.append(value)
                if len(batch_keys) >= 10_000:
                    self.engine.write(partition, batch_keys, batch_values)
                    batch_keys, batch_values = [], []
            applied = int(header["applied"])
            self.engine.write(partition, [*batch_keys, APPLIED_KEY], [*batch_values, applied.to_bytes(8, "big")])
            self._applied[partition] = applied
            # Cheaper than finding this partition's rows; reads refill the caches.
            for vectors in self._vectors.values():
                vectors.clear()
            for records in self._records.values():
                records.clear()
            return applied

    def close(self) -> None:
        with self._lock:
            self.engine.close()
