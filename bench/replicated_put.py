"""Replicated write throughput: batched puts into a 3-node cluster with 3 replicas per partition.

    python -m bench.replicated_put [--batches 1000,10000,50000] [--keys 200000] [--dim 64]

Starts its own cluster under a temporary folder, loads `--keys` vectors per batch size (a
warm-up pass first, so leader elections and balancing have settled), prints vectors/s and
ms per put, checks a sample bit-exact, and stops every node it started.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np

from kvclient import Client
from kvstore.launcher import LocalCluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1000,10000,50000")
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="kvstore-replput-")
    cluster = LocalCluster.open(root)
    try:
        seeds = cluster.up(3, replicas=args.replicas)
        with Client(seeds, deadline_s=120.0) as kv:
            kv.create_table("t", dim=args.dim)
            rng = np.random.default_rng(1)
            warm = rng.standard_normal((10_000, args.dim)).astype(np.float32)
            kv.put("t", np.arange(10_000), warm)  # elections and leader balancing settle
            for batch in (int(b) for b in args.batches.split(",")):
                total = max(batch, min(args.keys, 20 * batch))
                vectors = rng.standard_normal((total, args.dim)).astype(np.float32)
                started = time.perf_counter()
                for start in range(0, total, batch):
                    kv.put("t", np.arange(start, start + batch), vectors[start : start + batch])
                elapsed = time.perf_counter() - started
                converge_s = _converge_s(kv, vectors, total)
                print(
                    f"batch {batch:>6}: {total / elapsed:>9,.0f} vectors/s, "
                    f"{elapsed / (total / batch) * 1000:7.1f} ms per put; every replica read back "
                    f"the last values {converge_s:.2f} s after the last put returned",
                    flush=True,
                )
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _converge_s(kv: Client, vectors: np.ndarray, total: int, timeout_s: float = 60.0) -> float:
    """Seconds until reads (served by any replica) return what was written; raises on timeout."""
    sample = np.arange(0, total, max(1, total // 1000))
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        # Several reads: each may go to a different replica of a partition.
        if all(np.array_equal(kv.get("t", sample).values, vectors[sample]) for _ in range(6)):
            return time.perf_counter() - started
        time.sleep(0.05)
    raise RuntimeError(f"replicas did not converge within {timeout_s} s")


if __name__ == "__main__":
    raise SystemExit(main())
