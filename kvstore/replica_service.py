"""The Replicas gRPC service: one membership step on one partition's Raft group.

The rebalancer's primitives (`kvstore.replica_ops` strings them together): OpenReplica
on the node that gains a copy, then AddReplica, WaitCaughtUp, TransferLeader and
RemoveReplica on the group's leader, then CloseReplica on the node that lost its copy.

Every step validates its request first (bad input changes nothing), refuses a second step
on the same group while one runs here (UNAVAILABLE: retry once it ends; the engine's own
per-group lock would make it wait instead), and runs the blocking engine call on a
thread, off the event loop. A leader-only step on another replica is refused with
NOT_LEADER carrying the leader hint. The reply is this replica's view after the step.

These steps change Raft membership only, never the cluster map: placement, and so
routing of data requests, is the rebalancer's to update (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc

from kvclient._errors import ClientError, KvError, NotLeaderError, ServerError, UnavailableError
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvstore import replication
from kvstore.data_service import abort_with
from kvstore.metadata import raft_addresses
from kvstore.replication import GroupStatus, NodeId, PartitionGroup, Replicator
from kvstore.state import LocalMap, NodeState

log = logging.getLogger(__name__)

MAX_TIMEOUT_MS = 600_000
"""Longest step a caller may ask for (10 min: catching up a large partition)."""
MAX_MEMBERS = 7
MAX_LAG = 1_000_000
DEFAULT_TIMEOUT_S = {
    "OpenReplica": 10.0,
    "AddReplica": 10.0,
    "WaitCaughtUp": 60.0,
    "TransferLeader": 10.0,
    "RemoveReplica": 10.0,
    "CloseReplica": 10.0,
}

T = TypeVar("T")


def group_status_to_proto(st: GroupStatus) -> pb.GroupStatus:
    """Return the wire form of one replica's view of its group."""
    return pb.GroupStatus(
        partition=st.partition,
        node_id=st.node,
        is_leader=st.is_leader,
        leader=st.leader or "",
        term=st.term,
        commit_index=st.commit_index,
        applied_index=st.applied_index,
        members=list(st.members),
        max_follower_lag=max((f.lag for f in st.followers), default=0),
        followers_connected=sum(1 for f in st.followers if f.connected),
    )


