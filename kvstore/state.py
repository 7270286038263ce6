"""What a node knows: its identity, the cluster map it follows, and its store.

`apply_map` is the one way a map takes effect: persist it (write, fsync, rename), then
adopt its tables and partitions. Maps only move forward in epoch. With replicas > 1 the
node also has a `Replicator`: adopting a map teaches it the peers' Raft addresses and
opens the local replica (Raft group) of every partition the map places here.
"""

from __future__ import annotations

import asyncio
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
from kvstore.meta_group import META_GROUP, MetaStateMachine
from kvstore.metadata import raft_addresses
from kvstore.replication import NodeId, Replicator
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

    @property
    def replicated(self) -> bool:
        """Whether writes go through each partition's Raft group (replicas > 1)."""
        return self.view.proto.replicas > 1

    @property
    def meta_members(self) -> list[str]:
        """Members of the metadata Raft group (empty: metadata lives on `meta_node_id`)."""
        return list(self.view.proto.meta_node_ids)

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

    def __init__(
        self,
        config: NodeConfig,
        store: Store,
        replicator: Replicator | None = None,
        meta: MetaStateMachine | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.replicator = replicator
        self.meta = meta
        if meta is not None:
            meta.on_commit = self.apply_map
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

    async def adopt(self, cmap: pb.ClusterMap) -> bool:
        """`apply_map` from the event loop, on a worker thread.

        It fsyncs, may open Raft groups, and may wait for the metadata group's adopter
        thread to release the lock: none of that may stall the requests on the loop.
        """
        return await asyncio.to_thread(self.apply_map, cmap)

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
        local = LocalMap(self.node_id, view, owned)
        if local.replicated:
            self._open_groups(local)
        self.local = local
        log.info("map adopted node=%s epoch=%d partitions_owned=%d", self.node_id, view.epoch, int(owned.sum()))

    def _open_groups(self, local: LocalMap) -> None:
        """Open the Raft group of every partition placed here that is not open yet."""
        rep = self.replicator
        if rep is None:
            log.error(
                "map has replicas=%d but node %s runs without --raft-port", local.view.proto.replicas, self.node_id
            )
            return
        raft = raft_addresses(local.view.proto)
        learn = getattr(rep, "learn_addresses", None)
        if learn is not None:
            learn({NodeId(n): a for n, a in raft.items()})
        have = set(rep.partitions())
        placement = local.view.proto.placement
        wanted = [(part, list(placement[part].node_ids)) for part in np.flatnonzero(local.owned).tolist()]
        if self.node_id in local.meta_members and self.meta is not None:
            self.meta.seed(local.view.proto)
            wanted.append((META_GROUP, local.meta_members))
        for part, replicas in wanted:
            if part in have:
                continue
            missing = [n for n in replicas if n not in raft]
            if missing:
                log.error("group %d: no raft address for %s; group not opened", part, missing)
                continue
            members = {NodeId(n): raft[n] for n in replicas}
            members[NodeId(self.node_id)] = rep.address  # our own address as bound
            rep.add_group(part, members)


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
