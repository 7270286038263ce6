"""The asyncio smart client: cluster map cache, split by node, one request per node, merge.

Read path, per `get`:
1. check ids (uint64, 1-D, within limits) and the table's schema from the cached map;
2. dedupe the ids, hash them to partitions, choose one replica per partition (least
   in-flight requests first), group by node;
3. send one request per node, all at once, over each node's shared stream;
4. with replicas > 1, a node that answers with an error has its share sent at once to
   other replicas (failover), and a node that has not answered after its hedge delay has
   its share sent to them as well, first full answer wins (a hedge): `_reads.py`;
5. on a routing error refresh the map and resend only the affected group; on an
   unavailable node mark it down for `DOWN_S` (reads then pick another replica), back off
   and retry until the deadline;
6. merge the per-node rows into one float32 matrix in the caller's order (numpy only).

Leader reads (`consistency="leader"`) take the write route below and are never hedged.

Writes go to each partition's leader: a per-partition cache of the leader's node index
(replica 0 until a node says otherwise). A NOT_LEADER reply carries the leader of each
refused partition; the client updates the cache and resends only that group at once (a
bounded number of times, within the deadline); with no usable hint (an election is
running, or the hinted node is marked down) it backs off briefly first. With one replica
per partition the leader is always replica 0, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from kvclient._batch import KeyStatus, NodeGroup, VectorMerge, choose_replicas, dedupe, group_by_node
from kvclient._clustermap import ClusterView
from kvclient._codec import (
    NUMPY_DTYPES,
    IdArray,
    as_ids,
    check_table_name,
    check_vectors,
    default_row,
    pack_ids,
    pack_records,
    schema_from_args,
    unpack_record,
)
from kvclient._connection import NodeConnection, Transport, error_from_rpc
from kvclient._errors import (
    ClientError,
    DeadlineExceededError,
    KvError,
    NotLeaderError,
    RoutingError,
    UnavailableError,
)
from kvclient._hedge import HedgePolicy, Hedging
from kvclient._proto import kvstore_pb2 as pb
from kvclient._reads import Answer, BuildRequest, ReplicaReads
from kvclient._results import FeaturesResult, GetResult, TableInfo
from kvclient._stats import ClientStats

T = TypeVar("T")

log = logging.getLogger(__name__)

_Failure = tuple[npt.NDArray[np.intp], KvError]
_Outcome = list[Answer] | BaseException

DOWN_S = 1.0
"""How long a node that failed to answer is skipped when choosing a replica."""
MAX_LEADER_CHASES = 30
"""NOT_LEADER rounds per call (each resends at once or after a short backoff)."""
BOUNCE_PAUSE_S, BOUNCE_PAUSE_MAX_S = 0.002, 0.064
"""The pause before a third and later chase that has usable hints (doubling, capped): the
hints bounce between a leader handing over and its target until the target is elected."""
_CONSISTENCY = {"any": pb.ANY_REPLICA, "leader": pb.LEADER}


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a call tries before it gives up (always within its deadline)."""

    max_attempts: int = 6
    backoff_s: float = 0.02
    max_backoff_s: float = 0.5

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ClientError(f"max_attempts: {self.max_attempts} must be >= 1", field="max_attempts")

    def delay_s(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * 2**attempt))


def _parse_seeds(seeds: Sequence[str] | str) -> list[str]:
    items = [seeds] if isinstance(seeds, str) else list(seeds)
    out = [s.strip() for item in items for s in item.split(",") if s.strip()]
    if not out:
        raise ClientError("seeds: give at least one 'host:port'", field="seeds")
    return out


