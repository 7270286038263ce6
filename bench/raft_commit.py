"""Commit latency and batched throughput of the Raft engine (3 node processes on 127.0.0.1).

Usage: python -m bench.raft_commit [--seconds 10]
1. single: one proposer on one partition, 100-byte commands: p50/p99 latency;
2. batched: commands of 100 rows x 64 float32 (our command format), one proposer per
   partition on 1 and on 8 partitions (spread over the leaders): commands/s, rows/s, p50/p99;
3. pipelined: the same commands on 8 partitions with 16 proposals in flight on each
   (`propose_async`), which the engine batches per driver round.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.raft_nodes import Node, cluster, wait_for_leaders
from kvstore.replication.command import Command, encode


def _batch_command(rows: int, dim: int) -> bytes:
    ids = np.arange(rows, dtype="<u8").tobytes()
    values = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32).tobytes()
    return encode(Command(partition=0, table_id=1, ids=ids, values=values))


def _run(
    nodes: list[Node],
    leaders: dict[str, list[int]],
    partitions: int,
    seconds: float,
    command: bytes,
    in_flight: int = 1,
) -> tuple[list[float], int]:
    """Load the first `partitions` led partitions (round-robin over nodes) at once; return latencies."""
    chosen: dict[str, list[int]] = {n.node_id: [] for n in nodes}
    queue = [
        (node_id, p)
        for i in range(max(map(len, leaders.values()), default=0))
        for node_id, ps in leaders.items()
        if i < len(ps)
        for p in [ps[i]]
    ]
    for node_id, p in queue[:partitions]:
        chosen[node_id].append(p)
    busy = [n for n in nodes if chosen[n.node_id]]
    for n in busy:
        n.request("load", chosen[n.node_id], seconds, command, in_flight)
    latencies: list[float] = []
    max_lag = 0
    for n in busy:
        node_latencies, node_lag = n.reply(timeout_s=seconds + 120)
        latencies.extend(node_latencies)
        max_lag = max(max_lag, node_lag)
    return latencies, max_lag


def _report(name: str, result: tuple[list[float], int], seconds: float, rows: int) -> None:
    lat = np.array(result[0])
    rate = len(lat) / seconds
    print(
        f"{name}: {rate:,.0f} commands/s ({rate * rows:,.0f} rows/s), "
        f"p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms, n={len(lat)}, "
        f"max follower lag {result[1]} entries"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--synced", action="store_true", help="fsync every log write")
    args = parser.parse_args()
    with cluster(3, args.partitions, {"synced": args.synced, "balance_leaders": False}) as nodes:
        leaders = wait_for_leaders(nodes, args.partitions)
        small = b"x" * 100
        _report("single, 100 B", _run(nodes, leaders, 1, args.seconds, small), args.seconds, 1)
        batch = _batch_command(100, 64)
        print(f"batched command: {len(batch)} bytes")
        for parallel in (1, 8):
            result = _run(nodes, leaders, parallel, args.seconds, batch)
            _report(f"batched 100x64 f32, {parallel} partition(s)", result, args.seconds, 100)
        result = _run(nodes, leaders, 8, args.seconds, batch, in_flight=16)
        _report("pipelined 100x64 f32, 8 partitions x 16 in flight", result, args.seconds, 100)


if __name__ == "__main__":
    main()
