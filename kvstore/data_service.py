"""The Data gRPC service: validate, check ownership, read or write the store.

Read path on a node, per request:
1. decode the packed ids (checked: multiple of 8 bytes, 1..MAX_BATCH_KEYS);
2. look up the table in the map in force (UNKNOWN_TABLE otherwise);
3. hash ids to partitions; refuse with STALE_MAP if any is not held here;
4. with `consistency=LEADER` on a replicated cluster, refuse with NOT_LEADER (hints as for
   writes) unless this node's replica leads every partition of the request;
5. gather cached rows with one numpy index; fetch misses from RocksDB per partition and
   cache them; 6. reply with a found mask and the found rows as one packed buffer.

Write path with replicas > 1 (`_replicated_write`): validate and check ownership exactly as
above (bad input changes nothing), split the batch into one `Command` per partition, and
propose each on the local Raft group if it leads it (all at once, asynchronously: the
engine batches them); reply once every command is committed by a majority and applied here. A
partition led elsewhere refuses the request with NOT_LEADER naming the leader; a proposal
without an outcome in time is UNAVAILABLE (it may still commit: writes are idempotent).

Errors travel in-band on the Session stream (`DataResponse.error`) and as a gRPC status plus
the same `Error` in trailing metadata on unary calls. Runs on the node's event loop; the
store call is synchronous (memory and RocksDB lookups, well under a millisecond per 1,000
cached keys).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

import grpc
import numpy as np
import numpy.typing as npt

from kvclient._codec import check_records, decode_vectors, unpack_ids
from kvclient._connection import ERROR_METADATA_KEY
from kvclient._errors import (
    ClientError,
    KvError,
    NotLeaderError,
    ServerError,
    UnavailableError,
    error_from_proto,
)
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvclient._ring import partitions_of
from kvstore import replication
from kvstore.replication.command import Command, encode
from kvstore.state import LocalMap, NodeState
from kvstore.store import last_occurrence

PROPOSE_TIMEOUT_S = 5.0
COMMAND_BYTES = 256 * 1024
"""Target size of one replicated command (the engine caps an entry at 448 KiB)."""
MAX_REPLICATED_RECORD_BYTES = 400 * 1024
"""Largest feature record a replicated table accepts (one record must fit one entry)."""


def _by_partition(
    parts: npt.NDArray[np.intp], positions: npt.NDArray[np.intp], sizes: npt.NDArray[np.int64]
) -> list[tuple[int, npt.NDArray[np.intp]]]:
    """Group `positions` by partition, split into runs whose `sizes` sum to about COMMAND_BYTES."""
    out: list[tuple[int, npt.NDArray[np.intp]]] = []
    sub = parts[positions]
    for part in np.unique(sub).tolist():
        mask = sub == part
        sel, size = positions[mask], np.asarray(sizes)[mask]
        start = 0
        total = np.cumsum(size)
        while start < len(sel):
            base = total[start - 1] if start else 0
            end = max(start + 1, int(np.searchsorted(total, base + COMMAND_BYTES, side="right")))
            out.append((int(part), sel[start:end]))
            start = end
    return out


log = logging.getLogger(__name__)

_STATUS: dict[pb.ErrorCode.ValueType, grpc.StatusCode] = {
    pb.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    pb.UNKNOWN_TABLE: grpc.StatusCode.NOT_FOUND,
    pb.STALE_MAP: grpc.StatusCode.FAILED_PRECONDITION,
    pb.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    pb.INTERNAL: grpc.StatusCode.INTERNAL,
    pb.NOT_LEADER: grpc.StatusCode.FAILED_PRECONDITION,
}


async def abort_with(context: grpc.aio.ServicerContext, err: KvError) -> None:
    """End a unary call with `err` as a gRPC status plus the in-band error detail."""
    detail = err.to_proto().SerializeToString()
    await context.abort(_STATUS.get(err.code, grpc.StatusCode.INTERNAL), err.message, ((ERROR_METADATA_KEY, detail),))


class DataService(pb_grpc.DataServicer):
    """Serves multi-get, multi-put and delete, unary and over Session streams."""

    def __init__(self, state: NodeState) -> None:
        self.state = state

    # ---- transports ----

    async def Session(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[pb.DataRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DataResponse]:
        # Read and serve in one task, write replies from here: a reply being written does
        # not hold up reading the next request of another caller sharing the stream.
        replies: asyncio.Queue[pb.DataResponse | None] = asyncio.Queue()

        pending: set[asyncio.Task[None]] = set()

        async def replicate(req: pb.DataRequest) -> None:
            replies.put_nowait(await self.handle_async(req))

        async def serve_requests() -> None:
            try:
                async for req in request_iterator:
                    if self._is_replicated_write(req):
                        # Proposals take milliseconds: serve other requests meanwhile.
                        task = asyncio.create_task(replicate(req))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                    else:
                        replies.put_nowait(self.handle(req))
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(serve_requests())
        try:
            while (resp := await replies.get()) is not None:
                yield resp
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def MultiGet(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.GetResponse:  # noqa: N802
        resp = self.handle(pb.DataRequest(get=request))
        if resp.HasField("error"):
            await abort_with(context, error_from_proto(resp.error))
        return resp.get

    async def MultiPut(self, request: pb.PutRequest, context: grpc.aio.ServicerContext) -> pb.PutResponse:  # noqa: N802
        resp = await self.handle_async(pb.DataRequest(put=request))
        if resp.HasField("error"):
            await abort_with(context, error_from_proto(resp.error))
        return resp.put

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:  # noqa: N802
        resp = await self.handle_async(pb.DataRequest(delete=request))
        if resp.HasField("error"):
            await abort_with(context, error_from_proto(resp.error))
        return resp.delete

    # ---- one request ----

    def _is_replicated_write(self, req: pb.DataRequest) -> bool:
        local = self.state.local
        return local is not None and local.replicated and req.WhichOneof("op") in ("put", "delete")

    async def handle_async(self, req: pb.DataRequest) -> pb.DataResponse:
        """Serve one request; replicated writes wait for their Raft groups."""
        if not self._is_replicated_write(req):
            return self.handle(req)
        self.state.requests += 1
        resp = pb.DataResponse(request_id=req.request_id)
        try:
            if req.WhichOneof("op") == "put":
                resp.put.written = await self._replicated_write(req.put.table, req.put.ids, req.put)
                resp.put.epoch = self.state.epoch
            else:
                resp.delete.deleted = await self._replicated_write(req.delete.table, req.delete.ids, None)
                resp.delete.epoch = self.state.epoch
        except Exception as exc:  # a bug must not kill the stream for everyone on it
            resp = self._error_reply(req.request_id, exc)
        return resp

    async def _replicated_write(self, table: str, ids_buf: bytes, put: pb.PutRequest | None) -> int:
        """Validate, build one command per partition, propose them all; return the count."""
        _, schema, ids, parts = self._route(table, ids_buf)
        commands = self._commands(schema, ids, parts, put)
        groups = self._led_groups(dict.fromkeys(cmd.partition for cmd in commands), for_reads=False)
        hints: dict[int, str] = {}
        futures = [groups[cmd.partition].propose_async(encode(cmd), PROPOSE_TIMEOUT_S) for cmd in commands]
        try:  # one wake-up for the whole request; the engine fails each proposal at its timeout
            await asyncio.wait_for(asyncio.wrap_future(replication.when_all(futures)), PROPOSE_TIMEOUT_S + 5.0)
        except TimeoutError:  # the engine itself is stuck: never hold the request forever
            raise UnavailableError(f"node {self.state.node_id}: the replication engine did not answer, retry") from None
        results = [f.exception() or f.result() for f in futures]
        for part, result in zip((cmd.partition for cmd in commands), results, strict=True):
            if isinstance(result, replication.NotLeaderError):
                hints[part] = result.leader or ""
            elif isinstance(result, replication.ProposalTimeoutError):
                raise UnavailableError(f"node {self.state.node_id}: partition {part}: no commit in time, retry")
            elif isinstance(result, BaseException):
                raise ServerError(f"node {self.state.node_id}: partition {part}: {result!r}")
            elif result is not None and result.startswith(b"error:"):
                raise ServerError(
                    f"node {self.state.node_id}: partition {part}: apply failed: {result.decode(errors='replace')}"
                )
        if hints:
            raise self._not_leader(hints)
        return sum(cmd.put_count + cmd.delete_count for cmd in commands)

    def _not_leader(self, hints: dict[int, str]) -> NotLeaderError:
        part, leader = next(iter(hints.items()))
        return NotLeaderError(
            f"node {self.state.node_id} does not lead partition {part} (leader: {leader or 'unknown'})",
            field="ids",
            leaders=hints,
        )

    @staticmethod
    def _commands(
        schema: pb.TableSchema, ids: npt.NDArray[np.uint64], parts: npt.NDArray[np.intp], put: pb.PutRequest | None
    ) -> list[Command]:
        """Return the commands of a request: per partition, chunks of at most ~COMMAND_BYTES.

        Validation raises before anything is built. A partition's share larger than one
        chunk becomes several commands (each atomic on its own).
        """
        count = len(ids)
        out: list[Command] = []
        if put is None:
            for part, sel in _by_partition(parts, np.arange(count), np.full(count, 8)):
                out.append(Command(partition=part, table_id=schema.table_id, deletes=ids[sel].astype("<u8").tobytes()))
            return out
        keep = last_occurrence(ids)  # a later duplicate id wins, as in the single-copy path
        if schema.kind == pb.FEATURES:
            if len(put.records) != count:
                raise ClientError(f"records: {len(put.records)} records for {count} ids", field="records")
            check_records(put.records)
            records = list(put.records)
            sizes = np.array([len(records[i]) + 16 for i in keep.tolist()], dtype=np.int64)
            if len(sizes) and int(sizes.max()) > MAX_REPLICATED_RECORD_BYTES:
                raise ClientError(
                    f"records: a record of {int(sizes.max()) - 16} bytes exceeds the "
                    f"{MAX_REPLICATED_RECORD_BYTES} bytes a replicated table accepts",
                    field="records",
                )
            for part, sel in _by_partition(parts, keep, sizes):
                out.append(
                    Command(
                        partition=part,
                        table_id=schema.table_id,
                        ids=ids[sel].astype("<u8").tobytes(),
                        records=tuple(records[i] for i in sel.tolist()),
                    )
                )
            return out
        rows = decode_vectors(schema, put.values, put.dtype, count)
        row_bytes = rows.dtype.itemsize * int(schema.dim) + 8
        for part, sel in _by_partition(parts, keep, np.full(len(keep), row_bytes)):
            out.append(
                Command(
                    partition=part,
                    table_id=schema.table_id,
                    ids=ids[sel].astype("<u8").tobytes(),
                    values=np.ascontiguousarray(rows[sel]).tobytes(),
                )
            )
        return out

    def handle(self, req: pb.DataRequest) -> pb.DataResponse:
        """Serve one request; every failure becomes an in-band error, never an exception."""
        self.state.requests += 1
        resp = pb.DataResponse(request_id=req.request_id)
        try:
            op = req.WhichOneof("op")
            # Fill the reply in place: building a sub-message and assigning it copies it.
            if op == "get":
                self._get(req.get, resp.get)
            elif op == "put":
                self._put(req.put, resp.put)
            elif op == "delete":
                self._delete(req.delete, resp.delete)
            else:
                raise ClientError("op: request carries no get, put or delete", field="op")
        except Exception as exc:  # a bug must not kill the stream for everyone on it
            resp = self._error_reply(req.request_id, exc)
        return resp

    def _error_reply(self, request_id: int, exc: Exception) -> pb.DataResponse:
        """Turn a failure into an in-band error reply carrying this node's epoch."""
        if isinstance(exc, KvError):
            if not exc.epoch:
                exc.epoch = self.state.epoch
            return pb.DataResponse(request_id=request_id, error=exc.to_proto())
        log.exception("request failed node=%s", self.state.node_id, exc_info=exc)
        bug = ServerError(f"node {self.state.node_id}: {exc!r}")
        return pb.DataResponse(request_id=request_id, error=bug.to_proto())

    def _route(
        self, table: str, ids_buf: bytes
    ) -> tuple[LocalMap, pb.TableSchema, npt.NDArray[np.uint64], npt.NDArray[np.intp]]:
        local = self.state.current()
        schema = local.view.table(table)
        ids = unpack_ids(ids_buf)
        parts = partitions_of(table, ids, local.view.partitions)
        local.check_owned(parts)
        return local, schema, ids, parts

    def _get(self, req: pb.GetRequest, out: pb.GetResponse) -> None:
        local, schema, ids, parts = self._route(req.table, req.ids)
        if req.consistency == pb.LEADER and local.replicated:
            self._led_groups(np.unique(parts).tolist(), for_reads=True)
        store = self.state.store
        out.epoch = local.epoch
        if schema.kind == pb.FEATURES:
            found, records = store.get_records(schema, ids, parts)
            out.found = found.tobytes()
            out.records.extend(records)
            return
        found, rows = store.get_vectors(schema, ids, parts)
        out.found = found.tobytes()
        out.values = rows.tobytes()
        out.dtype = schema.dtype

    def _led_groups(self, parts: Iterable[int], *, for_reads: bool) -> dict[int, replication.PartitionGroup]:
        """Return the local group of each partition in `parts`, all led by this node; else raise.

        Raises NOT_LEADER naming each refused partition's last known leader ("" during an
        election, or while this leader cannot serve leader reads yet: back off). For reads a
        leader must also hold its read lease: it applied its term's first entry and a
        majority answered it within 0.8 s (below the minimum election timeout), so a
        cut-off leader stops serving them before a new one can be elected.
        """
        rep = self.state.replicator
        if rep is None:
            raise UnavailableError(f"node {self.state.node_id} has no replicator (started without --raft-port)")
        groups: dict[int, replication.PartitionGroup] = {}
        hints: dict[int, str] = {}
        for part in parts:
            try:
                group = rep.group(part)
            except KeyError:
                raise UnavailableError(f"node {self.state.node_id}: partition {part} has no open group yet") from None
            if not group.is_leader():
                hints[part] = group.leader() or ""
            elif for_reads and not group.serves_leader_reads():
                hints[part] = ""
            groups[part] = group
        if hints:
            raise self._not_leader(hints)
        return groups

    def _put(self, req: pb.PutRequest, out: pb.PutResponse) -> None:
        local, schema, ids, parts = self._route(req.table, req.ids)
        count = len(ids)
        store = self.state.store
        if schema.kind == pb.FEATURES:
            if len(req.records) != count:
                raise ClientError(f"records: {len(req.records)} records for {count} ids", field="records")
            check_records(req.records)
            out.written = store.put_records(schema, ids, parts, list(req.records))
        else:
            rows = decode_vectors(schema, req.values, req.dtype, count)
            out.written = store.put_vectors(schema, ids, parts, rows)
        out.epoch = local.epoch

    def _delete(self, req: pb.DeleteRequest, out: pb.DeleteResponse) -> None:
        local, schema, ids, parts = self._route(req.table, req.ids)
        out.deleted = self.state.store.delete(schema, ids, parts)
        out.epoch = local.epoch