class AsyncClient(ReplicaReads):
    """Talks to a kvstore cluster from one asyncio event loop.

    Use as `async with AsyncClient(["127.0.0.1:7000"]) as kv: ...`. Not thread-safe; for
    threads use `Client`, which runs one of these on its own loop.
    """

    def __init__(
        self,
        seeds: Sequence[str] | str,
        *,
        deadline_s: float = 5.0,
        transport: Transport = "stream",
        retry: RetryPolicy | None = None,
        hedge_after_ms: float | None = 5.0,
        hedge_ratio: float = 0.1,
    ) -> None:
        self._seeds = _parse_seeds(seeds)
        self.deadline_s = deadline_s
        self._transport: Transport = transport
        self._retry = retry or RetryPolicy()
        self._retry.validate()
        min_ms = min(1.0, hedge_after_ms) if isinstance(hedge_after_ms, int | float) else 1.0
        self._hedging = Hedging(HedgePolicy(after_ms=hedge_after_ms, min_ms=min_ms, ratio=hedge_ratio))
        self.stats = ClientStats()
        self._view: ClusterView | None = None
        self._leaders: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)
        self._down_until: dict[str, float] = {}
        self._slow_until: dict[str, float] = {}
        self._background: set[asyncio.Task[Any]] = set()  # hedge losers left to finish
        self._conns: dict[str, NodeConnection] = {}
        self._refreshing: asyncio.Task[ClusterView] | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Fetch the cluster map; raises `UnavailableError` if no seed answers."""
        await self.refresh_map()

    async def close(self) -> None:
        """Close every connection."""
        for task in list(self._background):
            task.cancel()
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    # ---- cluster map ----

    @property
    def view(self) -> ClusterView:
        if self._view is None:
            raise ClientError("client is not connected; use 'async with' or connect()")
        return self._view

    async def refresh_map(self) -> ClusterView:
        """Fetch the newest cluster map from any reachable node (one fetch at a time)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._fetch_map())
        return await asyncio.shield(self._refreshing)

    async def _fetch_map(self) -> ClusterView:
        self.stats.map_refreshes += 1
        last: Exception | None = None
        for node_id, address in self._map_sources():
            conn = self._connection(node_id, address)
            try:
                cmap = await conn.admin.GetClusterMap(pb.GetClusterMapRequest(), timeout=2.0)
            except Exception as exc:  # any failure: try the next source
                last = exc
                continue
            if cmap.epoch == 0:
                last = UnavailableError(f"node {conn.label} has no cluster map yet")
                continue
            return self._install(cmap)
        raise UnavailableError(f"no node answered for the cluster map (tried {self._map_sources()}): {last}")

    def _map_sources(self) -> list[tuple[str, str]]:
        known = [(n, a) for n, a in self._view.addresses.items()] if self._view else []
        seeds = [(f"seed:{s}", s) for s in self._seeds]
        return known + [s for s in seeds if s[1] not in {a for _, a in known}]

    def _install(self, cmap: pb.ClusterMap) -> ClusterView:
        if self._view is None or cmap.epoch > self._view.epoch:
            old_view, old_leaders = self._view, self._leaders
            view = ClusterView.from_proto(cmap)
            leaders = view.replica_index[:, 0].copy()
            if old_view is not None and old_view.node_ids == view.node_ids and len(old_leaders) == len(leaders):
                still = (view.replica_index == old_leaders[:, None]).any(axis=1)  # cached leader still a replica
                leaders[still] = old_leaders[still]
            self._view, self._leaders = view, leaders
            log.debug("cluster map installed epoch=%d", cmap.epoch)
        return self._view

    def _connection(self, node_id: str, address: str) -> NodeConnection:
        conn = self._conns.get(node_id)
        if conn is None or conn.address != address:
            if conn is not None:
                asyncio.get_running_loop().create_task(conn.close())
            conn = NodeConnection(node_id, address, self._transport)
            self._conns[node_id] = conn
        return conn

    def _note_epoch(self, epoch: int) -> None:
        if self._view is not None and epoch > self._view.epoch:
            asyncio.get_running_loop().create_task(self._quiet_refresh())

    async def _quiet_refresh(self) -> None:
        try:
            await self.refresh_map()
        except KvError as exc:
            log.debug("background map refresh failed: %s", exc)

    # ---- tables ----

    async def create_table(
        self,
        name: str,
        *,
        dim: int | None = None,
        dtype: str = "float32",
        kind: str = "embedding",
        default: Any = None,
        allow_nonfinite: bool = False,
        if_not_exists: bool = False,
    ) -> TableInfo:
        """Create a table; raises `ClientError` for a bad schema or an existing name.

        `default` is what a missing key returns: None or "zeros" (zeros), "nan", or a
        vector of `dim` floats.
        """
        schema = schema_from_args(name, dim, dtype, kind, default, allow_nonfinite)
        req = pb.CreateTableRequest(schema=schema, if_not_exists=if_not_exists)
        await self._admin(lambda c: c.admin.CreateTable(req, timeout=self.deadline_s))
        return TableInfo.from_proto(self.view.table(name))

    async def drop_table(self, name: str) -> None:
        """Drop a table and its data; raises `UnknownTableError` if it does not exist."""
        req = pb.DropTableRequest(name=check_table_name(name))
        await self._admin(lambda c: c.admin.DropTable(req, timeout=self.deadline_s))

    async def list_tables(self) -> list[TableInfo]:
        """Return every table in the newest cluster map."""
        view = await self.refresh_map()
        return [TableInfo.from_proto(t) for t in view.tables.values()]

    async def node_stats(self) -> list[pb.NodeStats | KvError]:
        """Return each node's statistics (or the error reaching it), in map order."""
        return await self._each_node(lambda conn: conn.admin.GetNodeStats(pb.NodeStatsRequest(), timeout=2.0))

    async def partition_status(self) -> list[pb.PartitionStatusResponse | KvError]:
        """Return each node's view of its local Raft groups (or the error reaching it), in map order."""
        return await self._each_node(
            lambda conn: conn.admin.GetPartitionStatus(pb.PartitionStatusRequest(), timeout=2.0)
        )

    async def wait_for_replicas(self, timeout_s: float = 60.0) -> float:
        """Wait until every replica has applied its partition's highest commit; return the seconds waited.

        A put returns once a majority holds it and the leader applied it; the other replicas
        apply it a round later. Call this after a bulk load, before reads from any replica
        must see all of it. Raises `DeadlineExceededError` after `timeout_s`.
        """
        start = time.monotonic()
        while True:
            status = await self.partition_status()
            if _replicas_caught_up(status):
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise DeadlineExceededError(f"replicas did not catch up within {timeout_s} s")
            await asyncio.sleep(0.05)

    async def warm_cache(self, table: str, *, timeout_s: float = 120.0) -> list[pb.WarmCacheReply | KvError]:
        """Have every node read `table`'s rows into its cache until full; replies (or errors) in map order.

        Writes do not fill node caches, reads do: call this after a bulk load or a node
        restart so that the first reads are answered from memory.
        """
        (await self.refresh_map()).table(table)  # an unknown table is the caller's error, raised here
        return await self._each_node(
            lambda conn: conn.admin.WarmCache(pb.WarmCacheRequest(table=table), timeout=timeout_s), refresh=False
        )

    async def _each_node(
        self, call: Callable[[NodeConnection], Awaitable[T]], *, refresh: bool = True
    ) -> list[T | KvError]:
        """Run `call` against every node of the (refreshed) map at once; each reply or error, in map order."""
        view = await self.refresh_map() if refresh else self.view

        async def one(node_id: str) -> T | KvError:
            conn = self._connection(node_id, view.addresses[node_id])
            try:
                return await call(conn)
            except Exception as exc:
                if hasattr(exc, "trailing_metadata"):
                    return error_from_rpc(exc, conn.label)
                return UnavailableError(f"node {conn.label}: {exc}")

        return list(await asyncio.gather(*(one(n) for n in view.node_ids)))

    async def _admin(self, call: Callable[[NodeConnection], Awaitable[pb.ClusterMap]]) -> None:
        """Run a metadata change on a metadata holder (one hop less), falling back to any other node."""
        view = self.view if self._view else await self.refresh_map()
        holders = set(view.proto.meta_node_ids) or {view.proto.meta_node_id}
        order = sorted(view.node_ids, key=lambda n: n not in holders)
        last: KvError | None = None
        for node_id in order:
            conn = self._connection(node_id, view.addresses[node_id])
            try:
                self._install(await call(conn))
                return
            except Exception as exc:
                err = error_from_rpc(exc, conn.label) if hasattr(exc, "trailing_metadata") else exc
                if isinstance(err, ClientError):
                    raise err from None
                last = err if isinstance(err, KvError) else UnavailableError(str(err))
        raise last or UnavailableError("no node available for a metadata change")

    async def _schema(self, name: str, kind: int | None) -> pb.TableSchema:
        """Return the schema of `name`, refreshing the map once if it is unknown; check its kind."""
        check_table_name(name)
        view = self.view if self._view else await self.refresh_map()
        if name not in view.tables:
            view = await self.refresh_map()
        schema = view.table(name)
        if kind is not None and schema.kind != kind:
            wanted = "get/put" if schema.kind == pb.EMBEDDING else "get_features/put_features"
            raise ClientError(
                f"table {name!r} is a {TableInfo.from_proto(schema).kind} table; use {wanted}",
                field="table",
            )
        return schema

    # ---- data ----

    async def get(
        self,
        table: str,
        ids: Any,
        *,
        deadline_s: float | None = None,
        partial: bool = False,
        consistency: str = "any",
    ) -> GetResult:
        """Return the embeddings of `ids` in their order (duplicates allowed).

        Missing keys get the table default and `found=False`. With `partial=True`, keys whose
        node failed by the deadline get status ERROR instead of failing the call.
        `consistency="any"` reads any live replica (a follower may lag by a few ms);
        `"leader"` reads each partition's leader and sees every write acknowledged before.
        Raises `ClientError` for bad input, `UnavailableError` / `DeadlineExceededError`
        otherwise.
        """
        id_arr = as_ids(ids)
        level = _consistency(consistency)
        schema = await self._schema(table, pb.EMBEDDING)
        uniq = dedupe(id_arr)
        merge = VectorMerge(len(uniq.ids), default_row(schema))

        def build(pos: npt.NDArray[np.intp], epoch: int) -> pb.DataRequest:
            get = pb.GetRequest(table=table, ids=pack_ids(uniq.ids[pos]), epoch=epoch, consistency=level)
            return pb.DataRequest(get=get)

        answers = await self._scatter(table, uniq.ids, build, deadline_s, leader=level == pb.LEADER, partial=partial)
        for positions, resp in answers:
            found = np.frombuffer(resp.get.found, dtype=np.bool_)
            rows = np.frombuffer(resp.get.values, dtype=NUMPY_DTYPES[resp.get.dtype])
            merge.add(positions, found, rows.reshape(-1, schema.dim))
        values, status = merge.result(uniq)
        return GetResult(values=values, found=status == KeyStatus.FOUND, status=status)

    async def put(self, table: str, ids: Any, vectors: Any, *, deadline_s: float | None = None) -> int:
        """Store one vector per id (a later duplicate id wins); return the count written.

        Raises `ClientError` before sending anything if any id or vector is invalid.
        """
        id_arr = as_ids(ids)
        schema = await self._schema(table, pb.EMBEDDING)
        rows = check_vectors(schema, vectors, len(id_arr))
        wire_dtype = schema.dtype

        def build(pos: npt.NDArray[np.intp], epoch: int) -> pb.DataRequest:
            return pb.DataRequest(
                put=pb.PutRequest(
                    table=table,
                    ids=pack_ids(id_arr[pos]),
                    values=rows[pos].tobytes(),
                    dtype=wire_dtype,
                    epoch=epoch,
                )
            )

        return await self._write(table, id_arr, build, deadline_s)

    async def put_features(
        self, table: str, ids: Any, records: Sequence[Mapping[str, Any]], *, deadline_s: float | None = None
    ) -> int:
        """Store one feature record (a msgpack-able mapping) per id; return the count written."""
        id_arr = as_ids(ids)
        await self._schema(table, pb.FEATURES)
        packed = pack_records(records, len(id_arr))

        def build(pos: npt.NDArray[np.intp], epoch: int) -> pb.DataRequest:
            return pb.DataRequest(
                put=pb.PutRequest(table=table, ids=pack_ids(id_arr[pos]), records=[packed[i] for i in pos], epoch=epoch)
            )

        return await self._write(table, id_arr, build, deadline_s)

    async def get_features(
        self,
        table: str,
        ids: Any,
        *,
        deadline_s: float | None = None,
        partial: bool = False,
        consistency: str = "any",
    ) -> FeaturesResult:
        """Return the feature records of `ids` in their order; None where missing.

        `consistency` is "any" or "leader", as for `get`.
        """
        id_arr = as_ids(ids)
        level = _consistency(consistency)
        await self._schema(table, pb.FEATURES)
        uniq = dedupe(id_arr)

        def build(pos: npt.NDArray[np.intp], epoch: int) -> pb.DataRequest:
            get = pb.GetRequest(table=table, ids=pack_ids(uniq.ids[pos]), epoch=epoch, consistency=level)
            return pb.DataRequest(get=get)

        answers = await self._scatter(table, uniq.ids, build, deadline_s, leader=level == pb.LEADER, partial=partial)
        records: list[dict[str, Any] | None] = [None] * len(uniq.ids)
        status = np.full(len(uniq.ids), KeyStatus.ERROR, dtype=np.uint8)
        for positions, resp in answers:
            found = np.frombuffer(resp.get.found, dtype=np.bool_)
            status[positions] = np.where(found, KeyStatus.FOUND, KeyStatus.MISSING)
            for pos, raw in zip(positions[found], resp.get.records, strict=True):
                records[pos] = unpack_record(raw)
        out_status = uniq.expand(status)
        return FeaturesResult(
            records=records if uniq.inverse is None else [records[i] for i in uniq.inverse],
            found=out_status == KeyStatus.FOUND,
            status=out_status,
        )

    async def delete(self, table: str, ids: Any, *, deadline_s: float | None = None) -> int:
        """Delete `ids` from `table` (absent ids are fine); return the number of ids sent."""
        id_arr = as_ids(ids)
        await self._schema(table, None)

        def build(pos: npt.NDArray[np.intp], epoch: int) -> pb.DataRequest:
            return pb.DataRequest(delete=pb.DeleteRequest(table=table, ids=pack_ids(id_arr[pos]), epoch=epoch))

        return await self._write(table, id_arr, build, deadline_s)

    async def _write(self, table: str, ids: IdArray, build: BuildRequest, deadline_s: float | None) -> int:
        answers = await self._scatter(table, ids, build, deadline_s, leader=True, partial=False)
        return sum(int(r.put.written if r.HasField("put") else r.delete.deleted) for _, r in answers)

    async def _scatter(
        self,
        table: str,
        ids: IdArray,
        build: BuildRequest,
        deadline_s: float | None,
        *,
        leader: bool,
        partial: bool,
    ) -> list[Answer]:
        """Send each node its share of `ids`, retrying what can be retried; see module doc.

        `leader`: route each partition to its (cached) leader, as writes and leader reads
        need; otherwise to the least-loaded live replica, with failover and hedging.
        """
        deadline = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        self.stats.calls += 1
        todo = np.arange(len(ids), dtype=np.intp)
        answers: list[Answer] = []
        seen: list[_Failure] = []  # retried errors, to name the node if the deadline ends it
        failures: list[_Failure] = []
        attempt = chases = 0
        while True:
            view = self.view
            groups = group_by_node(table, ids, todo, view.partitions, self._routes(view, leader))
            self.stats.node_requests += len(groups)
            spread = not leader and view.proto.replicas > 1
            if spread:
                self._hedging.budget.earn(len(groups))
            outcomes: list[_Outcome] = await asyncio.gather(
                *(
                    self._send_read(view, table, ids, g, build, deadline)
                    if spread
                    else self._send_one(view, g, build, deadline)
                    for g in groups
                ),
                return_exceptions=True,
            )
            self._learn(view, outcomes)
            retry, failures = self._sort_outcomes(groups, outcomes, answers)
            if not retry:
                break
            seen.extend(retry)
            if all(isinstance(err, NotLeaderError) for _, err in retry) and chases < MAX_LEADER_CHASES:
                # Only leadership moved: resend at once to the hinted leaders, or wait out an
                # election; hints that keep bouncing (a leadership handover) are waited out too.
                chases += 1
                self.stats.leader_chases += 1
                pause = 0.0
                if not self._hints_usable(view, retry):
                    pause = self._retry.delay_s(min(chases, 3))
                elif chases > 2:  # a handover takes milliseconds: wait a little, not a backoff step
                    pause = min(BOUNCE_PAUSE_MAX_S, BOUNCE_PAUSE_S * 2 ** (chases - 3))
                if pause:
                    await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            else:
                attempt += 1
                if any(isinstance(err, UnavailableError) for _, err in retry):
                    self.stats.unavailable_retries += 1
                else:
                    self.stats.routing_retries += 1
                if attempt == self._retry.max_attempts:
                    failures.extend(retry)
                    break
                await self._recover(retry, deadline, attempt - 1)
            if time.monotonic() >= deadline:
                failures.extend(retry)
                break
            todo = np.concatenate([pos for pos, _ in retry])
        if failures and not partial:
            self.stats.failed_calls += 1
            raise _worst(failures + seen)
        self.stats.partial_keys += sum(len(pos) for pos, _ in failures)
        return answers

    def _learn(self, view: ClusterView, outcomes: list[_Outcome]) -> None:
        """Record the leader hints of NOT_LEADER replies (down marks are kept by `_send`)."""
        if view is not self._view:
            return
        pos = {n: i for i, n in enumerate(view.node_ids)}
        for out in outcomes:
            if isinstance(out, NotLeaderError):
                for part, leader in out.leaders.items():
                    if leader in pos and 0 <= part < len(self._leaders):
                        self._leaders[part] = pos[leader]

    def _hints_usable(self, view: ClusterView, retry: list[_Failure]) -> bool:
        """Whether every refused partition names a leader that is not marked down."""
        for _, err in retry:
            assert isinstance(err, NotLeaderError)
            for leader in err.leaders.values():
                if not leader or leader not in view.addresses or self._is_down(leader):
                    return False
        return True

    def _is_down(self, node_id: str) -> bool:
        until = self._down_until.get(node_id)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._down_until[node_id]
            return False
        return True

    def _routes(self, view: ClusterView, leader: bool) -> npt.NDArray[np.intp]:
        if not leader:
            return choose_replicas(view.replica_index, self._read_costs(view))
        if view.proto.replicas <= 1:
            return view.replica_index[:, 0]
        down = np.array([self._is_down(n) for n in view.node_ids], dtype=np.bool_)
        leaders = self._leaders if len(self._leaders) == view.partitions else view.replica_index[:, 0]
        if not down.any():
            return leaders
        # A cached leader that is down: ask a live replica, which names the new leader.
        alive = choose_replicas(view.replica_index, np.where(down, np.inf, 0.0))
        return np.where(down[leaders], alive, leaders)

    async def _send(self, view: ClusterView, group: NodeGroup, build: BuildRequest, deadline: float) -> pb.DataResponse:
        """Send one node its group; mark the node down if it does not answer, up if it does."""
        node_id = view.node_ids[group.node]
        conn = self._connection(node_id, view.addresses[node_id])
        try:
            resp = await conn.request(build(group.positions, view.epoch), deadline - time.monotonic())
        except UnavailableError as exc:
            if not exc.epoch:  # no epoch: the node itself did not answer (an in-band error carries one)
                self._down_until[node_id] = time.monotonic() + DOWN_S
            raise
        self._down_until.pop(node_id, None)
        field = resp.WhichOneof("result")
        self._note_epoch(int(getattr(resp, field).epoch) if field else 0)
        return resp

    async def _send_one(
        self, view: ClusterView, group: NodeGroup, build: BuildRequest, deadline: float
    ) -> list[Answer]:
        return [(group.positions, await self._send(view, group, build, deadline))]

    @staticmethod
    def _sort_outcomes(
        groups: list[NodeGroup], outcomes: list[_Outcome], answers: list[Answer]
    ) -> tuple[list[_Failure], list[_Failure]]:
        retry: list[_Failure] = []
        failures: list[_Failure] = []
        for group, out in zip(groups, outcomes, strict=True):
            if isinstance(out, list):
                answers.extend(out)
            elif isinstance(out, ClientError):
                raise out
            elif isinstance(out, RoutingError | UnavailableError):
                retry.append((group.positions, out))
            elif isinstance(out, KvError):
                failures.append((group.positions, out))
            else:
                raise out
        return retry, failures

    async def _recover(self, retry: list[_Failure], deadline: float, attempt: int) -> None:
        if any(isinstance(err, UnavailableError) for _, err in retry):
            await asyncio.sleep(max(0.0, min(self._retry.delay_s(attempt), deadline - time.monotonic())))
        try:
            await asyncio.wait_for(self.refresh_map(), max(0.001, deadline - time.monotonic()))
        except (KvError, TimeoutError) as exc:
            log.debug("map refresh during retry failed: %s", exc)


def _replicas_caught_up(status: list[pb.PartitionStatusResponse | KvError]) -> bool:
    """Every node answered, and every replica applied its partition's highest commit index."""
    answers = [resp for resp in status if not isinstance(resp, KvError)]
    if len(answers) < len(status):
        return False
    commit: dict[int, int] = {}
    for resp in answers:
        for g in resp.groups:
            commit[g.partition] = max(commit.get(g.partition, 0), g.commit_index)
    return all(g.applied_index >= commit[g.partition] for resp in answers for g in resp.groups)


def _consistency(value: object) -> pb.Consistency.ValueType:
    if isinstance(value, str) and value in _CONSISTENCY:
        return _CONSISTENCY[value]
    raise ClientError(f"consistency: {value!r} is not 'any' or 'leader'", field="consistency")


def _worst(failures: list[_Failure]) -> KvError:
    """Pick the error to raise: unavailability names the node, over a bare deadline."""
    errors = [err for _, err in failures]
    for cls in (UnavailableError, DeadlineExceededError, RoutingError):
        for err in errors:
            if isinstance(err, cls):
                return err
    return errors[0]
