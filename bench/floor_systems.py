"""The in-process floors: what a multi-get costs with no network and no server at all.

- `floor_rocksdict`: RocksDB through rocksdict in raw mode on a temporary folder, a 1 GiB
  block cache warmed by reading every key once, `db[keys]` multi-get, then
  `np.frombuffer(b"".join(values))`: the storage engine kvstore uses, minus everything else.
- `floor_numpy`: a dense array and `V[ids]`: the memory floor.

Both run inline on the generator's event loop (a call blocks it, as a single-threaded
caller would be blocked), so their latency under open load includes queueing behind the
previous call, and their CPU is the client process's.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from importlib import metadata
from typing import Any

import numpy as np
import rocksdict as rd

from bench.redis_systems import redis_keys
from bench.scenario import Scenario
from bench.system import System
from bench.workload import F32, U64, Dataset

BLOCK_CACHE_BYTES = 1 << 30
LOAD_CHUNK = 50_000


class RocksFloorSystem(System):
    """rocksdict multi-get + numpy assembly in this process."""

    name = "floor_rocksdict"

    def __init__(self, scn: Scenario) -> None:
        super().__init__()
        self.scn = scn
        self.root = ""
        self.db: rd.Rdict | None = None
        self.load_s = 0.0

    def start(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.root = tempfile.mkdtemp(prefix="kvstore-bench-rocks-")
        opts = rd.Options(raw_mode=True)
        opts.create_if_missing(True)
        table = rd.BlockBasedOptions()
        table.set_block_cache(rd.Cache(BLOCK_CACHE_BYTES))
        table.set_bloom_filter(10, False)
        opts.set_block_based_table_factory(table)
        # column_families too: otherwise rocksdict may keep an 8 MiB cache (performance-floors.md)
        self.db = rd.Rdict(self.root, opts, column_families={"default": opts})
        t0 = time.perf_counter()
        self._load()
        self.load_s = time.perf_counter() - t0
        self._warm()
        self.check_sample(self._get_sync)

    def _load(self) -> None:
        db, data = self._db(), self.data
        for start in range(0, data.keys, LOAD_CHUNK):
            ids = np.arange(start, min(data.keys, start + LOAD_CHUNK), dtype=np.uint64)
            raw, width = data.rows(ids).tobytes(), data.row_bytes
            batch = rd.WriteBatch(raw_mode=True)
            for key, off in zip(redis_keys(ids), range(0, len(raw), width), strict=True):
                batch.put(key, raw[off : off + width])
            db.write(batch)
        db.flush()
        db.compact_range(None, None)

    def _warm(self) -> None:
        for start in range(0, self.data.keys, LOAD_CHUNK):
            self._multi_get(redis_keys(np.arange(start, min(self.data.keys, start + LOAD_CHUNK), dtype=np.uint64)))

    def _db(self) -> rd.Rdict:
        if self.db is None:
            raise RuntimeError("floor_rocksdict: start() was not called")
        return self.db

    def stop(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""

    def _multi_get(self, keys: list[bytes]) -> list[bytes]:
        values: list[bytes] = self._db()[keys]  # type: ignore[index,assignment]  # stub: no list[bytes]
        return values

    def _get_sync(self, ids: U64) -> F32:
        values = self._multi_get(redis_keys(ids))
        rows = np.frombuffer(b"".join(values), dtype=self.data.stored.dtype).reshape(len(ids), self.data.dim)
        return rows.astype(np.float32, copy=False)

    async def get(self, ids: U64) -> tuple[F32, int]:
        return self._get_sync(ids), 0

    async def put(self, ids: U64) -> None:
        raw, width = self.data.rows(ids).tobytes(), self.data.row_bytes
        batch = rd.WriteBatch(raw_mode=True)
        for key, off in zip(redis_keys(ids), range(0, len(raw), width), strict=True):
            batch.put(key, raw[off : off + width])
        self._db().write(batch)

    def info(self) -> dict[str, Any]:
        return {
            "label": "floor: rocksdict in process",
            "client": f"rocksdict {metadata.version('rocksdict')} raw mode, db[keys] + np.frombuffer, inline",
            "block_cache_bytes": BLOCK_CACHE_BYTES,
            "load_s": round(self.load_s, 2),
        }


class NumpyFloorSystem(System):
    """A dense array in this process: `V[ids]`."""

    name = "floor_numpy"

    def __init__(self, scn: Scenario) -> None:
        super().__init__()
        self.scn = scn

    def start(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.check_sample(lambda ids: self.data.expected(ids))

    def stop(self) -> None:
        self.dataset = None

    async def get(self, ids: U64) -> tuple[F32, int]:
        return self.data.stored[ids.astype(np.intp)].astype(np.float32, copy=False), 0

    async def put(self, ids: U64) -> None:
        idx = ids.astype(np.intp)
        self.data.stored[idx] = self.data.stored[idx]

    def info(self) -> dict[str, Any]:
        return {"label": "floor: numpy V[ids] in process", "client": f"numpy {np.__version__}, inline"}
