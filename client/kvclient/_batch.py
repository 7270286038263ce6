"""Split a batch of ids by node and merge per-node answers back into the caller's order.

Pure and vectorised: no sockets, no clocks, no per-key Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from kvclient._codec import IdArray
from kvclient._ring import partitions_of

T = TypeVar("T", bound=np.generic)


class KeyStatus(IntEnum):
    """Per-key outcome of a multi-get."""

    FOUND = 0
    MISSING = 1  # not stored; the table default was returned
    ERROR = 2  # its node failed or the deadline passed (partial results only)


@dataclass(frozen=True)
class NodeGroup:
    """The ids of one batch that go to one node, as positions into the unique ids."""

    node: int
    positions: npt.NDArray[np.intp]


@dataclass(frozen=True)
class UniqueIds:
    """The distinct ids of a batch and how to expand answers back to the caller's order.

    `inverse` is None when the batch had no duplicates: then `ids` is the batch itself, in
    the caller's order, and expanding is free.
    """

    ids: IdArray
    inverse: npt.NDArray[np.intp] | None

    def expand(self, per_unique: npt.NDArray[T]) -> npt.NDArray[T]:
        """Return `per_unique` (one entry per distinct id) in the caller's order."""
        return per_unique if self.inverse is None else per_unique[self.inverse]


def dedupe(ids: IdArray) -> UniqueIds:
    """Return the distinct ids and the inverse index into them (None without duplicates)."""
    ordered = np.sort(ids)
    if not (ordered[1:] == ordered[:-1]).any():
        return UniqueIds(ids=ids, inverse=None)
    uniq, inverse = np.unique(ids, return_inverse=True)
    return UniqueIds(ids=uniq, inverse=inverse.astype(np.intp, copy=False))


def group_by_node(
    table: str,
    ids: IdArray,
    positions: npt.NDArray[np.intp],
    partitions: int,
    node_of_partition: npt.NDArray[np.intp],
) -> list[NodeGroup]:
    """Group `ids[positions]` by the node chosen for their partition.

    `node_of_partition[p]` is the node index serving partition p for this request.
    """
    parts = partitions_of(table, ids[positions], partitions)
    nodes = node_of_partition[parts]
    order = np.argsort(nodes, kind="stable")
    counts = np.bincount(nodes, minlength=1)
    ends = np.cumsum(counts)
    return [
        NodeGroup(node=node, positions=positions[order[ends[node] - counts[node] : ends[node]]])
        for node in np.flatnonzero(counts).tolist()
    ]


class VectorMerge:
    """Accumulates per-node embedding answers for the unique ids of one batch."""

    def __init__(self, count: int, default: npt.NDArray[np.float32]) -> None:
        self.default = default
        self.values = np.empty((count, default.shape[0]), dtype=np.float32)
        self.status = np.full(count, KeyStatus.ERROR, dtype=np.uint8)

    def add(self, positions: npt.NDArray[np.intp], found: npt.NDArray[np.bool_], rows: npt.NDArray[np.generic]) -> None:
        """Record one node's answer: `rows` holds the found keys' rows, in order."""
        self.status[positions] = np.where(found, KeyStatus.FOUND, KeyStatus.MISSING)
        self.values[positions[found]] = rows

    def result(self, unique: UniqueIds) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        """Return (values, status) in the caller's order; rows not found get the default."""
        unfilled = self.status != KeyStatus.FOUND
        if unfilled.any():
            self.values[unfilled] = self.default
        return unique.expand(self.values), unique.expand(self.status)


def choose_replicas(replica_index: npt.NDArray[np.intp], node_cost: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """Return, per partition, the replica node with the lowest cost (ties: earlier replica).

    `node_cost[n]` is a node's current cost (in-flight requests; +inf when marked down).
    A partition whose replicas all cost +inf still gets its first replica.
    """
    padded = np.append(node_cost, np.inf)  # index -1 (no replica) costs +inf
    costs = padded[replica_index]
    best = np.argmin(costs, axis=1)
    chosen = replica_index[np.arange(len(replica_index)), best]
    return np.where(chosen >= 0, chosen, replica_index[:, 0])


def alternate_replicas(
    replica_index: npt.NDArray[np.intp], node_cost: npt.NDArray[np.float64], exclude: int
) -> npt.NDArray[np.intp]:
    """Return, per partition, the cheapest replica other than node `exclude`; -1 if none is usable.

    Used to hedge or fail over a node's share of a read: a replica costing +inf (marked
    down) or the excluded node never qualifies.
    """
    cost = np.append(node_cost, np.inf)  # index -1 (no replica) costs +inf
    cost[exclude] = np.inf
    costs = cost[replica_index]
    best = np.argmin(costs, axis=1)
    rows = np.arange(len(replica_index))
    return np.where(np.isfinite(costs[rows, best]), replica_index[rows, best], -1)
