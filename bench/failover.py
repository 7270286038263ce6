"""How writes fared around a node kill: failover time and write stall, from the write stream's trace.

Pure: takes the write stream's per-request trace (request index, due second, latency or
None on error), the kill's second, and which requests touched a partition the killed node
led; returns plain figures for the JSON. Definitions (docs/benchmarks.md):

- `failover_s`: from the SIGKILL to the first acknowledgement of a write that was due at or
  after the kill and touched a partition the killed node led (None: no such write was
  acknowledged during the run). It includes the spacing of the stream (1 / rate).
- `longest_ack_gap_s`: the longest time between two consecutive write acknowledgements in
  the run (any partition), and when it began: the write stall a caller saw.
- `errors_after_kill`: writes due at or after the kill that failed (deadline, unavailable).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

Trace = list[tuple[int, float, float | None]]


def write_failover(trace: Trace, kill_s: float, affected: Callable[[int], bool]) -> dict[str, Any]:
    """Return failover time, write stall and errors of the writes around a kill at `kill_s`."""
    after = [(i, due, lat) for i, due, lat in trace if due >= kill_s]
    hit = [(due, lat) for i, due, lat in after if affected(i)]
    acked = sorted(due + lat for due, lat in hit if lat is not None)
    gap_s, gap_from_s = longest_gap(sorted(due + lat for _, due, lat in trace if lat is not None))
    return {
        "kill_s": round(kill_s, 3),
        "failover_s": round(acked[0] - kill_s, 3) if acked else None,
        "affected_writes_after_kill": len(hit),
        "errors_after_kill": sum(1 for _, _, lat in after if lat is None),
        "writes_after_kill": len(after),
        "longest_ack_gap_s": None if gap_s is None else round(gap_s, 3),
        "longest_ack_gap_from_s": None if gap_from_s is None else round(gap_from_s, 3),
    }


def longest_gap(times: list[float]) -> tuple[float | None, float | None]:
    """Return (longest gap between consecutive sorted `times`, where it began); (None, None) under two times."""
    if len(times) < 2:
        return None, None
    gap, start = max((b - a, a) for a, b in itertools.pairwise(times))
    return gap, start
