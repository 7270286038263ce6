"""Channels from one node to the others, for metadata pushes, forwards and map sync."""

from __future__ import annotations

import asyncio
import logging

import grpc

from kvclient._limits import GRPC_CHANNEL_OPTIONS
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.state import NodeState

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 1.0


class Peers:
    """One cached channel per peer address. Use from the node's event loop only."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._turn = 0

    def admin(self, address: str) -> pb_grpc.AdminStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS)
            self._channels[address] = channel
        return pb_grpc.AdminStub(channel)

    async def push(self, cmap: pb.ClusterMap, self_id: str) -> None:
        """Send `cmap` to every other node at once; a node that misses it syncs later."""
        targets = [n for n in cmap.nodes if n.node_id != self_id]
        results = await asyncio.gather(
            *(self.admin(n.address).PushClusterMap(cmap, timeout=PUSH_TIMEOUT_S) for n in targets),
            return_exceptions=True,
        )
        for node, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("map push failed node=%s epoch=%d error=%s", node.node_id, cmap.epoch, result)

    async def sync_once(self, state: NodeState) -> None:
        """Adopt a metadata holder's map if it is newer than ours.

        Single-copy clusters pull from the metadata node; in a replicated cluster a
        non-member pulls from the metadata members in turn (members get every committed map
        from their own Raft group).
        """
        local = state.local
        if local is None:
            return
        sources = local.meta_members or [local.view.proto.meta_node_id]
        if state.node_id in sources:
            return
        self._turn += 1
        address = local.view.addresses[sources[self._turn % len(sources)]]
        try:
            cmap = await self.admin(address).GetClusterMap(pb.GetClusterMapRequest(), timeout=PUSH_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            log.debug("map sync failed node=%s meta=%s code=%s", state.node_id, address, err.code().name)
            return
        await state.adopt(cmap)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
