"""Counters of what a client did (read by benchmarks and dashboards)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClientStats:
    """Monotonic counters of what a client did, for benchmarks and dashboards."""

    calls: int = 0  # get/put/delete/feature calls that reached the network
    node_requests: int = 0  # per-node sub-requests sent
    routing_retries: int = 0  # retry rounds after a stale map
    unavailable_retries: int = 0  # retry rounds after an unreachable node
    leader_chases: int = 0  # resends to a hinted leader
    map_refreshes: int = 0
    failed_calls: int = 0  # calls that raised after their retries
    partial_keys: int = 0  # keys returned with status ERROR under partial=True
    hedges: int = 0  # read sub-requests also sent to other replicas after the hedge delay
    hedges_won: int = 0  # hedges that answered before the node they backed up
    read_failovers: int = 0  # read sub-requests resent at once to other replicas after an error
