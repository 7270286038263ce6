"""What a node knows: its identity, the cluster map it follows, and its store.

`apply_map` is the one way a map takes effect: persist it (write, fsync, rename), then
adopt its tables and partitions. Maps only move forward in epoch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvclient._clustermap import ClusterView
from kvclient._errors import RoutingError, UnavailableError
from kvclient._proto import kvstore_pb2 as pb
from kvstore.config import NodeConfig
from kvstore.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalMap:
    """One epoch's map as this node sees it: the view plus the partitions held here."""

    node_id: str
    view: ClusterView
    owned: npt.NDArray[np.bool_]

    @property
    def epoch(self) -> int:
        return self.view.epoch

    def check_owned(self, parts: npt.NDArray[np.intp]) -> None:
        """Raise `RoutingError` (with our epoch) unless every partition is held here."""
        bad = parts[~self.owned[parts]]
        if len(bad):
            raise RoutingError(
                f"node {self.node_id} does not hold partition {int(bad[0])} at epoch {self.epoch}",
                field="ids",
                epoch=self.epoch,
            )


class NodeState:
    """A node's map and store; `apply_map` is thread-safe."""

    def __init__(self, config: NodeConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.started = time.monotonic()
        self.requests = 0
        self.address = ""
        self._lock = threading.Lock()
        self.local: LocalMap | None = None
        cmap = _load_map(config.map_path)
        if cmap is not None:
            self._adopt(cmap)

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def epoch(self) -> int:
        return self.local.epoch if self.local else 0

    def current(self) -> LocalMap:
        """Return the map in force; raises `UnavailableError` before bootstrap."""
        local = self.local
        if local is None:
            raise UnavailableError(f"node {self.node_id} has not joined a cluster yet")
        return local

    def apply_map(self, cmap: pb.ClusterMap) -> bool:
        """Persist and adopt `cmap` if it is newer; return whether it was adopted."""
        with self._lock:
            if cmap.epoch <= self.epoch:
                return False
            _save_map(self.config.map_path, cmap)
            self._adopt(cmap)
            return True

    def _adopt(self, cmap: pb.ClusterMap) -> None:
        view = ClusterView.from_proto(cmap)
        self.store.set_tables(list(cmap.tables))
        owned = np.zeros(view.partitions, dtype=np.bool_)
        owned[view.partitions_of_node(self.node_id)] = True
        self.local = LocalMap(self.node_id, view, owned)
        log.info("map adopted node=%s epoch=%d partitions_owned=%d", self.node_id, view.epoch, int(owned.sum()))


def _load_map(path: str) -> pb.ClusterMap | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pb.ClusterMap.FromString(f.read())


def _save_map(path: str, cmap: pb.ClusterMap) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(cmap.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
