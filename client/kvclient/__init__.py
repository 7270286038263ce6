"""kvclient: the light client library of kvstore (grpcio, numpy, xxhash, msgpack only).

from kvclient import Client
with Client(["127.0.0.1:7000"]) as kv:
    kv.create_table("items", dim=64)
    kv.put("items", ids, vectors)
    res = kv.get("items", ids)       # res.values (K, 64) float32, res.found (K,) bool
"""

from kvclient._aio import AsyncClient, ClientStats, RetryPolicy
from kvclient._batch import KeyStatus
from kvclient._errors import (
    ClientError,
    DeadlineExceededError,
    KvError,
    NotLeaderError,
    RoutingError,
    ServerError,
    UnavailableError,
    UnknownTableError,
)
from kvclient._limits import MAX_BATCH_BYTES, MAX_BATCH_KEYS, MAX_DIM, MAX_RECORD_BYTES
from kvclient._results import FeaturesResult, GetResult, TableInfo
from kvclient._sync import Client

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_KEYS",
    "MAX_DIM",
    "MAX_RECORD_BYTES",
    "AsyncClient",
    "Client",
    "ClientError",
    "ClientStats",
    "DeadlineExceededError",
    "FeaturesResult",
    "GetResult",
    "KeyStatus",
    "KvError",
    "NotLeaderError",
    "RetryPolicy",
    "RoutingError",
    "ServerError",
    "TableInfo",
    "UnavailableError",
    "UnknownTableError",
]
