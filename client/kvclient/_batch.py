"""Split a batch of ids by node and merge per-node answers back into the caller's order.

Pure and vectorised: no sockets, no clocks, no per-key Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from kvclient._codec import IdArray
from kvclient._ring import partitions_of


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
    """The distinct ids of a batch and how to expand answers back to the caller's order."""

    ids: IdArray
    inverse: npt.NDArray[np.intp]


def dedupe(ids: IdArray) -> UniqueIds:
    """Return the distinct ids (sorted) and the inverse index into them."""
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
    sorted_nodes = nodes[order]
    bounds = np.flatnonzero(np.diff(sorted_nodes)) + 1
    return [
        NodeGroup(node=int(sorted_nodes[chunk[0]]), positions=positions[order[chunk]])
        for chunk in np.split(np.arange(len(order)), bounds)
        if len(chunk)
    ]


class VectorMerge:
    """Accumulates per-node embedding answers for the unique ids of one batch."""

    def __init__(self, count: int, default: npt.NDArray[np.float32]) -> None:
        self.values = np.empty((count, default.shape[0]), dtype=np.float32)
        self.values[:] = default
        self.status = np.full(count, KeyStatus.ERROR, dtype=np.uint8)

    def add(self, positions: npt.NDArray[np.intp], found: npt.NDArray[np.bool_], rows: npt.NDArray[np.generic]) -> None:
        """Record one node's answer: `rows` holds the found keys' rows, in order."""
        self.status[positions] = np.where(found, KeyStatus.FOUND, KeyStatus.MISSING)
        self.values[positions[found]] = rows

    def result(self, inverse: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        """Return (values, status) expanded to the caller's order (duplicates included)."""
        return self.values[inverse], self.status[inverse]


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
