"""kvstore as a measured system: a `LocalCluster` on 127.0.0.1 and the asyncio smart client.

One class serves `kvstore` (the scenario's `replicas`) and `kvstore_r<N>` (N copies per
partition), so a run can measure a single-copy and a replicated cluster side by side.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from bench.scenario import LEADER, Scenario
from bench.system import System
from bench.workload import F32, U64, Dataset
from kvclient import AsyncClient, Client, KeyStatus, KvError
from kvstore.launcher import LocalCluster

log = logging.getLogger(__name__)

TABLE = "bench"
LOAD_CHUNK = 50_000


class ActionUnsupportedError(RuntimeError):
    """A timeline action the cluster cannot carry out yet; the message names the missing piece."""


class KvstoreSystem(System):
    """N kvstore nodes (separate processes) and one `AsyncClient` on the measuring loop."""

    name = "kvstore"

    def __init__(self, scn: Scenario, name: str = "kvstore", replicas: int | None = None) -> None:
        super().__init__()
        self.scn = scn
        self.name = name
        self.replicas = scn.replicas if replicas is None else replicas
        self.root = ""
        self.cluster: LocalCluster | None = None
        self.kv: AsyncClient | None = None
        self.retries = 0
        self.hedges = 0
        self.load_s = 0.0
        self.warmed_rows = 0
        self.killed_leader = ""

    def start(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.root = tempfile.mkdtemp(prefix="kvstore-bench-")
        self.cluster = LocalCluster.open(self.root)
        seeds = self.cluster.up(
            self.scn.nodes, partitions=self.scn.partitions, replicas=self.replicas, cache_bytes=self.scn.cache_bytes
        )
        t0 = time.perf_counter()
        with Client(seeds, deadline_s=60.0) as kv:
            kv.create_table(TABLE, dim=dataset.dim, dtype=self.scn.dtype)
            ids = np.arange(dataset.keys, dtype=np.uint64)
            for start in range(0, dataset.keys, LOAD_CHUNK):
                chunk = ids[start : start + LOAD_CHUNK]
                kv.put(TABLE, chunk, dataset.rows(chunk))
            if self.replicas > 1:
                kv.wait_for_replicas(timeout_s=120.0)  # reads may go to any replica
            self.load_s = time.perf_counter() - t0
            # Writes do not fill node caches: read the table into them, as an operator would
            # after a bulk load, so that reads are measured on warm caches.
            self.warmed_rows = sum(r.rows_cached for r in kv.warm_cache(TABLE) if not isinstance(r, KvError))
            self.check_sample(lambda x: kv.get(TABLE, x).values)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.down()
            self.cluster = None
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""

    async def open(self) -> None:
        if self.cluster is None:
            raise RuntimeError("kvstore: start() was not called")
        self.kv = AsyncClient(self.cluster.seeds, deadline_s=self.scn.deadline_s)
        await self.kv.connect()

    async def close(self) -> None:
        if self.kv is not None:
            self.retries += _retries(self.kv)
            self.hedges += self.kv.stats.hedges
            await self.kv.close()
            self.kv = None

    @property
    def client(self) -> AsyncClient:
        if self.kv is None:
            raise RuntimeError("kvstore: open() was not called")
        return self.kv

    async def get(self, ids: U64) -> tuple[F32, int]:
        res = await self.client.get(TABLE, ids, deadline_s=self.scn.deadline_s, partial=self.scn.partial)
        missing = int(np.count_nonzero(res.status != KeyStatus.FOUND))
        return res.values, missing

    async def put(self, ids: U64) -> None:
        await self.client.put(TABLE, ids, self.data.rows(ids), deadline_s=self.scn.deadline_s)

    def server_pids(self) -> list[int]:
        return [n.pid for n in self.cluster.running()] if self.cluster else []

    def counters(self) -> dict[str, int | None]:
        retries = _retries(self.kv) if self.kv is not None else 0
        hedges = self.kv.stats.hedges if self.kv is not None else 0
        return {"retries": self.retries + retries, "hedges": self.hedges + hedges}

    def info(self) -> dict[str, Any]:
        copies = "1 copy" if self.replicas == 1 else f"{self.replicas} replicas"
        return {
            "label": f"kvstore {self.scn.nodes} nodes, {copies} per partition",
            "client": "kvclient.AsyncClient (stream transport) on the generator's loop",
            "nodes": self.scn.nodes,
            "partitions": self.scn.partitions,
            "replicas": self.replicas,
            "cache_bytes": self.scn.cache_bytes,
            "load_s": round(self.load_s, 2),
            "warmed_rows": self.warmed_rows,
        }

    async def node_stats(self) -> dict[str, Any]:
        """Return cache hits/misses and requests summed over the nodes that answer."""
        totals = {"cache_hits": 0, "cache_misses": 0, "requests": 0, "keys_read": 0, "nodes_answered": 0}
        for stats in await self.client.node_stats():
            if isinstance(stats, Exception):
                continue
            totals["nodes_answered"] += 1
            for key in ("cache_hits", "cache_misses", "requests", "keys_read"):
                totals[key] += int(getattr(stats, key))
        return totals

    # ---- timeline actions (bench.actions) ----

    async def kill(self, node_id: str) -> dict[str, Any]:
        """SIGKILL one node; `leader` picks the node leading the most partitions right now.

        Returns what the event records: the node, and for `leader` the partitions it led
        (with one copy per partition, the node's partitions are unavailable until it restarts).
        """
        if self.cluster is None:
            raise RuntimeError("kvstore: start() was not called")
        out: dict[str, Any] = {}
        if node_id == LEADER:
            node_id, led = await self.busiest_leader()
            self.killed_leader = node_id
            out = {"node": node_id, "chosen_as": LEADER, "led_partitions": led}
        self.cluster.kill(node_id)
        return out

    async def busiest_leader(self) -> tuple[str, list[int]]:
        """Return the node that leads the most partitions (GetPartitionStatus) and those partitions."""
        led: dict[str, list[int]] = {}
        for resp in await self.client.partition_status():
            if isinstance(resp, KvError):
                continue
            led[resp.node_id] = sorted(g.partition for g in resp.groups if g.is_leader)
        if not any(led.values()):
            raise RuntimeError("kill leader: no node reports leading a partition (is the cluster replicated?)")
        node_id = max(led, key=lambda n: len(led[n]))
        return node_id, led[node_id]

    async def restart(self, node_id: str) -> dict[str, Any]:
        """Start a stopped node again on its folder and wait until it serves (`leader`: the killed leader)."""
        cluster = self.cluster
        if cluster is None:
            raise RuntimeError("kvstore: start() was not called")
        out: dict[str, Any] = {}
        if node_id == LEADER:
            if not self.killed_leader:
                raise RuntimeError("restart leader: no earlier 'kill leader' action stopped a node")
            node_id = self.killed_leader
            out = {"node": node_id, "chosen_as": LEADER}

        def blocking() -> None:
            cluster.start_node(node_id, cache_bytes=self.scn.cache_bytes)
            cluster.wait_ready(node_id, timeout_s=30.0)

        await asyncio.to_thread(blocking)
        return out

    async def add_node(self, node_id: str) -> None:
        """Not yet possible: a new node only takes traffic once partitions move to it."""
        raise ActionUnsupportedError(
            f"add_node {node_id or ''}: needs rebalancing (issue 5); a node added today would hold no partitions"
        )


def _retries(kv: AsyncClient) -> int:
    """Retry rounds of one client: after a stale map, an unreachable node, or a moved leader."""
    stats = kv.stats
    return stats.routing_retries + stats.unavailable_retries + stats.leader_chases
