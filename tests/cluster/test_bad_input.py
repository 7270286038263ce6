"""Bad input gets a clear error naming the field and the limit, and writes nothing."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from kvclient import MAX_BATCH_KEYS, Client, ClientError, UnknownTableError
from kvclient._connection import ERROR_METADATA_KEY
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvclient._ring import partitions_of
from kvstore.launcher import LocalCluster

TABLE = "strict"


@pytest.fixture
def strict(kv: Client) -> Client:
    kv.create_table(TABLE, dim=4, if_not_exists=True)
    return kv


def _nothing_stored(kv: Client, ids: list[int]) -> bool:
    return not kv.get(TABLE, ids).found.any()


GOOD = np.ones((2, 4), dtype=np.float32)


@pytest.mark.parametrize(
    ("ids", "vectors", "words"),
    [
        ([1, 2], np.ones((2, 3), dtype=np.float32), ["dim 3 != 4", "strict"]),
        ([1, 2], np.ones((3, 4), dtype=np.float32), ["3 rows for 2 ids"]),
        ([1, 2], np.array([["a"] * 4] * 2), ["vectors", "not numeric"]),
        ([1.5, 2.0], GOOD, ["ids", "integer"]),
        ([[1, 2]], GOOD, ["ids", "1-D"]),
        ([-1, 2], GOOD, ["ids", "negative"]),
        ([], np.ones((0, 4), dtype=np.float32), ["ids", "empty"]),
        ([1, 2], np.array([[np.nan, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32), ["NaN or inf", "row 0"]),
        ([1, 2], np.array([[np.inf, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32), ["NaN or inf"]),
    ],
)
def test_put_rejects_bad_input_and_writes_nothing(
    strict: Client, ids: list, vectors: np.ndarray, words: list[str]
) -> None:
    with pytest.raises(ClientError) as info:
        strict.put(TABLE, ids, vectors)
    for word in words:
        assert word in str(info.value)
    assert _nothing_stored(strict, [1, 2])


def test_batch_over_the_key_limit_names_the_limit(strict: Client) -> None:
    ids = np.arange(MAX_BATCH_KEYS + 1, dtype=np.uint64)
    with pytest.raises(ClientError, match=f"{MAX_BATCH_KEYS + 1} keys exceeds the limit of {MAX_BATCH_KEYS}"):
        strict.get(TABLE, ids)
    with pytest.raises(ClientError, match=str(MAX_BATCH_KEYS)):
        strict.put(TABLE, ids, np.zeros((len(ids), 4), dtype=np.float32))
    assert _nothing_stored(strict, [0, 1, MAX_BATCH_KEYS])


def test_unknown_table(strict: Client) -> None:
    with pytest.raises(UnknownTableError, match="'nope' does not exist"):
        strict.get("nope", [1])
    with pytest.raises(UnknownTableError):
        strict.put("nope", [1], np.ones((1, 4), dtype=np.float32))


def test_wrong_kind_of_table(strict: Client) -> None:
    with pytest.raises(ClientError, match="embedding table; use get/put"):
        strict.put_features(TABLE, [1], [{"a": 1}])


def test_float16_overflow_is_rejected(kv: Client) -> None:
    kv.create_table("half_strict", dim=2, dtype="float16", if_not_exists=True)
    with pytest.raises(ClientError, match="float16 range"):
        kv.put("half_strict", [1], [[1e6, 0.0]])
    assert not kv.get("half_strict", [1]).found.any()


def test_bad_schemas(kv: Client) -> None:
    with pytest.raises(ClientError, match="dim"):
        kv.create_table("no_dim")
    with pytest.raises(ClientError, match="dtype"):
        kv.create_table("bad_dtype", dim=4, dtype="int64")
    with pytest.raises(ClientError, match="table"):
        kv.create_table("bad name!", dim=4)
    kv.create_table("twice", dim=4)
    with pytest.raises(ClientError, match="already exists"):
        kv.create_table("twice", dim=8)
    assert kv.create_table("twice", dim=4, if_not_exists=True).dim == 4


def _raw_put(cluster: LocalCluster, kv: Client, req: pb.PutRequest, node: str | None = None) -> grpc.RpcError:
    """Send a hand-made request straight to `node`, by default the owner of its first id."""
    if node is None:
        first = np.frombuffer(req.ids[:8].ljust(8, b"\0"), dtype="<u8")
        part = int(partitions_of(req.table or TABLE, first, kv.view.partitions)[0])
        node = kv.view.proto.placement[part].node_ids[0]
    with grpc.insecure_channel(kv.view.addresses[node]) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.DataStub(channel).MultiPut(req, timeout=5)
    return info.value


def _detail(err: grpc.RpcError) -> pb.Error:
    meta = dict(err.trailing_metadata())
    return pb.Error.FromString(meta[ERROR_METADATA_KEY])


def test_node_validates_hand_made_requests(cluster: LocalCluster, strict: Client) -> None:
    ids = np.array([1], dtype="<u8").tobytes()
    short = np.ones(3, dtype="<f4").tobytes()
    err = _raw_put(cluster, strict, pb.PutRequest(table=TABLE, ids=ids, values=short, dtype=pb.FLOAT32))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 bytes for 1 ids" in err.details() and _detail(err).field == "vectors"
    err = _raw_put(cluster, strict, pb.PutRequest(table=TABLE, ids=b"\x01\x02\x03", values=short))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "multiple of 8" in err.details()
    err = _raw_put(cluster, strict, pb.PutRequest(table="missing", ids=ids))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert _nothing_stored(strict, [1])


def test_node_refuses_keys_it_does_not_hold(cluster: LocalCluster, strict: Client) -> None:
    view = strict.view
    ids = np.arange(200, dtype=np.uint64)
    parts = partitions_of(TABLE, ids, view.partitions)
    node = view.node_ids[0]
    foreign = ids[[node not in view.proto.placement[p].node_ids for p in parts]][:1]
    req = pb.PutRequest(
        table=TABLE, ids=foreign.astype("<u8").tobytes(), values=np.ones(4, "<f4").tobytes(), dtype=pb.FLOAT32
    )
    err = _raw_put(cluster, strict, req, node=node)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _detail(err).epoch == view.epoch and "does not hold partition" in err.details()
    assert _nothing_stored(strict, [int(foreign[0])])
