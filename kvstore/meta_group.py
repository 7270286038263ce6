"""Cluster metadata as its own Raft group, so a table created or a map change survives a node loss.

In a replicated cluster (replicas > 1) the map names up to 5 metadata members
(`ClusterMap.meta_node_ids`); they run one extra Raft group, `META_GROUP`, next to the
partition groups on the same replicator. Its replicated state is the cluster map itself.

A change (create or drop a table, a node's new address) runs on the group's leader:
1. compute the next map from the last committed one (`MetaStateMachine.map`), a pure
   function from `kvstore.metadata`;
2. propose `(base epoch, next map)`; every member applies it in log order only if its map
   is still at the base epoch (compare-and-set), so two leaders racing across a term change
   cannot both win, and a lost race is retried on the new base;
3. once committed, the leader pushes the map to every node; members also adopt it from
   their own apply, and every node pulls from a member once a second (`Peers.sync_once`).

The first map (epoch 1) is written by bootstrap and pushed, not proposed: each member seeds
its state machine with the map it holds when the group opens. Every map a node holds was
committed (or is the genesis), so a member seeded ahead of its log skips the entries it
already has, and all members follow the same chain of epochs.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from kvclient._proto import kvstore_pb2 as pb
from kvstore.replication import StateMachine

log = logging.getLogger(__name__)

META_GROUP = 1 << 24
"""Group id of the metadata group on the replicator (partition ids stay below 4096)."""
OK = b"ok"
STALE = b"stale"

_VERSION = 1
_HEADER = struct.Struct("<BQ")  # version, base epoch
_INDEX = struct.Struct("<Q")  # a snapshot's applied index, before the map


def meta_members(node_ids: list[str]) -> list[str]:
    """Return the metadata members of a new cluster: 5 of 5+ nodes, else up to 3."""
    return node_ids[: 5 if len(node_ids) >= 5 else 3]


def encode_change(base_epoch: int, cmap: pb.ClusterMap) -> bytes:
    """Return the command that moves the map from `base_epoch` to `cmap`."""
    return _HEADER.pack(_VERSION, base_epoch) + cmap.SerializeToString()


def decode_change(command: bytes) -> tuple[int, pb.ClusterMap]:
    """Return `(base epoch, map)` of a command; ValueError when it is not one."""
    if len(command) < _HEADER.size:
        raise ValueError(f"metadata command of {len(command)} bytes is shorter than its header")
    version, base = _HEADER.unpack_from(command)
    if version != _VERSION:
        raise ValueError(f"metadata command version {version} is not {_VERSION}")
    return base, pb.ClusterMap.FromString(command[_HEADER.size :])


class MetaStateMachine:
    """The metadata group's state: the last committed map. Applies on the Raft driver thread.

    Adoption by the node (`on_commit`, which may open Raft groups and so must not run on the
    driver thread) happens in order on a thread of its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._map: pb.ClusterMap | None = None
        self._applied = 0
        self.on_commit: Callable[[pb.ClusterMap], object] | None = None
        self._adopter = ThreadPoolExecutor(1, thread_name_prefix="meta-adopt")

    @property
    def map(self) -> pb.ClusterMap | None:
        """Return the last committed map this member knows (None before seeding)."""
        with self._lock:
            return self._map

    def seed(self, cmap: pb.ClusterMap) -> None:
        """Start from `cmap` (a committed map or the genesis) unless a newer one is known."""
        with self._lock:
            if self._map is None or self._map.epoch < cmap.epoch:
                self._map = cmap

    def apply(self, partition: int, command: bytes, index: int) -> bytes:
        try:
            base, cmap = decode_change(command)
        except Exception as exc:  # never raise from apply
            log.error("bad metadata command index=%d error=%r", index, exc)
            return b"error:" + repr(exc).encode()
        with self._lock:
            self._applied = max(self._applied, index)
            current = self._map.epoch if self._map is not None else 0
            if current != base or cmap.epoch != base + 1:
                if current < base:
                    log.warning("metadata member behind its log: at epoch %d, entry %d needs %d", current, index, base)
                return STALE
            self._map = cmap
        self._adopt(cmap)
        return OK

    def applied_index(self, partition: int) -> int:
        with self._lock:
            return self._applied

    def snapshot(self, partition: int, out: BinaryIO) -> int:
        with self._lock:
            cmap, index = self._map, self._applied
        out.write(_INDEX.pack(index) + (cmap or pb.ClusterMap()).SerializeToString())
        return index

    def restore(self, partition: int, inp: BinaryIO) -> None:
        (index,) = _INDEX.unpack(inp.read(_INDEX.size))
        cmap = pb.ClusterMap.FromString(inp.read())
        with self._lock:
            self._applied = max(self._applied, index)
        if cmap.epoch:
            self.seed(cmap)
            self._adopt(cmap)

    def _adopt(self, cmap: pb.ClusterMap) -> None:
        callback = self.on_commit
        if callback is not None:
            self._adopter.submit(_logged, callback, cmap)

    def close(self) -> None:
        self._adopter.shutdown(wait=True, cancel_futures=False)


def _logged(callback: Callable[[pb.ClusterMap], object], cmap: pb.ClusterMap) -> None:
    try:
        callback(cmap)
    except Exception:
        log.exception("adopting committed map epoch=%d failed", cmap.epoch)


class GroupStateMachines:
    """The one `StateMachine` a replicator takes: partition groups to the store, the metadata group to its own."""

    def __init__(self, partitions: StateMachine, meta: MetaStateMachine) -> None:
        self._partitions = partitions
        self.meta = meta

    def apply(self, partition: int, command: bytes, index: int) -> bytes | None:
        if partition == META_GROUP:
            return self.meta.apply(partition, command, index)
        return self._partitions.apply(partition, command, index)

    def applied_index(self, partition: int) -> int:
        if partition == META_GROUP:
            return self.meta.applied_index(partition)
        return self._partitions.applied_index(partition)

    def snapshot(self, partition: int, out: BinaryIO) -> int:
        if partition == META_GROUP:
            return self.meta.snapshot(partition, out)
        return self._partitions.snapshot(partition, out)

    def restore(self, partition: int, inp: BinaryIO) -> None:
        if partition == META_GROUP:
            self.meta.restore(partition, inp)
        else:
            self._partitions.restore(partition, inp)
