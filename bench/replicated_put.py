"""Replicated write throughput: batched puts into a 3-node cluster with 3 replicas per partition.

    python -m bench.replicated_put [--batches 1000,10000,50000] [--writers 1,4] [--keys 200000] [--dim 64]

Starts its own cluster under a temporary folder, then for each batch size and writer count
loads about `--keys` vectors (at least 3 puts per writer) with that many concurrent puts
in flight (each writer puts its own id range, back to back, on one shared async client). A
warm-up pass runs first, so leader elections and balancing have settled. Prints vectors/s,
ms per put and the load average, checks a sample bit-exact on every replica, and stops
every node it started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import numpy as np

from bench.scratch import scratch_cluster
from kvclient import AsyncClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1000,10000,50000")
    parser.add_argument("--writers", default="1,4", help="concurrent writers, comma-separated")
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    writers = [int(w) for w in args.writers.split(",")]
    with scratch_cluster("kvstore-replput-") as cluster:
        seeds = cluster.up(3, replicas=args.replicas)
        asyncio.run(_bench(seeds, batches, writers, args.keys, args.dim))
    return 0


async def _bench(seeds: list[str], batches: list[int], writers: list[int], keys: int, dim: int) -> None:
    async with AsyncClient(seeds, deadline_s=120.0) as kv:
        await kv.create_table("t", dim=dim)
        rng = np.random.default_rng(1)
        await kv.put("t", np.arange(10_000), rng.standard_normal((10_000, dim)).astype(np.float32))  # warm-up
        for batch in batches:
            for count in writers:
                puts = max(3, keys // batch // count)  # per writer
                total = puts * batch * count
                vectors = rng.standard_normal((total, dim)).astype(np.float32)
                started = time.perf_counter()
                await asyncio.gather(*(_writer(kv, vectors, w * puts * batch, puts, batch) for w in range(count)))
                elapsed = time.perf_counter() - started
                load = os.getloadavg()[0]
                converge_s = await _converge_s(kv, vectors, total)
                print(
                    f"batch {batch:>6} x {count} writer(s): {total / elapsed:>9,.0f} vectors/s, "
                    f"{elapsed / puts * 1000:7.1f} ms per put; load {load:.1f}; every replica read back "
                    f"the last values {converge_s:.2f} s after the last put returned",
                    flush=True,
                )


async def _writer(kv: AsyncClient, vectors: np.ndarray, first: int, puts: int, batch: int) -> None:
    for i in range(puts):
        start = first + i * batch
        await kv.put("t", np.arange(start, start + batch), vectors[start : start + batch])


async def _converge_s(kv: AsyncClient, vectors: np.ndarray, total: int, timeout_s: float = 60.0) -> float:
    """Seconds until reads (served by any replica) return what was written; raises on timeout."""
    sample = np.arange(0, total, max(1, total // 1000))
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        # Several reads: each may go to a different replica of a partition.
        reads = [await kv.get("t", sample) for _ in range(6)]
        if all(np.array_equal(r.values, vectors[sample]) for r in reads):
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise RuntimeError(f"replicas did not converge within {timeout_s} s")


if __name__ == "__main__":
    raise SystemExit(main())
