"""The README's demo: a local 3-node cluster (3 replicas per partition), 100,000 embeddings, timed K=1000 lookups."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np
from hdrh.histogram import HdrHistogram
from rich.console import Console
from tqdm import tqdm

from kvclient import Client, KvError
from kvstore.launcher import LocalCluster

console = Console()
TABLE = "demo_items"


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo end to end; the cluster is always stopped, and a temporary folder removed."""
    root = args.dir or tempfile.mkdtemp(prefix="kvstore-demo-")
    cluster = LocalCluster.open(root)
    try:
        console.print(f"starting {args.nodes} nodes under {root} ...")
        seeds = cluster.up(args.nodes)
        console.print(f"serving at {','.join(seeds)}")
        with Client(seeds, deadline_s=10.0, transport=args.transport) as kv:
            vectors = _load(kv, args.keys, args.dim)
            if kv.view.proto.replicas > 1:
                console.print(f"every replica caught up {kv.wait_for_replicas():.2f} s after the last put")
            warmed = sum(r.rows_cached for r in kv.warm_cache(TABLE) if not isinstance(r, KvError))
            console.print(f"node caches warmed with {warmed:,} rows (writes do not fill them, reads do)")
            _lookups(kv, vectors, args.batch, args.seconds)
    finally:
        cluster.down()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        console.print("cluster stopped")
    return 0


def _load(kv: Client, keys: int, dim: int) -> np.ndarray:
    kv.create_table(TABLE, dim=dim, if_not_exists=True)
    vectors = np.random.default_rng(7).standard_normal((keys, dim), dtype=np.float32)
    ids = np.arange(keys, dtype=np.uint64)
    with tqdm(total=keys, unit="key", unit_scale=True, desc="load") as bar:
        for start in range(0, keys, 10_000):
            kv.put(TABLE, ids[start : start + 10_000], vectors[start : start + 10_000])
            bar.update(min(10_000, keys - start))
    return vectors


def _lookups(kv: Client, vectors: np.ndarray, batch: int, seconds: float) -> None:
    rng = np.random.default_rng(11)
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    checked = batches = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and batches < 1_000_000:
        ids = rng.integers(0, len(vectors), batch, dtype=np.uint64)
        t0 = time.perf_counter()
        res = kv.get(TABLE, ids)
        hist.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))
        batches += 1
        if batches % 50 == 1:
            if not (res.found.all() and np.array_equal(res.values, vectors[ids.astype(np.intp)])):
                raise AssertionError("demo: a lookup returned wrong rows")
            checked += 1
    elapsed = seconds if batches else 1
    console.print(
        f"K={batch}: {batches} batches in {elapsed:.1f} s, {batches * batch / elapsed:,.0f} keys/s; "
        f"p50 {hist.get_value_at_percentile(50) / 1000:.2f} ms, p99 {hist.get_value_at_percentile(99) / 1000:.2f} ms, "
        f"max {hist.get_max_value() / 1000:.2f} ms ({checked} batches checked bit-exact)"
    )
    sample = kv.get(TABLE, [42])
    console.print(f"row 42: {np.array2string(sample.values[0][:6], precision=4)} ... found={bool(sample.found[0])}")
