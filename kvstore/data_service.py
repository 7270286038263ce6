"""The Data gRPC service: validate, check ownership, read or write the store.

Read path on a node, per request:
1. decode the packed ids (checked: multiple of 8 bytes, 1..MAX_BATCH_KEYS);
2. look up the table in the map in force (UNKNOWN_TABLE otherwise);
3. hash ids to partitions; refuse with STALE_MAP if any is not held here;
4. gather cached rows with one numpy index; fetch misses from RocksDB per partition and
   cache them; 5. reply with a found mask and the found rows as one packed buffer.

Errors travel in-band on the Session stream (`DataResponse.error`) and as a gRPC status plus
the same `Error` in trailing metadata on unary calls. Runs on the node's event loop; the
store call is synchronous (memory and RocksDB lookups, well under a millisecond per 1,000
cached keys).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np
import numpy.typing as npt

from kvclient._codec import check_records, decode_vectors, unpack_ids
from kvclient._connection import ERROR_METADATA_KEY
from kvclient._errors import ClientError, KvError, ServerError, error_from_proto
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvclient._ring import partitions_of
from kvstore.state import LocalMap, NodeState

log = logging.getLogger(__name__)

_STATUS: dict[pb.ErrorCode.ValueType, grpc.StatusCode] = {
    pb.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    pb.UNKNOWN_TABLE: grpc.StatusCode.NOT_FOUND,
    pb.STALE_MAP: grpc.StatusCode.FAILED_PRECONDITION,
    pb.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    pb.INTERNAL: grpc.StatusCode.INTERNAL,
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

        async def serve_requests() -> None:
            try:
                async for req in request_iterator:
                    replies.put_nowait(self.handle(req))
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(serve_requests())
        try:
            while (resp := await replies.get()) is not None:
                yield resp
        finally:
            reader.cancel()

    async def MultiGet(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.GetResponse:  # noqa: N802
        resp = self.handle(pb.DataRequest(get=request))
        if resp.HasField("error"):
            await abort_with(context, error_from_proto(resp.error))
        return resp.get

    async def MultiPut(self, request: pb.PutRequest, context: grpc.aio.ServicerContext) -> pb.PutResponse:  # noqa: N802
        resp = self.handle(pb.DataRequest(put=request))
        if resp.HasField("error"):
            await abort_with(context, error_from_proto(resp.error))
        return resp.put

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:  # noqa: N802
        resp = self.handle(pb.DataRequest(delete=request))
        if resp.HasField("error"):
            await abort_with(context, error_from_proto(resp.error))
        return resp.delete

    # ---- one request ----

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
        except KvError as err:
            if not err.epoch:
                err.epoch = self.state.epoch
            resp = pb.DataResponse(request_id=req.request_id, error=err.to_proto())
        except Exception as exc:  # a bug must not kill the stream for everyone on it
            log.exception("request failed node=%s", self.state.node_id)
            bug = ServerError(f"node {self.state.node_id}: {exc!r}")
            resp = pb.DataResponse(request_id=req.request_id, error=bug.to_proto())
        return resp

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
