"""The Admin gRPC service: cluster map, tables, bootstrap, node statistics.

Metadata changes run one at a time where metadata lives, and any other node forwards them
there: in a replicated cluster on the leader of the metadata Raft group, which commits
the new map through the group (`kvstore.meta_group`); in a single-copy cluster on the
metadata node named in the map, which persists it. Either then pushes the map to every
node; a node that misses a push catches up through its periodic map sync (`Peers.sync_once`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from kvclient._connection import error_from_rpc
from kvclient._errors import ClientError, KvError, UnavailableError
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvstore import metadata, replication
from kvstore.data_service import abort_with
from kvstore.meta_group import META_GROUP, OK, encode_change
from kvstore.peers import Peers
from kvstore.replica_service import group_status_to_proto
from kvstore.replication import PartitionGroup
from kvstore.state import NodeState

log = logging.getLogger(__name__)

Change = Callable[[pb.ClusterMap], pb.ClusterMap]
Metadata = tuple[tuple[str, str], ...]
Forward = Callable[[pb_grpc.AdminStub, Metadata, float], Awaitable[pb.ClusterMap]]

HOPS_KEY = "kv-meta-hops"
"""Request metadata: how many nodes forwarded this change already (at most MAX_HOPS)."""
MAX_HOPS = 2
CHANGE_TIMEOUT_S = 10.0
"""How long the node a change arrived at keeps looking for a metadata leader."""
PROPOSE_TIMEOUT_S = 5.0
CAS_ATTEMPTS = 5


def _hops(context: grpc.aio.ServicerContext) -> int:
    for key, value in context.invocation_metadata() or ():
        if key == HOPS_KEY:
            return int(value)
    return 0


class AdminService(pb_grpc.AdminServicer):
    """Serves the cluster map and applies metadata changes."""

    def __init__(self, state: NodeState, peers: Peers) -> None:
        self.state = state
        self.peers = peers
        self._meta_lock = asyncio.Lock()
        self._next_member = 0

    async def GetClusterMap(self, request: pb.GetClusterMapRequest, context: grpc.aio.ServicerContext) -> pb.ClusterMap:  # noqa: N802
        local = self.state.local
        return local.view.proto if local else pb.ClusterMap()

    async def PushClusterMap(self, request: pb.ClusterMap, context: grpc.aio.ServicerContext) -> pb.PushAck:  # noqa: N802
        await self.state.adopt(request)
        return pb.PushAck(epoch=self.state.epoch)

    async def Bootstrap(self, request: pb.BootstrapRequest, context: grpc.aio.ServicerContext) -> pb.ClusterMap:  # noqa: N802
        try:
            return await self._bootstrap(request)
        except KvError as err:
            await abort_with(context, err)
            raise

    async def _bootstrap(self, request: pb.BootstrapRequest) -> pb.ClusterMap:
        local = self.state.local
        if local is not None:
            if {n.node_id for n in local.view.proto.nodes} == {n.node_id for n in request.nodes}:
                return local.view.proto
            raise ClientError(f"node {self.state.node_id} already belongs to cluster {local.view.proto.cluster_id}")
        if self.state.node_id not in {n.node_id for n in request.nodes}:
            raise ClientError(f"nodes: bootstrap list must include this node {self.state.node_id!r}", field="nodes")
        cmap = metadata.bootstrap(list(request.nodes), request.partitions, request.replicas, request.cluster_id)
        await self.state.adopt(cmap)
        await self.peers.push(cmap, self.state.node_id)
        return cmap

    async def CreateTable(self, request: pb.CreateTableRequest, context: grpc.aio.ServicerContext) -> pb.ClusterMap:  # noqa: N802
        return await self._guarded(
            context,
            lambda cmap: metadata.create_table(cmap, request.schema, request.if_not_exists),
            lambda stub, md, timeout: stub.CreateTable(request, timeout=timeout, metadata=md),
        )

    async def DropTable(self, request: pb.DropTableRequest, context: grpc.aio.ServicerContext) -> pb.ClusterMap:  # noqa: N802
        return await self._guarded(
            context,
            lambda cmap: metadata.drop_table(cmap, request.name),
            lambda stub, md, timeout: stub.DropTable(request, timeout=timeout, metadata=md),
        )

    async def RegisterNode(self, request: pb.NodeInfo, context: grpc.aio.ServicerContext) -> pb.ClusterMap:  # noqa: N802
        return await self._guarded(
            context,
            lambda cmap: metadata.register_node(cmap, request),
            lambda stub, md, timeout: stub.RegisterNode(request, timeout=timeout, metadata=md),
        )

    async def GetNodeStats(self, request: pb.NodeStatsRequest, context: grpc.aio.ServicerContext) -> pb.NodeStats:  # noqa: N802
        state, store = self.state, self.state.store
        local = state.local
        return pb.NodeStats(
            node_id=state.node_id,
            epoch=state.epoch,
            partitions=local.view.partitions_of_node(state.node_id) if local else [],
            cache_bytes=store.cache_bytes,
            cache_budget_bytes=store.cache_budget_bytes,
            cache_hits=store.stats.cache_hits,
            cache_misses=store.stats.cache_misses,
            requests=state.requests,
            keys_read=store.stats.keys_read,
            keys_written=store.stats.keys_written,
            disk_bytes=store.engine.size_bytes(),
            uptime_s=time.monotonic() - state.started,
        )

    async def GetPartitionStatus(  # noqa: N802
        self, request: pb.PartitionStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.PartitionStatusResponse:
        out = pb.PartitionStatusResponse(node_id=self.state.node_id)
        rep = self.state.replicator
        if rep is None:
            return out

        def statuses() -> list[replication.GroupStatus]:  # each waits for the Raft driver thread
            found = []
            for part in rep.partitions():
                try:
                    found.append(rep.group(part).status())
                except KeyError:  # closed meanwhile
                    continue
            return found

        out.groups.extend(group_status_to_proto(st) for st in await asyncio.to_thread(statuses))
        return out

    async def WarmCache(self, request: pb.WarmCacheRequest, context: grpc.aio.ServicerContext) -> pb.WarmCacheReply:  # noqa: N802
        """Read a table's local rows into the cache (off the event loop; serving goes on)."""
        try:
            local = self.state.current()
            table = local.view.table(request.table)
            parts = local.view.partitions_of_node(self.state.node_id)
            added, full = await asyncio.to_thread(self.state.store.warm, table, parts)
        except KvError as err:
            await abort_with(context, err)
            raise
        return pb.WarmCacheReply(
            node_id=self.state.node_id, rows_cached=added, cache_bytes=self.state.store.cache_bytes, cache_full=full
        )

    async def _guarded(self, context: grpc.aio.ServicerContext, change: Change, forward: Forward) -> pb.ClusterMap:
        try:
            remaining = context.time_remaining()
            budget = CHANGE_TIMEOUT_S if remaining is None else min(CHANGE_TIMEOUT_S, remaining - 0.05)
            return await self.change(change, forward, _hops(context), time.monotonic() + budget)
        except KvError as err:
            await abort_with(context, err)
            raise

    async def change(
        self, change: Change, forward: Forward, hops: int = 0, deadline: float | None = None
    ) -> pb.ClusterMap:
        """Apply a metadata change where metadata lives, or forward it there; return the new map.

        Gives up at `deadline` (the caller's, at most CHANGE_TIMEOUT_S away), so that a change
        does not commit long after its caller stopped waiting for it.
        """
        deadline = deadline or time.monotonic() + CHANGE_TIMEOUT_S
        local = self.state.current()
        if local.meta_members:
            return await self._replicated_change(change, forward, hops, deadline)
        meta_id = local.view.proto.meta_node_id
        if meta_id != self.state.node_id:
            return await self._forward(forward, meta_id, hops, deadline)
        async with self._meta_lock:
            cmap = change(self.state.current().view.proto)
            if await self.state.adopt(cmap):
                await self.peers.push(cmap, self.state.node_id)
            return cmap

    async def _forward(self, forward: Forward, node_id: str, hops: int, deadline: float) -> pb.ClusterMap:
        address = self.state.current().view.addresses[node_id]
        try:
            timeout = max(0.01, deadline - time.monotonic())
            cmap = await forward(self.peers.admin(address), ((HOPS_KEY, str(hops + 1)),), timeout)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, f"{node_id} at {address}") from None
        await self.state.adopt(cmap)
        return cmap

    async def _replicated_change(self, change: Change, forward: Forward, hops: int, deadline: float) -> pb.ClusterMap:
        """Commit on the metadata leader; the node a change first reached retries until one is found."""
        delay = 0.05
        while True:
            group = self._meta_group()
            try:
                if group is not None and group.is_leader():
                    return await self._commit(change, group, deadline)
                target = self._meta_target(group)
                if target is None or hops >= MAX_HOPS:
                    raise UnavailableError(f"node {self.state.node_id}: no metadata leader known, retry")
                return await self._forward(forward, target, hops, deadline)
            except (UnavailableError, replication.NotLeaderError) as err:
                if hops or time.monotonic() + delay > deadline:
                    if isinstance(err, UnavailableError):
                        raise
                    raise UnavailableError(f"node {self.state.node_id}: lost metadata leadership, retry") from None
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)

    def _meta_group(self) -> PartitionGroup | None:
        rep = self.state.replicator
        if rep is None or META_GROUP not in rep.partitions():
            return None
        return rep.group(META_GROUP)

    def _meta_target(self, group: PartitionGroup | None) -> str | None:
        """The metadata leader if this member knows it, else the next other member in turn."""
        if group is not None:
            leader = group.leader()
            return str(leader) if leader and leader != self.state.node_id else None
        others = [n for n in self.state.current().meta_members if n != self.state.node_id]
        if not others:
            return None
        self._next_member += 1
        return others[self._next_member % len(others)]

    async def _commit(self, change: Change, group: PartitionGroup, deadline: float) -> pb.ClusterMap:
        """Propose the change on the committed map; recompute when a racing change landed first."""
        async with self._meta_lock:
            for _ in range(CAS_ATTEMPTS):
                if not group.serves_leader_reads():
                    # A leader cut off from its majority would append the change, time out, and could
                    # commit it long after the caller was told it failed: refuse before appending.
                    raise UnavailableError(
                        f"node {self.state.node_id}: the metadata leader has not heard from a majority of"
                        " members within its lease; nothing changed, retry"
                    )
                meta = self.state.meta
                base = (meta.map if meta is not None else None) or self.state.current().view.proto
                cmap = change(base)
                if cmap is base:
                    return base
                command = encode_change(base.epoch, cmap)
                try:
                    timeout = max(0.01, min(PROPOSE_TIMEOUT_S, deadline - time.monotonic()))
                    result = await asyncio.wrap_future(group.propose_async(command, timeout))
                except ValueError:  # larger than one Raft entry
                    raise ClientError(
                        f"table: the cluster map would be {len(command)} bytes, more than one metadata entry holds"
                        " (drop tables or use smaller default vectors)",
                        field="table",
                    ) from None
                except replication.ProposalTimeoutError:
                    raise UnavailableError(
                        f"node {self.state.node_id}: metadata change not committed in time (it may still be)"
                    ) from None
                except replication.NotLeaderError:
                    raise
                except replication.ReplicationError as err:
                    raise UnavailableError(f"node {self.state.node_id}: metadata change failed: {err}") from None
                if result == OK:
                    await self.state.adopt(cmap)
                    await self.peers.push(cmap, self.state.node_id)
                    return cmap
            raise UnavailableError(f"node {self.state.node_id}: metadata change kept racing other changes, retry")

    async def register_self(self) -> None:
        """Tell the metadata node this node's current address (it may have changed)."""
        rep = self.state.replicator
        me = pb.NodeInfo(
            node_id=self.state.node_id, address=self.state.address, raft_address=rep.address if rep else ""
        )
        local = self.state.current()
        if metadata.register_node(local.view.proto, me) is local.view.proto:
            return  # the map already has this address
        try:
            await self.change(
                lambda cmap: metadata.register_node(cmap, me),
                lambda stub, md, timeout: stub.RegisterNode(me, timeout=timeout, metadata=md),
            )
        except KvError as err:
            log.warning("register failed node=%s error=%s", self.state.node_id, err)
