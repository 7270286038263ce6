"""Replica moves across nodes, built from the Replicas steps: add, transfer, remove.

`kvstore replica ...` uses these, and so will the rebalancer. A move finds the group's
leader from every node's GetPartitionStatus, sends each step to the node it belongs on,
follows NOT_LEADER hints, and retries a step refused as busy or unavailable until the
move's deadline. Steps are idempotent, so a move that failed half-way can be rerun.

The moves change Raft membership only; the cluster map's placement is not touched (see
docs/operations.md, "Replica membership").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from kvclient._aio import AsyncClient
from kvclient._clustermap import ClusterView
from kvclient._connection import error_from_rpc
from kvclient._errors import ClientError, NotLeaderError, UnavailableError
from kvclient._limits import GRPC_CHANNEL_OPTIONS
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.metadata import raft_addresses

__all__ = ["ReplicaOps", "describe"]

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 2.0
RETRY_S = 0.2
MAX_STEP_TIMEOUT_MS = 600_000  # the server's limit


class ReplicaOps:
    """Membership moves on one cluster. Use from one event loop: `async with ReplicaOps(seeds) as ops`."""

    def __init__(self, seeds: Sequence[str] | str, *, deadline_s: float = 60.0) -> None:
        self.deadline_s = deadline_s
        self._client = AsyncClient(seeds, deadline_s=deadline_s)
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __aenter__(self) -> ReplicaOps:
        await self._client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        await self._client.close()

    # ---- moves ----

    async def add(self, partition: int, node_id: str, *, max_lag: int = 0) -> pb.GroupStatus:
        """Give `node_id` a replica of `partition` and wait until it has caught up.

        Steps: OpenReplica on `node_id` (members: the leader's view plus `node_id`),
        AddReplica and WaitCaughtUp on the leader. Returns the leader's view at the end.
        """
        view = await self._checked(partition, node_id)
        deadline = time.monotonic() + self.deadline_s
        leader, statuses = await self.find_leader(partition, deadline)
        members = list(dict.fromkeys([*statuses[leader].members, node_id]))
        raft = raft_addresses(view.proto)
        open_req = pb.ReplicaRequest(
            partition=partition,
            node_id=node_id,
            members=[pb.NodeInfo(node_id=m, raft_address=raft.get(m, "")) for m in members],
        )
        await self._retrying(lambda: self.step(node_id, "OpenReplica", open_req, deadline), deadline)
        await self.on_leader("AddReplica", partition, node_id, deadline)
        reply = await self.on_leader("WaitCaughtUp", partition, node_id, deadline, max_lag=max_lag)
        log.info("replica added partition=%d node=%s leader=%s", partition, node_id, reply.status.node_id)
        return reply.status

    async def transfer(self, partition: int, to: str | None = None) -> str:
        """Hand the leadership of `partition` to `to` (None: the best follower); return the new leader."""
        await self._checked(partition, to)
        deadline = time.monotonic() + self.deadline_s
        if to is not None:
            reply = await self.on_leader("TransferLeader", partition, to, deadline)
            return reply.status.leader or reply.status.node_id
        # No target: retry only a refusal that changed nothing (another node leads now).
        while True:
            leader, _ = await self.find_leader(partition, deadline)
            try:
                reply = await self.step(leader, "TransferLeader", _request(partition, "", deadline), deadline)
                return reply.status.leader
            except NotLeaderError:
                if time.monotonic() >= deadline:
                    raise

    async def remove(self, partition: int, node_id: str) -> pb.GroupStatus:
        """Remove `node_id`'s replica of `partition` and delete its copy there.

        Transfers the leadership away first if `node_id` leads, then RemoveReplica on the
        leader, then CloseReplica on `node_id` (skipped with a warning when it is down: its
        Raft log then stays on its disk). Returns the leader's view after the removal.
        """
        await self._checked(partition, node_id)
        deadline = time.monotonic() + self.deadline_s
        first = True
        while True:
            leader, statuses = await self.find_leader(partition, deadline)
            if node_id not in statuses[leader].members:
                if first and node_id not in statuses:
                    raise ClientError(f"node_id: {node_id} holds no replica of partition {partition}", field="node_id")
                break  # removed (by now, or by an earlier run): close it below
            first = False
            try:
                if leader == node_id:  # a leader cannot remove itself; the balancer may hand it back, so loop
                    await self.step(leader, "TransferLeader", _request(partition, "", deadline), deadline)
                else:
                    await self.step(leader, "RemoveReplica", _request(partition, node_id, deadline), deadline)
            except (NotLeaderError, UnavailableError):
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(RETRY_S)
        try:
            await self.step(node_id, "CloseReplica", _request(partition, "", deadline), deadline)
        except UnavailableError as err:
            log.warning("replica removed but not closed partition=%d node=%s error=%s", partition, node_id, err)
        status = statuses[leader]
        log.info("replica removed partition=%d node=%s members=%s", partition, node_id, list(status.members))
        return status

    # ---- building blocks ----

    async def group_statuses(self, partition: int) -> dict[str, pb.GroupStatus]:
        """Return each answering node's view of `partition`'s group (nodes without a replica omitted)."""
        view = await self._client.refresh_map()

        async def one(node_id: str, address: str) -> pb.PartitionStatusResponse | None:
            try:
                resp: pb.PartitionStatusResponse = await pb_grpc.AdminStub(self._channel(address)).GetPartitionStatus(
                    pb.PartitionStatusRequest(), timeout=STATUS_TIMEOUT_S
                )
                return resp
            except grpc.aio.AioRpcError as err:
                log.debug("no partition status node=%s code=%s", node_id, err.code().name)
                return None

        replies = await asyncio.gather(*(one(n, view.addresses[n]) for n in view.node_ids))
        return {
            r.node_id: g for r in replies if r is not None for g in r.groups if g.partition == partition and g.node_id
        }

    async def find_leader(self, partition: int, deadline: float) -> tuple[str, dict[str, pb.GroupStatus]]:
        """Wait until a node reports itself `partition`'s leader; return it and every view."""
        while True:
            statuses = await self.group_statuses(partition)
            leaders = [s for s in statuses.values() if s.is_leader]
            if leaders:
                return max(leaders, key=lambda s: s.term).node_id, statuses
            if time.monotonic() >= deadline:
                raise UnavailableError(f"partition {partition}: no leader found (replicas: {sorted(statuses)})")
            await asyncio.sleep(RETRY_S)

    async def on_leader(
        self, step: str, partition: int, node_id: str, deadline: float, *, max_lag: int = 0
    ) -> pb.ReplicaReply:
        """Run a leader step, following NOT_LEADER hints and retrying busy refusals until `deadline`."""
        req = _request(partition, node_id, deadline, max_lag=max_lag)
        leader, _ = await self.find_leader(partition, deadline)
        while True:
            try:
                return await self.step(leader, step, req, deadline)
            except NotLeaderError as err:
                if time.monotonic() >= deadline:
                    raise
                hint = err.leaders.get(partition, "")
                if not hint or hint == leader:
                    await asyncio.sleep(RETRY_S)
                    leader, _ = await self.find_leader(partition, deadline)
                else:
                    leader = hint
            except UnavailableError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(RETRY_S)
            req.timeout_ms = _remaining_ms(deadline)

    async def step(self, node_id: str, step: str, req: pb.ReplicaRequest, deadline: float) -> pb.ReplicaReply:
        """Send one step to `node_id`; raises the `KvError` the node (or the link) reported."""
        address = self._client.view.addresses.get(node_id)
        if address is None:
            raise ClientError(f"node_id: {node_id!r} is not a node of the cluster", field="node_id")
        stub = pb_grpc.ReplicasStub(self._channel(address))
        call = getattr(stub, step)
        try:
            reply: pb.ReplicaReply = await call(req, timeout=max(1.0, deadline - time.monotonic()) + 2.0)
            return reply
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, f"{node_id} at {address}") from None

    @staticmethod
    async def _retrying(attempt: Callable[[], Awaitable[pb.ReplicaReply]], deadline: float) -> pb.ReplicaReply:
        while True:
            try:
                return await attempt()
            except UnavailableError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(RETRY_S)

    async def _checked(self, partition: int, node_id: str | None) -> ClusterView:
        """Refuse a partition or node the map does not have, before any step is sent."""
        view = await self._client.refresh_map()
        if not 0 <= partition < view.partitions:
            raise ClientError(f"partition: {partition} is not in 0..{view.partitions - 1}", field="partition")
        if view.proto.replicas < 2:
            raise ClientError(f"the cluster has replicas={view.proto.replicas}: no Raft groups to change")
        if node_id is not None and node_id not in view.addresses:
            raise ClientError(
                f"node_id: {node_id!r} is not a node of the cluster (nodes: {', '.join(view.node_ids)})",
                field="node_id",
            )
        return view

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel


def _request(partition: int, node_id: str, deadline: float, *, max_lag: int = 0) -> pb.ReplicaRequest:
    return pb.ReplicaRequest(partition=partition, node_id=node_id, timeout_ms=_remaining_ms(deadline), max_lag=max_lag)


def _remaining_ms(deadline: float) -> int:
    return max(1000, min(MAX_STEP_TIMEOUT_MS, int((deadline - time.monotonic()) * 1000)))


def describe(status: pb.GroupStatus) -> dict[str, Any]:
    """Return a JSON-ready summary of one replica's view of its group."""
    return {
        "partition": status.partition,
        "node": status.node_id,
        "leader": status.leader or None,
        "term": status.term,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "members": list(status.members),
    }
