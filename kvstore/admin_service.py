"""The Admin gRPC service: cluster map, tables, bootstrap, node statistics.

Metadata changes run on the metadata node named in the map (any other node forwards them
there), one at a time; the new map is persisted, adopted, then pushed to every node. A node
that misses a push catches up through its periodic map sync (`Peers.sync_loop`).
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
from kvstore import metadata
from kvstore.data_service import abort_with
from kvstore.peers import Peers
from kvstore.replica_service import group_status_to_proto
from kvstore.state import NodeState

log = logging.getLogger(__name__)

Change = Callable[[pb.ClusterMap], pb.ClusterMap]
Forward = Callable[[pb_grpc.AdminStub], Awaitable[pb.ClusterMap]]


class AdminService(pb_grpc.AdminServicer):
    """Serves the cluster map and applies metadata changes."""

    def __init__(self, state: NodeState, peers: Peers) -> None:
        self.state = state
        self.peers = peers
        self._meta_lock = asyncio.Lock()

    async def GetClusterMap(self, request: pb.GetClusterMapRequest, context: grpc.aio.ServicerContext) -> pb.ClusterMap:  # noqa: N802
        local = self.state.local
        return local.view.proto if local else pb.ClusterMap()

    async def PushClusterMap(self, request: pb.ClusterMap, context: grpc.aio.ServicerContext) -> pb.PushAck:  # noqa: N802
        self.state.apply_map(request)
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
        self.state.apply_map(cmap)
        await self.peers.push(cmap, self.state.node_id)
        return cmap

    async def CreateTable(self, request: pb.CreateTableRequest, context: grpc.aio.ServicerContext) -> pb.ClusterMap:  # noqa: N802
        return await self._guarded(
            context,
            lambda cmap: metadata.create_table(cmap, request.schema, request.if_not_exists),
            lambda stub: stub.CreateTable(request, timeout=5.0),
        )

    async def DropTable(self, request: pb.DropTableRequest, context: grpc.aio.ServicerContext) -> pb.ClusterMap:  # noqa: N802
        return await self._guarded(
            context,
            lambda cmap: metadata.drop_table(cmap, request.name),
            lambda stub: stub.DropTable(request, timeout=5.0),
        )

    async def RegisterNode(self, request: pb.NodeInfo, context: grpc.aio.ServicerContext) -> pb.ClusterMap:  # noqa: N802
        return await self._guarded(
            context,
            lambda cmap: metadata.register_node(cmap, request),
            lambda stub: stub.RegisterNode(request, timeout=5.0),
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
        for part in rep.partitions():
            try:
                st = rep.group(part).status()
            except KeyError:  # closed meanwhile
                continue
            out.groups.append(group_status_to_proto(st))
        return out

    async def _guarded(self, context: grpc.aio.ServicerContext, change: Change, forward: Forward) -> pb.ClusterMap:
        try:
            return await self.change(change, forward)
        except KvError as err:
            await abort_with(context, err)
            raise

    async def change(self, change: Change, forward: Forward) -> pb.ClusterMap:
        """Apply a metadata change here if this node owns metadata, else forward it."""
        local = self.state.current()
        meta_id = local.view.proto.meta_node_id
        if meta_id != self.state.node_id:
            address = local.view.addresses[meta_id]
            try:
                cmap = await forward(self.peers.admin(address))
            except grpc.aio.AioRpcError as err:
                raise error_from_rpc(err, f"{meta_id} at {address}") from None
            self.state.apply_map(cmap)
            return cmap
        async with self._meta_lock:
            cmap = change(self.state.current().view.proto)
            if self.state.apply_map(cmap):
                await self.peers.push(cmap, self.state.node_id)
            return cmap

    async def register_self(self) -> None:
        """Tell the metadata node this node's current address (it may have changed)."""
        rep = self.state.replicator
        me = pb.NodeInfo(
            node_id=self.state.node_id, address=self.state.address, raft_address=rep.address if rep else ""
        )
        try:
            await self.change(
                lambda cmap: metadata.register_node(cmap, me), lambda stub: stub.RegisterNode(me, timeout=2.0)
            )
        except (KvError, UnavailableError) as err:
            log.warning("register failed node=%s error=%s", self.state.node_id, err)
