"""Reads from any replica: immediate failover on an error, hedging when a node is slow.

A mixin of `AsyncClient` (which supplies `_send`, `_is_down` and the attributes declared
below), kept apart so the retry loop in `_aio.py` stays readable. Per node group of a read:
1. send it to the chosen replica and wait up to the node's hedge delay (`_hedge.py`);
2. an answer: done. An error (unavailable, server fault): send the same ids at once to the
   next-best live replicas of their partitions (a failover; no delay, no budget);
3. no answer yet and a budget token: send the ids to those replicas too (a hedge) and take
   whichever full answer comes first. A losing hedge is cancelled; a losing node's request
   is left to finish, so its in-flight count, plus a "slow" mark for `SLOW_S`, steers the
   next reads to other replicas.
A group whose partitions lack another live replica is neither hedged nor failed over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from kvclient._batch import NodeGroup, alternate_replicas, group_by_node
from kvclient._clustermap import ClusterView
from kvclient._codec import IdArray
from kvclient._connection import NodeConnection
from kvclient._errors import ServerError, UnavailableError
from kvclient._hedge import Hedging
from kvclient._proto import kvstore_pb2 as pb
from kvclient._ring import partitions_of
from kvclient._stats import ClientStats

BuildRequest = Callable[[npt.NDArray[np.intp], int], pb.DataRequest]
"""Builds one node's request from positions into the batch's ids and the map epoch."""
Answer = tuple[npt.NDArray[np.intp], pb.DataResponse]

SLOW_S = 1.0
"""How long a node that lost a hedge race is avoided when another replica is usable."""
_SLOW_COST = 1e6  # added to a slow node's routing cost: any other live replica is preferred


class ReplicaReads:
    """Failover and hedging for reads from any replica (see module doc). Event-loop only."""

    stats: ClientStats
    _hedging: Hedging
    _conns: dict[str, NodeConnection]
    _slow_until: dict[str, float]
    _background: set[asyncio.Task[Any]]

    def _is_down(self, node_id: str) -> bool:
        raise NotImplementedError

    async def _send(self, view: ClusterView, group: NodeGroup, build: BuildRequest, deadline: float) -> pb.DataResponse:
        raise NotImplementedError

    def _read_costs(self, view: ClusterView) -> npt.NDArray[np.float64]:
        """Return each node's cost as a read replica: in-flight requests, +slow mark, +inf if down."""
        now = time.monotonic()
        cost = np.array(
            [
                (self._conns[n].inflight if n in self._conns else 0)
                + (_SLOW_COST if self._slow_until.get(n, 0.0) > now else 0.0)
                for n in view.node_ids
            ],
            dtype=np.float64,
        )
        cost[[self._is_down(n) for n in view.node_ids]] = np.inf
        return cost

    async def _timed_send(
        self, view: ClusterView, group: NodeGroup, build: BuildRequest, deadline: float
    ) -> pb.DataResponse:
        """`_send` for reads, folding each answer's latency into the node's hedge delay."""
        start = time.monotonic()
        resp = await self._send(view, group, build, deadline)
        self._hedging.record(view.node_ids[group.node], time.monotonic() - start)
        return resp

    async def _send_read(
        self, view: ClusterView, table: str, ids: IdArray, group: NodeGroup, build: BuildRequest, deadline: float
    ) -> list[Answer]:
        """Read one node's group; hedge it if the node is slow, fail over at once if it fails."""
        node_id = view.node_ids[group.node]
        primary = asyncio.ensure_future(self._timed_send(view, group, build, deadline))
        policy = self._hedging.policy
        await _wait(primary, self._hedging.delay_s(node_id) if policy.enabled else None)
        if not primary.done():
            alternates = self._alternates(view, table, ids, group)
            if alternates and self._hedging.budget.take():
                return await self._hedge(view, group, primary, alternates, build, deadline)
            await _wait(primary, None)
        exc = primary.exception()
        if exc is None:
            return [(group.positions, primary.result())]
        if not isinstance(exc, UnavailableError | ServerError):
            raise exc
        alternates = self._alternates(view, table, ids, group)
        if not alternates:
            raise exc
        self.stats.read_failovers += 1
        return await self._send_groups(view, alternates, build, deadline)

    async def _hedge(
        self,
        view: ClusterView,
        group: NodeGroup,
        primary: asyncio.Task[pb.DataResponse],
        alternates: list[NodeGroup],
        build: BuildRequest,
        deadline: float,
    ) -> list[Answer]:
        """Send `group`'s ids to `alternates` too; return the first full answer (or raise the node's error)."""
        self.stats.hedges += 1
        hedge = asyncio.ensure_future(self._send_groups(view, alternates, build, deadline))
        try:
            winner = await _first_success(primary, hedge)
        finally:
            if not primary.done():
                self._leave_running(primary)  # its in-flight count keeps the next reads away
            hedge.cancel()
        if winner is primary:
            return [(group.positions, primary.result())]
        self.stats.hedges_won += 1
        self._slow_until[view.node_ids[group.node]] = time.monotonic() + SLOW_S
        return hedge.result()

    def _alternates(self, view: ClusterView, table: str, ids: IdArray, group: NodeGroup) -> list[NodeGroup] | None:
        """Split `group` over other live replicas of its partitions; None if one partition has none."""
        alternate = alternate_replicas(view.replica_index, self._read_costs(view), group.node)
        parts = partitions_of(table, ids[group.positions], view.partitions)
        if (alternate[parts] < 0).any():
            return None
        return group_by_node(table, ids, group.positions, view.partitions, alternate)

    async def _send_groups(
        self, view: ClusterView, groups: list[NodeGroup], build: BuildRequest, deadline: float
    ) -> list[Answer]:
        """Send several groups at once; return every answer or raise the first failure."""
        self.stats.node_requests += len(groups)
        replies = await asyncio.gather(*(self._timed_send(view, g, build, deadline) for g in groups))
        return [(g.positions, r) for g, r in zip(groups, replies, strict=True)]

    def _leave_running(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(_forget(self._background))


async def _wait(task: asyncio.Task[Any], timeout_s: float | None) -> None:
    """Wait up to `timeout_s` for `task` without cancelling it on timeout (but with the caller)."""
    try:
        await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise


async def _first_success(*tasks: asyncio.Task[Any]) -> asyncio.Task[Any]:
    """Return the first of `tasks` to finish without an error; raise the first task's error if all fail."""
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task in done and task.exception() is None:
                return task
    exc = tasks[0].exception()
    assert exc is not None
    raise exc


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late failure of an ignored read is expected

    return done
