"""The blocking client: an `AsyncClient` driven on a private event-loop thread.

One implementation of the routing logic serves both APIs (redis-py keeps two trees and they
drift). Each call hops to the loop thread and back (tens of microseconds), which is small
next to a network round trip. Thread-safe: any number of threads may call one `Client`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from kvclient._aio import AsyncClient, ClientStats, RetryPolicy
from kvclient._clustermap import ClusterView
from kvclient._connection import Transport

P = ParamSpec("P")
T = TypeVar("T")


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    def call(self: Client, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._aio, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class Client:
    """Blocking kvstore client; `with Client(["127.0.0.1:7000"]) as kv: kv.get(...)`.

    Same methods and arguments as `AsyncClient`.
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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvclient-loop", daemon=True)
        self._thread.start()
        options = {"deadline_s": deadline_s, "transport": transport, "retry": retry}
        hedging = {"hedge_after_ms": hedge_after_ms, "hedge_ratio": hedge_ratio}
        try:
            self._aio = self._run(_make(seeds, **options, **hedging))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
            raise
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close connections and stop the loop thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._run(self._aio.close())
        self._run(self._loop.shutdown_asyncgens())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    @property
    def view(self) -> ClusterView:
        return self._aio.view

    @property
    def stats(self) -> ClientStats:
        """The live counters of the underlying `AsyncClient` (read them, do not write)."""
        return self._aio.stats

    connect = _blocking(AsyncClient.connect)
    refresh_map = _blocking(AsyncClient.refresh_map)
    create_table = _blocking(AsyncClient.create_table)
    drop_table = _blocking(AsyncClient.drop_table)
    list_tables = _blocking(AsyncClient.list_tables)
    node_stats = _blocking(AsyncClient.node_stats)
    partition_status = _blocking(AsyncClient.partition_status)
    warm_cache = _blocking(AsyncClient.warm_cache)
    wait_for_replicas = _blocking(AsyncClient.wait_for_replicas)
    get = _blocking(AsyncClient.get)
    put = _blocking(AsyncClient.put)
    delete = _blocking(AsyncClient.delete)
    get_features = _blocking(AsyncClient.get_features)
    put_features = _blocking(AsyncClient.put_features)


async def _make(seeds: Sequence[str] | str, **options: Any) -> AsyncClient:
    # Built on the loop thread so that its gRPC objects bind to that loop.
    return AsyncClient(seeds, **options)


__all__ = ["Client"]