class ReplicasService(pb_grpc.ReplicasServicer):
    """Serves the membership steps of the node's Raft groups (see the module docstring)."""

    def __init__(self, state: NodeState) -> None:
        self.state = state
        # Event loop only. partition -> the step running here, and its engine call: the claim
        # lasts until that call ends, even when the caller gave up on the RPC before.
        self._running: dict[int, str] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}

    # ---- the steps ----

    async def OpenReplica(self, request: pb.ReplicaRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaReply:  # noqa: N802
        return await self._serve("OpenReplica", request, context)

    async def AddReplica(self, request: pb.ReplicaRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaReply:  # noqa: N802
        return await self._serve("AddReplica", request, context)

    async def WaitCaughtUp(self, request: pb.ReplicaRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaReply:  # noqa: N802
        return await self._serve("WaitCaughtUp", request, context)

    async def TransferLeader(self, request: pb.ReplicaRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaReply:  # noqa: N802
        return await self._serve("TransferLeader", request, context)

    async def RemoveReplica(self, request: pb.ReplicaRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaReply:  # noqa: N802
        return await self._serve("RemoveReplica", request, context)

    async def CloseReplica(self, request: pb.ReplicaRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaReply:  # noqa: N802
        return await self._serve("CloseReplica", request, context)

    async def _serve(self, step: str, req: pb.ReplicaRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaReply:
        try:
            return await self._step(step, req)
        except KvError as err:
            log.info(
                "replica step refused step=%s partition=%d node=%s error=%s", step, req.partition, req.node_id, err
            )
            await abort_with(context, err)
            raise
        except Exception as exc:  # a bug: still answer with an error the client can classify
            log.exception("replica step failed step=%s partition=%d", step, req.partition)
            await abort_with(context, ServerError(f"node {self.state.node_id}: {step}: {exc!r}"))
            raise

    async def _step(self, step: str, req: pb.ReplicaRequest) -> pb.ReplicaReply:
        local, rep = self._checked(step, req)
        timeout_s = req.timeout_ms / 1000 if req.timeout_ms else DEFAULT_TIMEOUT_S[step]
        part, node = int(req.partition), NodeId(req.node_id)
        if step == "WaitCaughtUp":  # reads progress only: may run beside a change
            group = await self._leader_group(rep, part, member=node)
            lag = int(req.max_lag)
            await self._engine(part, lambda: group.wait_caught_up(node, timeout_s, lag), claimed=False)
            return await self._reply(group)
        with self._exclusive(part, f"{step} of {req.node_id or 'the best follower'}"):
            if step == "OpenReplica":
                return await self._open(local, rep, req)
            if step == "CloseReplica":
                return await self._close(rep, part)
            if step == "AddReplica":
                group = await self._leader_group(rep, part)
                address = raft_addresses(local.view.proto)[req.node_id]
                await self._engine(part, lambda: group.add_member(node, address, timeout_s))
            elif step == "TransferLeader":
                group = await self._leader_group(rep, part, member=node or None)
                if node != self.state.node_id:  # a target that leads already: nothing to do
                    await self._engine(part, lambda: group.transfer_leadership(node or None, timeout_s))
            else:  # RemoveReplica; removing a non-member is a no-op (a retry after an unknown outcome)
                group = await self._leader_group(rep, part)
                await self._engine(part, lambda: group.remove_member(node, timeout_s))
            log.info("replica step done step=%s partition=%d node=%s", step, part, req.node_id)
            return await self._reply(group)

    async def _open(self, local: LocalMap, rep: Replicator, req: pb.ReplicaRequest) -> pb.ReplicaReply:
        raft = raft_addresses(local.view.proto)
        members = {NodeId(m.node_id): m.raft_address or raft[m.node_id] for m in req.members}
        members[NodeId(self.state.node_id)] = rep.address  # our own address as bound
        part = int(req.partition)
        group = await self._engine(part, lambda: rep.add_group(part, members))
        log.info("replica opened partition=%d members=%s", part, sorted(members))
        return await self._reply(group)

    async def _close(self, rep: Replicator, part: int) -> pb.ReplicaReply:
        try:
            group = rep.group(part)
        except KeyError:  # already closed (a retry): nothing left to stop
            return pb.ReplicaReply(status=pb.GroupStatus(partition=part, node_id=self.state.node_id))
        if group.is_leader():
            raise ClientError(
                f"partition {part}: node {self.state.node_id} leads the group; transfer leadership "
                "and remove it (on the new leader) before closing",
                field="node_id",
            )
        await self._engine(part, lambda: rep.remove_group(part, purge=True))
        log.info("replica closed partition=%d node=%s", part, self.state.node_id)
        return pb.ReplicaReply(status=pb.GroupStatus(partition=part, node_id=self.state.node_id))

    # ---- checks ----

    def _checked(self, step: str, req: pb.ReplicaRequest) -> tuple[LocalMap, Replicator]:
        """Validate `req` for `step` against the map; return the map and the replicator."""
        local = self.state.current()
        rep = self.state.replicator
        if rep is None:
            if not local.replicated:
                raise ClientError(
                    f"cluster {local.view.proto.cluster_id} has replicas={local.view.proto.replicas}: "
                    "partitions have no Raft group to change",
                    field="partition",
                )
            raise UnavailableError(f"node {self.state.node_id} runs without a replicator (no --raft-port)")
        if req.partition >= local.view.partitions:
            raise ClientError(f"partition: {req.partition} is not in 0..{local.view.partitions - 1}", field="partition")
        if req.timeout_ms > MAX_TIMEOUT_MS:
            raise ClientError(f"timeout_ms: {req.timeout_ms} > {MAX_TIMEOUT_MS}", field="timeout_ms")
        if req.max_lag > MAX_LAG or (req.max_lag and step != "WaitCaughtUp"):
            raise ClientError(f"max_lag: {req.max_lag}: only WaitCaughtUp takes it, up to {MAX_LAG}", field="max_lag")
        if req.members and step != "OpenReplica":
            raise ClientError(f"members: {step} takes no members (only OpenReplica does)", field="members")
        raft = raft_addresses(local.view.proto)
        if step in ("OpenReplica", "CloseReplica"):
            if req.node_id not in ("", self.state.node_id):
                raise ClientError(
                    f"node_id: {step} acts on the node it is sent to ({self.state.node_id}), not {req.node_id!r}",
                    field="node_id",
                )
        elif req.node_id or step != "TransferLeader":
            _check_node(local, raft, req.node_id, "node_id")
        if step == "RemoveReplica" and req.node_id == self.state.node_id:
            raise ClientError(
                f"node_id: {req.node_id} cannot remove its own replica; transfer the leadership away "
                "and send RemoveReplica to the new leader",
                field="node_id",
            )
        if step == "OpenReplica":
            _check_members(local, raft, req.members, self.state.node_id)
        return local, rep

    async def _leader_group(self, rep: Replicator, part: int, member: NodeId | None = None) -> PartitionGroup:
        """Return the local replica of `part` if it leads (and has `member`); else raise."""
        try:
            group = rep.group(part)
        except KeyError:
            raise ClientError(
                f"partition: node {self.state.node_id} holds no replica of partition {part}", field="partition"
            ) from None
        if member is not None:
            members = (await asyncio.to_thread(group.status)).members
            if member not in members:
                raise ClientError(
                    f"node_id: {member} is not a member of partition {part} (members: {', '.join(members)})",
                    field="node_id",
                )
        if not group.is_leader():
            raise _not_leader(self.state.node_id, part, group.leader())
        return group

    @contextmanager
    def _exclusive(self, part: int, what: str) -> Iterator[None]:
        # Check and claim with no await in between: atomic on the event loop.
        running = self._running.get(part)
        if running is not None:
            raise UnavailableError(
                f"partition {part}: {running} is running on node {self.state.node_id}; "
                "one change per group at a time: retry once it ends",
                field="partition",
            )
        self._running[part] = what
        try:
            yield
        finally:
            call = self._calls.pop(part, None)
            if call is None or call.done():
                del self._running[part]
            else:  # the RPC was cancelled: the engine call runs on to its own timeout
                call.add_done_callback(lambda done: self._release(part, done))

    def _release(self, part: int, done: asyncio.Future[Any]) -> None:
        log.info("abandoned replica step ended partition=%d", part)
        self._running.pop(part, None)

    # ---- engine calls ----

    async def _engine(self, part: int, call: Callable[[], T], *, claimed: bool = True) -> T:
        """Run a blocking engine call on a thread; map its errors to the client's tree."""
        future: asyncio.Future[T] = asyncio.ensure_future(asyncio.to_thread(call))
        future.add_done_callback(_retrieve)  # an abandoned call's error is logged, not warned about
        if claimed:
            self._calls[part] = future
        try:
            return await asyncio.shield(future)
        except replication.NotLeaderError as err:
            raise _not_leader(self.state.node_id, part, err.leader) from None
        except (replication.MembershipChangeError, replication.ProposalTimeoutError) as err:
            raise UnavailableError(str(err), field="partition") from None
        except (replication.ReplicationError, ValueError, RuntimeError) as err:
            raise ServerError(f"node {self.state.node_id}: partition {part}: {err!r}") from None

    async def _reply(self, group: PartitionGroup) -> pb.ReplicaReply:
        # status() waits for the Raft driver thread: never on the event loop.
        return pb.ReplicaReply(status=group_status_to_proto(await asyncio.to_thread(group.status)))


def _retrieve(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.debug("replica engine call ended with error=%r", done.exception())


def _not_leader(node_id: str, part: int, leader: str | None) -> NotLeaderError:
    return NotLeaderError(
        f"node {node_id} does not lead partition {part} (leader: {leader or 'unknown'})",
        field="partition",
        leaders={part: leader or ""},
    )


def _check_node(local: LocalMap, raft: dict[str, str], node_id: str, field: str) -> None:
    if node_id not in local.view.addresses:
        raise ClientError(
            f"{field}: {node_id!r} is not a node of cluster {local.view.proto.cluster_id} "
            f"(nodes: {', '.join(local.view.node_ids)})",
            field=field,
        )
    if node_id not in raft:
        raise ClientError(f"{field}: node {node_id} has no raft_address in the map (no --raft-port)", field=field)


def _check_members(local: LocalMap, raft: dict[str, str], members: Sequence[pb.NodeInfo], self_id: str) -> None:
    ids = [m.node_id for m in members]
    if not 1 <= len(ids) <= MAX_MEMBERS:
        raise ClientError(f"members: {len(ids)} members; a group has 1..{MAX_MEMBERS}", field="members")
    if len(set(ids)) != len(ids):
        raise ClientError(f"members: duplicate node ids in {ids}", field="members")
    if self_id not in ids:
        raise ClientError(f"members: must include this node {self_id}, got {ids}", field="members")
    for node_id in ids:
        _check_node(local, raft, node_id, "members")
