"""Idle CPU of each node process of a 3-node cluster with 64 Raft groups per node.

Usage: python -m bench.raft_idle_cpu [--partitions 64] [--seconds 20] [--no-balance]
Target (issue #4): under 5 % of one core per node. Also prints the leader split.
"""

from __future__ import annotations

import argparse
import time

from bench.raft_nodes import cluster, wait_for_leaders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to let elections and balancing finish")
    parser.add_argument("--no-balance", action="store_true")
    args = parser.parse_args()
    config = {"balance_leaders": not args.no_balance}
    with cluster(args.nodes, args.partitions, config) as nodes:
        wait_for_leaders(nodes, args.partitions)
        time.sleep(args.settle)
        before = [n.cpu_s() for n in nodes]
        start = time.monotonic()
        time.sleep(args.seconds)
        elapsed = time.monotonic() - start
        after = [n.cpu_s() for n in nodes]
        leaders = wait_for_leaders(nodes, args.partitions)
        for node, b, a in zip(nodes, before, after, strict=True):
            cpu_pct = 100 * (a - b) / elapsed
            print(f"{node.node_id}: idle CPU {cpu_pct:.2f} % of a core, leads {len(leaders[node.node_id])}")
        print(f"groups per node: {args.partitions}; leader split: {[len(v) for v in leaders.values()]}")


if __name__ == "__main__":
    main()
