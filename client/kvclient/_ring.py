"""Key -> partition and partition -> replicas: the placement math, pure and deterministic.

Key -> partition: `mix64(id ^ xxh3_64(table)) % P`. The table name is hashed once with
xxhash; the per-key step is a vectorised 64-bit finaliser (MurmurHash3's fmix64) so a batch
of 10,000 ids is hashed in microseconds, not with 10,000 Python calls. P is fixed when the
cluster is created, so a key never changes partition.

Partition -> replicas: consistent hashing over nodes with virtual nodes (weight-scaled), with
bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): a node already holding
ceil(load_factor x average) replicas is skipped. Adding one node to N moves about 1/(N+1) of
the replicas; no node holds more than ceil(load_factor x average).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import xxhash

VNODES_PER_WEIGHT = 128
LOAD_FACTOR = 1.1

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def table_seed(table: str) -> np.uint64:
    """Return the per-table hash seed (xxh3_64 of the UTF-8 name)."""
    return np.uint64(xxhash.xxh3_64_intdigest(table.encode()))


def mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Return MurmurHash3's fmix64 of each element: a bijective, well-mixed 64-bit hash."""
    x = x ^ (x >> _S33)
    x = x * _M1
    x = x ^ (x >> _S33)
    x = x * _M2
    return x ^ (x >> _S33)


def partitions_of(table: str, ids: npt.NDArray[np.uint64], partitions: int) -> npt.NDArray[np.intp]:
    """Return the partition of every id of `table` (same length as `ids`)."""
    hashed = mix64(ids.astype(np.uint64, copy=False) ^ table_seed(table))
    return (hashed % np.uint64(partitions)).astype(np.intp)


def _point(label: str) -> int:
    return xxhash.xxh3_64_intdigest(label.encode())


def place(
    partitions: int,
    replicas: int,
    weights: Mapping[str, float],
) -> list[list[str]]:
    """Return, for every partition, the ordered list of node ids holding a replica.

    `weights` maps node id -> relative capacity (> 0). Each partition gets
    min(replicas, number of nodes) distinct nodes. Deterministic: the same arguments give the
    same answer in any process. No node holds more than ceil(LOAD_FACTOR x its weighted share)
    replicas whenever the weights allow it (always for equal weights). Raises ValueError for
    no nodes or a non-positive weight.
    """
    if not weights:
        raise ValueError("place: no nodes")
    if any(w <= 0 for w in weights.values()):
        raise ValueError(f"place: weights must be > 0, got {dict(weights)}")
    copies = min(replicas, len(weights))
    ring = _build_ring(weights)
    caps = _capacities(partitions * copies, weights)
    load = dict.fromkeys(weights, 0)
    keys = [p for p, _ in ring]
    out = []
    for part in range(partitions):
        chosen = _walk(ring, keys, _point(f"partition-{part}"), copies, caps, load)
        out.append(chosen)
    _relieve(out, caps, load)
    return out


def _build_ring(weights: Mapping[str, float]) -> list[tuple[int, str]]:
    ring = []
    for node, weight in weights.items():
        for i in range(max(1, round(VNODES_PER_WEIGHT * weight))):
            ring.append((_point(f"{node}#{i}"), node))
    ring.sort()
    return ring


def _capacities(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    wsum = sum(weights.values())
    return {n: math.ceil(LOAD_FACTOR * total * w / wsum) for n, w in weights.items()}


def _walk(
    ring: Sequence[tuple[int, str]],
    keys: Sequence[int],
    start: int,
    copies: int,
    caps: Mapping[str, int],
    load: dict[str, int],
) -> list[str]:
    chosen: list[str] = []
    i = bisect.bisect_left(keys, start)
    for step in range(2 * len(ring)):
        node = ring[(i + step) % len(ring)][1]
        # Second lap: ignore capacity so every partition gets its copies.
        full = step < len(ring) and load[node] >= caps[node]
        if node not in chosen and not full:
            chosen.append(node)
            load[node] += 1
            if len(chosen) == copies:
                break
    return chosen


def _relieve(out: list[list[str]], caps: Mapping[str, int], load: dict[str, int]) -> None:
    """Move replicas off nodes the second lap overfilled onto nodes under their cap.

    Late partitions can find fewer than `copies` non-full nodes. With equal weights a move
    always exists: an over-cap node shares fewer partitions with an under-cap node than it
    holds. Each move lowers the total overflow by one, so the loop ends.
    """
    moved = True
    while moved:
        moved = False
        for chosen in out:
            for slot, node in enumerate(chosen):
                if load[node] <= caps[node]:
                    continue
                spare = next((n for n in sorted(caps) if load[n] < caps[n] and n not in chosen), None)
                if spare is not None:
                    chosen[slot] = spare
                    load[node] -= 1
                    load[spare] += 1
                    moved = True
