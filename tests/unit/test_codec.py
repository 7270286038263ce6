"""Wire validation and packing: ids, embedding rows, feature records."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvclient._codec import (
    as_ids,
    check_dim,
    check_records,
    check_table_name,
    check_vectors,
    decode_vectors,
    default_row,
    dtype_code,
    pack_ids,
    pack_records,
    unpack_ids,
    unpack_record,
)
from kvclient._errors import ClientError
from kvclient._limits import MAX_BATCH_BYTES, MAX_BATCH_KEYS, MAX_DIM, MAX_RECORD_BYTES
from kvclient._proto import kvstore_pb2 as pb

U64_MAX = 2**64 - 1
uint64s = st.integers(min_value=0, max_value=U64_MAX)


def schema(
    dim: int = 4, dtype: pb.DType.ValueType = pb.FLOAT32, *, name: str = "items", allow_nonfinite: bool = False
) -> pb.TableSchema:
    return pb.TableSchema(
        name=name, kind=pb.EMBEDDING, dim=dim, dtype=dtype, allow_nonfinite=allow_nonfinite, table_id=1
    )


# ---- ids ----


@given(ids=st.lists(uint64s, min_size=1, max_size=200))
def test_as_ids_keeps_every_python_int_exactly(ids: list[int]) -> None:
    """Includes lists mixing ids >= 2**63 with small ones, which numpy would make float64."""
    for given_ids in (ids, tuple(ids)):
        out = as_ids(given_ids)
        assert out.dtype == np.uint64
        assert out.tolist() == ids


@pytest.mark.parametrize("dtype", ["u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", ">u8", ">i4"])
def test_as_ids_accepts_every_integer_dtype(dtype: str) -> None:
    info = np.iinfo(np.dtype(dtype))
    values = [0, 1, int(info.max)]
    out = as_ids(np.array(values, dtype=dtype))
    assert out.dtype == np.uint64
    assert out.tolist() == values


def test_as_ids_accepts_one_int() -> None:
    assert as_ids(7).tolist() == [7]
    assert as_ids(np.uint64(U64_MAX)).tolist() == [U64_MAX]


def test_as_ids_allow_empty_returns_an_empty_uint64_array() -> None:
    out = as_ids([], allow_empty=True)
    assert out.dtype == np.uint64
    assert out.shape == (0,)


@pytest.mark.parametrize(
    "bad",
    [
        [-1],
        [3, -5, 7],
        np.array([1, -2], dtype=np.int64),
        -1,
        [2**64],
        [-1, 2**63],
        [1.0, 2.0],
        [1, 2.5],
        np.array([1.0, 2.0]),
        np.array([1, 2], dtype=np.float16),
        ["1", "2"],
        "12",
        [b"1"],
        [True, False],
        np.array([True]),
        True,
        [[1, 2], [3, 4]],
        np.zeros((2, 2), dtype=np.uint64),
        [1, [2, 3]],
        [],
        np.array([], dtype=np.uint64),
        None,
        [None],
        np.array([1 + 2j]),
    ],
    ids=repr,
)
def test_as_ids_rejects_what_is_not_a_flat_batch_of_unsigned_ints(bad: Any) -> None:
    with pytest.raises(ClientError) as info:
        as_ids(bad)
    assert info.value.field == "ids"
    assert info.value.message.startswith("ids:")


@pytest.mark.parametrize("make", [lambda n: np.zeros(n, dtype=np.uint64), lambda n: [0] * n])
def test_as_ids_limits_the_batch_size(make: Any) -> None:
    assert len(as_ids(make(MAX_BATCH_KEYS))) == MAX_BATCH_KEYS
    with pytest.raises(ClientError) as info:
        as_ids(make(MAX_BATCH_KEYS + 1))
    assert info.value.field == "ids"
    assert str(MAX_BATCH_KEYS) in info.value.message
    assert str(MAX_BATCH_KEYS + 1) in info.value.message


@given(ids=hnp.arrays(np.uint64, st.integers(min_value=1, max_value=300), elements=uint64s))
def test_pack_ids_round_trips(ids: np.ndarray) -> None:
    buf = pack_ids(ids)
    assert isinstance(buf, bytes)
    assert len(buf) == 8 * len(ids)
    assert buf == b"".join(int(i).to_bytes(8, "little") for i in ids)  # independent encoding
    out = unpack_ids(buf)
    assert out.dtype == np.uint64
    np.testing.assert_array_equal(out, ids)


@pytest.mark.parametrize("size", [0, 1, 7, 9, 8 * (MAX_BATCH_KEYS + 1)])
def test_unpack_ids_rejects_bad_buffers(size: int) -> None:
    with pytest.raises(ClientError) as info:
        unpack_ids(b"\x00" * size)
    assert info.value.field == "ids"


# ---- vectors ----


@given(
    dtype=st.sampled_from([pb.FLOAT32, pb.FLOAT16]),
    given_dtype=st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i4", "<u2"]),
    count=st.integers(min_value=1, max_value=20),
    dim=st.integers(min_value=1, max_value=16),
    data=st.data(),
)
def test_check_vectors_converts_to_the_stored_dtype(
    dtype: pb.DType.ValueType, given_dtype: str, count: int, dim: int, data: st.DataObject
) -> None:
    elements = st.integers(min_value=0, max_value=1000) if given_dtype[1] in "iu" else st.floats(-1000, 1000, width=16)
    values = data.draw(hnp.arrays(np.dtype(given_dtype), (count, dim), elements=elements))
    out = check_vectors(schema(dim, dtype), values, count)
    stored = np.dtype("<f4") if dtype == pb.FLOAT32 else np.dtype("<f2")
    assert out.dtype == stored
    assert out.shape == (count, dim)
    np.testing.assert_array_equal(out, values.astype(stored))


def test_check_vectors_accepts_one_flat_row_for_one_id() -> None:
    out = check_vectors(schema(3), [1.0, 2.0, 3.0], 1)
    assert out.shape == (1, 3)
    assert out.tolist() == [[1.0, 2.0, 3.0]]


def test_check_vectors_names_the_table_and_both_dims() -> None:
    with pytest.raises(ClientError) as info:
        check_vectors(schema(64), np.zeros((2, 63), dtype=np.float32), 2)
    assert "table 'items': dim 63 != 64" in info.value.message
    assert info.value.field == "vectors"


@pytest.mark.parametrize("rows,count", [(3, 2), (1, 2), (2, 1), (0, 1)])
def test_check_vectors_rejects_a_count_mismatch(rows: int, count: int) -> None:
    with pytest.raises(ClientError) as info:
        check_vectors(schema(4), np.zeros((rows, 4), dtype=np.float32), count)
    assert info.value.field == "vectors"
    assert f"{rows} rows for {count} ids" in info.value.message


@pytest.mark.parametrize(
    "values",
    [
        np.zeros((2, 2, 4), dtype=np.float32),
        np.zeros(4, dtype=np.float32),  # 1-D is only for one id
        np.zeros((2, 4), dtype=np.bool_),
        np.zeros((2, 4), dtype=np.complex64),
        [["a"] * 4] * 2,
        [[1.0] * 4, [1.0] * 3],
    ],
    ids=["3-D", "1-D", "bool", "complex", "str", "ragged"],
)
def test_check_vectors_rejects_bad_shapes_and_dtypes(values: Any) -> None:
    with pytest.raises(ClientError) as info:
        check_vectors(schema(4), values, 2)
    assert info.value.field == "vectors"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [pb.FLOAT32, pb.FLOAT16])
def test_check_vectors_rejects_nonfinite_unless_allowed(bad: float, dtype: pb.DType.ValueType) -> None:
    values = np.ones((3, 4), dtype=np.float32)
    values[1, 2] = bad
    with pytest.raises(ClientError) as info:
        check_vectors(schema(4, dtype), values, 3)
    assert "row 1" in info.value.message
    out = check_vectors(schema(4, dtype, allow_nonfinite=True), values, 3)
    np.testing.assert_array_equal(out, values.astype(out.dtype))  # NaN compares equal here


@pytest.mark.parametrize(
    "dtype,value",
    [(pb.FLOAT16, 70_000.0), (pb.FLOAT16, -1e5), (pb.FLOAT32, 1e39), (pb.FLOAT16, np.iinfo(np.int64).max)],
)
def test_check_vectors_rejects_values_the_stored_dtype_cannot_hold(dtype: pb.DType.ValueType, value: float) -> None:
    values = np.zeros((2, 4), dtype=np.float64 if isinstance(value, float) else np.int64)
    values[1, 3] = value
    with pytest.raises(ClientError) as info:
        check_vectors(schema(4, dtype), values, 2)
    assert info.value.field == "vectors"
    assert "range" in info.value.message


def test_check_vectors_limits_the_payload_bytes() -> None:
    count = MAX_BATCH_BYTES // (4 * MAX_DIM) + 1
    values = np.broadcast_to(np.float32(0), (count, MAX_DIM))  # no memory behind it
    with pytest.raises(ClientError) as info:
        check_vectors(schema(MAX_DIM), values, count)
    assert str(MAX_BATCH_BYTES) in info.value.message


@given(
    table_dtype=st.sampled_from([pb.FLOAT32, pb.FLOAT16]),
    wire_dtype=st.sampled_from([pb.FLOAT32, pb.FLOAT16]),
    count=st.integers(min_value=0, max_value=20),
    dim=st.integers(min_value=1, max_value=16),
    data=st.data(),
)
def test_decode_vectors_round_trips(
    table_dtype: pb.DType.ValueType, wire_dtype: int, count: int, dim: int, data: st.DataObject
) -> None:
    wire = np.dtype("<f4") if wire_dtype == pb.FLOAT32 else np.dtype("<f2")
    rows = data.draw(hnp.arrays(wire, (count, dim), elements=st.floats(-60_000, 60_000, width=16)))
    out = decode_vectors(schema(dim, table_dtype), rows.tobytes(), wire_dtype, count)
    assert out.shape == (count, dim)
    np.testing.assert_array_equal(out, rows.astype(out.dtype))


def test_decode_vectors_rejects_a_wrong_length_or_dtype() -> None:
    buf = np.zeros((2, 4), dtype="<f4").tobytes()
    with pytest.raises(ClientError, match="expected 32"):
        decode_vectors(schema(4), buf[:-1], pb.FLOAT32, 2)
    with pytest.raises(ClientError, match="expected 16"):
        decode_vectors(schema(4), buf, pb.FLOAT16, 2)  # 32 bytes of float16 would be 4 ids
    with pytest.raises(ClientError) as info:
        decode_vectors(schema(4), buf, 99, 2)
    assert info.value.field == "dtype"


def test_default_row_is_zeros_or_the_declared_default() -> None:
    table = schema(3)
    np.testing.assert_array_equal(default_row(table), np.zeros(3, dtype=np.float32))
    table.default_vector = np.array([1.5, -2.0, 3.25], dtype="<f4").tobytes()
    assert default_row(table).tolist() == [1.5, -2.0, 3.25]


# ---- records ----

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=U64_MAX)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
records = st.dictionaries(st.text(max_size=12), values, max_size=6)


@given(recs=st.lists(records, min_size=0, max_size=8))
def test_pack_records_round_trips(recs: list[dict[str, Any]]) -> None:
    packed = pack_records(recs, len(recs))
    assert len(packed) == len(recs)
    check_records(packed)
    assert [unpack_record(raw) for raw in packed] == recs


def test_pack_records_rejects_a_count_mismatch_and_non_mappings() -> None:
    with pytest.raises(ClientError, match="2 records for 3 ids"):
        pack_records([{}, {}], 3)
    not_mappings: list[Any] = [[1, 2], "ab", None, [("a", 1)]]
    for bad in not_mappings:
        with pytest.raises(ClientError, match="item 1") as info:
            pack_records([{"ok": 1}, bad], 2)
        assert info.value.field == "records"


def test_pack_records_rejects_unencodable_values() -> None:
    for bad in ({"a": object()}, {"a": 2**64}, {"a": {1j: 2}}):
        with pytest.raises(ClientError, match="item 0 cannot be encoded"):
            pack_records([bad], 1)


def test_records_over_the_size_limit_are_rejected() -> None:
    small = pack_records([{"blob": b"x" * (MAX_RECORD_BYTES - 64)}], 1)[0]
    assert len(small) <= MAX_RECORD_BYTES
    with pytest.raises(ClientError) as info:
        pack_records([{"blob": b"x" * MAX_RECORD_BYTES}], 1)
    assert str(MAX_RECORD_BYTES) in info.value.message
    batch = [small] * (MAX_BATCH_BYTES // len(small) + 1)  # one object, many references
    with pytest.raises(ClientError) as info:
        check_records(batch)
    assert str(MAX_BATCH_BYTES) in info.value.message


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"\x81",
        msgpack.packb({"a": 1}) + b"\x00",
        msgpack.packb([1, 2]),
        msgpack.packb(3),
        msgpack.packb("s"),
    ],
    ids=["empty", "reserved-byte", "truncated", "trailing", "array", "int", "str"],
)
def test_check_records_rejects_what_is_not_one_msgpack_map(raw: bytes) -> None:
    good = msgpack.packb({"a": 1})
    with pytest.raises(ClientError, match="item 1") as info:
        check_records([good, raw])
    assert info.value.field == "records"


# ---- names, dims, dtypes ----


@given(name=st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=128))
def test_check_table_name_accepts_valid_names(name: str) -> None:
    assert check_table_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "a/b", "é", "x" * 129, None, 5])
def test_check_table_name_rejects_invalid_names(name: Any) -> None:
    with pytest.raises(ClientError) as info:
        check_table_name(name)
    assert info.value.field == "table"


def test_check_dim_and_dtype_code() -> None:
    assert check_dim(1) == 1
    numpy_dim: Any = np.int32(MAX_DIM)
    assert check_dim(numpy_dim) == MAX_DIM
    not_dims: list[Any] = [0, -1, MAX_DIM + 1, True, 4.0, "4"]
    for bad in not_dims:
        with pytest.raises(ClientError, match=str(MAX_DIM)):
            check_dim(bad)
    assert {dtype_code("float32"), dtype_code("float16")} == {pb.FLOAT32, pb.FLOAT16}
    with pytest.raises(ClientError) as info:
        dtype_code("float64")
    assert info.value.field == "dtype"
