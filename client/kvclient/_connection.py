"""One client-side connection to one node: a gRPC channel plus a multiplexed Session stream.

Many concurrent requests share one long-lived bidirectional stream; each carries an id and
its reply is matched by id (`grpc-call-cost.md`: about half the latency and a third of the
server CPU of unary calls). The unary transport is kept for comparison and for simple
callers. Not thread-safe: use from one event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Literal

import grpc

from kvclient._errors import (
    DeadlineExceededError,
    KvError,
    ServerError,
    UnavailableError,
    error_from_proto,
)
from kvclient._limits import GRPC_CHANNEL_OPTIONS
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Transport = Literal["stream", "unary"]
ERROR_METADATA_KEY = "kv-error-bin"
# gRPC's default reconnect backoff (1 s growing to 120 s) keeps a restarted node looking down
# for seconds after it serves again; a store client wants to find it within a few hundred ms.
_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

# Statuses that mean "this is not a kvstore node" rather than "the node or link failed".
_NOT_OURS = {
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def error_from_rpc(err: grpc.aio.AioRpcError, node: str) -> KvError:
    """Map a failed gRPC call to our error tree, using the in-band detail when present.

    A node reports its own errors in-band (trailing metadata on unary calls, `Error` on
    streams); a status without that detail comes from the link or the gRPC core (a reset
    stream surfaces as INTERNAL), so it means the node is unavailable.
    """
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_METADATA_KEY and isinstance(value, bytes):
            return error_from_proto(pb.Error.FromString(value))
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"node {node}: deadline exceeded")
    if err.code() in _NOT_OURS:
        return ServerError(f"node {node}: {err.code().name}: {err.details()}")
    return UnavailableError(f"node {node} unavailable: {err.code().name}: {err.details()}")


class NodeConnection:
    """Requests to one node over a shared stream (or unary calls)."""

    def __init__(self, node_id: str, address: str, transport: Transport = "stream") -> None:
        self.node_id = node_id
        self.address = address
        self.transport = transport
        self.inflight = 0
        self._channel = grpc.aio.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS + _RECONNECT_OPTIONS)
        self._data = pb_grpc.DataStub(self._channel)
        self.admin = pb_grpc.AdminStub(self._channel)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[pb.DataResponse]] = {}
        self._call: grpc.aio.StreamStreamCall | None = None
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return f"{self.node_id} at {self.address}"

    async def request(self, req: pb.DataRequest, timeout_s: float) -> pb.DataResponse:
        """Send one request and return its reply; raise a `KvError` for in-band errors.

        Raises `UnavailableError` when the node cannot be reached and
        `DeadlineExceededError` when `timeout_s` passes first.
        """
        if timeout_s <= 0:
            raise DeadlineExceededError(f"node {self.label}: deadline passed before sending")
        self.inflight += 1
        try:
            if self.transport == "unary":
                resp = await self._unary(req, timeout_s)
            else:
                resp = await self._streamed(req, timeout_s)
        finally:
            self.inflight -= 1
        if resp.WhichOneof("result") == "error":
            raise error_from_proto(resp.error)
        return resp

    async def _streamed(self, req: pb.DataRequest, timeout_s: float) -> pb.DataResponse:
        call = self._ensure_stream()
        req.request_id = next(self._ids)
        fut: asyncio.Future[pb.DataResponse] = asyncio.get_running_loop().create_future()
        self._pending[req.request_id] = fut
        try:
            # Shielded: grpc.aio cancels the whole call when a write is cancelled, which would
            # fail every request sharing the stream (hedging cancels losing requests routinely).
            # The write is bounded too: a stopped node stops reading, and once gRPC's flow
            # control window is full a write waits until the node reads again.
            deadline = time.monotonic() + timeout_s
            write = self._write(call, req)
            await asyncio.wait_for(asyncio.shield(write), timeout_s)
            return await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if not write.done():  # the node stopped reading: later writes would queue behind this one
                call.cancel()  # the reader then fails every request of this stream; the next one opens a new stream
            raise DeadlineExceededError(f"node {self.label}: no reply within {timeout_s * 1000:.0f} ms") from None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            if fut.done():  # the reader saw the stream fail and set the reason
                return await fut
            raise UnavailableError(f"node {self.label}: stream closed") from None
        finally:
            self._pending.pop(req.request_id, None)

    def _write(self, call: grpc.aio.StreamStreamCall, req: pb.DataRequest) -> asyncio.Task[None]:
        """Start writing `req` as its own task, so that cancelling the caller cannot cut it short."""

        async def write() -> None:
            async with self._write_lock:  # gRPC allows one message in flight per call
                await call.write(req)

        task = asyncio.ensure_future(write())
        task.add_done_callback(_retrieve)
        return task

    def _ensure_stream(self) -> grpc.aio.StreamStreamCall:
        if self._call is None:
            call = self._data.Session()
            self._call = call
            self._reader = asyncio.create_task(self._read(call))
        return self._call

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        failure: KvError = UnavailableError(f"node {self.label}: stream closed")
        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                fut = self._pending.get(resp.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except grpc.aio.AioRpcError as err:
            failure = error_from_rpc(err, self.label)
            log.debug("stream failed node=%s code=%s", self.node_id, err.code().name)
        except asyncio.CancelledError:
            failure = UnavailableError(f"node {self.label}: connection closed")
        finally:
            if self._call is call:
                self._call = None
            call.cancel()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(failure)

    async def _unary(self, req: pb.DataRequest, timeout_s: float) -> pb.DataResponse:
        op = req.WhichOneof("op")
        try:
            if op == "get":
                return pb.DataResponse(get=await self._data.MultiGet(req.get, timeout=timeout_s))
            if op == "put":
                return pb.DataResponse(put=await self._data.MultiPut(req.put, timeout=timeout_s))
            return pb.DataResponse(delete=await self._data.Delete(req.delete, timeout=timeout_s))
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, self.label) from None

    async def close(self) -> None:
        """Close the stream and the channel; pending requests fail with `UnavailableError`."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._channel.close()


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a write's failure as seen: the caller may be gone, and the reader reports it."""
    if not task.cancelled():
        task.exception()
