"""A read-only view of the cluster map with the lookups the hot path needs precomputed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kvclient._errors import UnknownTableError
from kvclient._proto import kvstore_pb2 as pb


@dataclass(frozen=True)
class ClusterView:
    """Immutable snapshot of one cluster-map epoch.

    `replica_index[p, r]` is the index into `node_ids` of partition p's r-th replica
    (-1 where a partition has fewer replicas). Built once per epoch, shared by all requests.
    """

    proto: pb.ClusterMap
    node_ids: tuple[str, ...]
    addresses: dict[str, str]
    tables: dict[str, pb.TableSchema]
    replica_index: npt.NDArray[np.intp] = field(repr=False)

    @classmethod
    def from_proto(cls, cmap: pb.ClusterMap) -> ClusterView:
        """Build the view; raises ValueError if the placement names an unknown node."""
        node_ids = tuple(n.node_id for n in cmap.nodes)
        pos = {n: i for i, n in enumerate(node_ids)}
        width = max((len(p.node_ids) for p in cmap.placement), default=0)
        index = np.full((len(cmap.placement), max(width, 1)), -1, dtype=np.intp)
        for part, reps in enumerate(cmap.placement):
            for r, node in enumerate(reps.node_ids):
                if node not in pos:
                    raise ValueError(f"placement of partition {part} names unknown node {node!r}")
                index[part, r] = pos[node]
        return cls(
            proto=cmap,
            node_ids=node_ids,
            addresses={n.node_id: n.address for n in cmap.nodes},
            tables={t.name: t for t in cmap.tables},
            replica_index=index,
        )

    @property
    def epoch(self) -> int:
        return int(self.proto.epoch)

    @property
    def partitions(self) -> int:
        return int(self.proto.partitions)

    def table(self, name: str) -> pb.TableSchema:
        """Return the schema of `name` or raise `UnknownTableError`."""
        try:
            return self.tables[name]
        except KeyError:
            known = ", ".join(sorted(self.tables)) or "none"
            raise UnknownTableError(f"table {name!r} does not exist (tables: {known})", field="table") from None

    def partitions_of_node(self, node_id: str) -> list[int]:
        """Return the partitions that list `node_id` among their replicas."""
        return [p for p, reps in enumerate(self.proto.placement) if node_id in reps.node_ids]
