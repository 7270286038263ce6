"""Validate and pack what travels on the wire: ids, embedding rows, feature records.

Pure functions. Every check raises `ClientError` naming the field, the value and the limit;
the node runs the same checks on receipt, so a request that passes here is never rejected
there for shape reasons and a hand-made request is still checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from kvclient._errors import ClientError
from kvclient._limits import (
    MAX_BATCH_BYTES,
    MAX_BATCH_KEYS,
    MAX_DIM,
    MAX_RECORD_BYTES,
    MAX_TABLE_NAME_CHARS,
)
from kvclient._proto import kvstore_pb2 as pb

IdArray = npt.NDArray[np.uint64]
WIRE_ID_DTYPE = np.dtype("<u8")
NUMPY_DTYPES: dict[int, np.dtype[Any]] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
}
DTYPE_NAMES: dict[str, pb.DType.ValueType] = {"float32": pb.FLOAT32, "float16": pb.FLOAT16}
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def check_table_name(name: str) -> str:
    """Return `name` if it is a valid table name, else raise `ClientError`."""
    if not isinstance(name, str) or not name:
        raise ClientError(f"table: name must be a non-empty string, got {name!r}", field="table")
    if len(name) > MAX_TABLE_NAME_CHARS or not _TABLE_NAME.fullmatch(name):
        raise ClientError(
            f"table: name {name!r} must be 1..{MAX_TABLE_NAME_CHARS} characters of letters, digits, '_', '.', '-'",
            field="table",
        )
    return name


def check_dim(dim: int) -> int:
    """Return `dim` if it is a valid embedding dimension."""
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or not 1 <= dim <= MAX_DIM:
        raise ClientError(f"dim: {dim!r} is not an integer in 1..{MAX_DIM}", field="dim")
    return int(dim)


def dtype_code(name: str) -> pb.DType.ValueType:
    """Map a dtype name ('float32', 'float16') to its wire code."""
    try:
        return DTYPE_NAMES[str(name)]
    except KeyError:
        raise ClientError(f"dtype: {name!r} is not one of {sorted(DTYPE_NAMES)}", field="dtype") from None


def as_ids(ids: Any, *, allow_empty: bool = False) -> IdArray:
    """Return `ids` as a 1-D uint64 array, or raise `ClientError`.

    Accepts integer numpy arrays, lists/tuples of Python ints, or one int. Negative values
    and non-integer dtypes (floats, strings, bools) are refused rather than cast.
    """
    arr = _id_array(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ClientError(f"ids: expected a 1-D array, got shape {arr.shape}", field="ids")
    if arr.size == 0:
        if allow_empty:
            return np.empty(0, dtype=np.uint64)
        raise ClientError("ids: batch is empty; send at least 1 id", field="ids")
    if arr.size > MAX_BATCH_KEYS:
        raise ClientError(f"ids: batch of {arr.size} keys exceeds the limit of {MAX_BATCH_KEYS}", field="ids")
    if arr.dtype.kind == "u":
        return arr.astype(np.uint64, copy=False)
    if arr.dtype.kind == "i":
        if (arr < 0).any():
            raise ClientError(f"ids: negative id {int(arr.min())}; ids are unsigned 64-bit", field="ids")
        return arr.astype(np.uint64)
    if arr.dtype == object:
        return _ids_from_objects(arr)
    raise ClientError(f"ids: dtype {arr.dtype} is not an integer type", field="ids")


def _id_array(ids: Any) -> npt.NDArray[Any]:
    if isinstance(ids, np.ndarray):
        return ids
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError, OverflowError):  # ragged nesting and the like
        raise ClientError("ids: expected a flat sequence of integers", field="ids") from None
    if arr.dtype.kind == "f" and isinstance(ids, list | tuple):
        # numpy makes ints >= 2**63 mixed with smaller ones float64: check them one by one.
        return np.array(ids, dtype=object)
    return arr


def _ids_from_objects(arr: npt.NDArray[Any]) -> IdArray:
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in arr):
        raise ClientError("ids: every id must be an integer", field="ids")
    if any(v < 0 or v >= 2**64 for v in arr):
        raise ClientError("ids: ids must be in 0..2**64-1", field="ids")
    return np.array([int(v) for v in arr], dtype=np.uint64)


def pack_ids(ids: IdArray) -> bytes:
    """Pack ids into the wire's little-endian uint64 buffer."""
    return ids.astype(WIRE_ID_DTYPE, copy=False).tobytes()


def unpack_ids(buf: bytes) -> IdArray:
    """Decode and check a wire id buffer (node side)."""
    if len(buf) % 8:
        raise ClientError(f"ids: buffer of {len(buf)} bytes is not a multiple of 8", field="ids")
    ids = np.frombuffer(buf, dtype=WIRE_ID_DTYPE)
    if ids.size == 0:
        raise ClientError("ids: batch is empty; send at least 1 id", field="ids")
    if ids.size > MAX_BATCH_KEYS:
        raise ClientError(f"ids: batch of {ids.size} keys exceeds the limit of {MAX_BATCH_KEYS}", field="ids")
    return ids.astype(np.uint64, copy=False)


def check_vectors(table: pb.TableSchema, values: Any, count: int) -> npt.NDArray[np.floating[Any]]:
    """Return `values` as a (count, dim) array in the table's stored dtype, or raise."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError):  # ragged rows and the like
        raise ClientError(f"vectors: expected a 2-D array (ids x {table.dim})", field="vectors") from None
    if arr.dtype.kind not in "fiu":
        raise ClientError(f"vectors: dtype {arr.dtype} is not numeric", field="vectors")
    if arr.ndim == 1 and count == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ClientError(
            f"vectors: expected a 2-D array (ids x {table.dim}), got shape {arr.shape}",
            field="vectors",
        )
    if arr.shape[0] != count:
        raise ClientError(f"vectors: {arr.shape[0]} rows for {count} ids; counts must match", field="vectors")
    if arr.shape[1] != table.dim:
        raise ClientError(f"table {table.name!r}: dim {arr.shape[1]} != {table.dim}", field="vectors")
    stored = NUMPY_DTYPES[table.dtype]
    if arr.nbytes > MAX_BATCH_BYTES:
        raise ClientError(f"vectors: {arr.nbytes} bytes exceeds the limit of {MAX_BATCH_BYTES}", field="vectors")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(stored, copy=False)
    if not table.allow_nonfinite:
        _check_finite(table, arr, out)
    return out


def _check_finite(table: pb.TableSchema, given: npt.NDArray[Any], stored: npt.NDArray[Any]) -> None:
    if given.dtype.kind == "f" and not np.isfinite(given).all():
        row = int(np.nonzero(~np.isfinite(given).all(axis=1))[0][0])
        raise ClientError(
            f"vectors: row {row} holds NaN or inf; table {table.name!r} forbids them",
            field="vectors",
        )
    if not np.isfinite(stored).all():
        limit = float(np.finfo(stored.dtype).max)
        raise ClientError(
            f"vectors: a value exceeds the {stored.dtype} range of +-{limit:g} of table {table.name!r}",
            field="vectors",
        )


def decode_vectors(table: pb.TableSchema, buf: bytes, dtype: int, count: int) -> npt.NDArray[Any]:
    """Decode and check a wire vector buffer into stored dtype (node side)."""
    if dtype not in NUMPY_DTYPES:
        raise ClientError(f"dtype: wire dtype {dtype} is not float32 or float16", field="dtype")
    src = NUMPY_DTYPES[dtype]
    expected = count * table.dim * src.itemsize
    if len(buf) != expected:
        raise ClientError(
            f"vectors: {len(buf)} bytes for {count} ids of table {table.name!r} "
            f"(dim {table.dim}, {src.name}); expected {expected}",
            field="vectors",
        )
    return check_vectors(table, np.frombuffer(buf, dtype=src).reshape(count, table.dim), count)


def pack_records(records: Sequence[Mapping[str, Any]], count: int) -> list[bytes]:
    """Encode feature records as msgpack maps, or raise `ClientError`."""
    if len(records) != count:
        raise ClientError(f"records: {len(records)} records for {count} ids; counts must match", field="records")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ClientError(f"records: item {i} is {type(rec).__name__}, not a mapping", field="records")
        try:
            out.append(msgpack.packb(dict(rec), use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ClientError(f"records: item {i} cannot be encoded: {exc}", field="records") from None
    check_records(out)
    return out


def check_records(records: Iterable[bytes]) -> None:
    """Check encoded records: each a msgpack map within the size limits (node side too)."""
    total = 0
    for i, raw in enumerate(records):
        total += len(raw)
        if len(raw) > MAX_RECORD_BYTES:
            raise ClientError(
                f"records: item {i} is {len(raw)} bytes; the limit is {MAX_RECORD_BYTES}",
                field="records",
            )
        try:
            value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception:  # msgpack raises several unrelated types for bad input
            raise ClientError(f"records: item {i} is not valid msgpack", field="records") from None
        if not isinstance(value, dict):
            raise ClientError(f"records: item {i} is not a msgpack map", field="records")
    if total > MAX_BATCH_BYTES:
        raise ClientError(f"records: {total} bytes exceeds the limit of {MAX_BATCH_BYTES}", field="records")


def unpack_record(raw: bytes) -> dict[str, Any]:
    """Decode one stored feature record."""
    value: dict[str, Any] = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    return value


def default_row(table: pb.TableSchema) -> npt.NDArray[np.float32]:
    """Return the float32 row a missing key of `table` gets."""
    if table.default_vector:
        return np.frombuffer(table.default_vector, dtype="<f4")
    return np.zeros(table.dim, dtype=np.float32)


def schema_from_args(
    name: str, dim: int | None, dtype: str, kind: str, default: Any, allow_nonfinite: bool
) -> pb.TableSchema:
    """Build a table schema from `create_table` arguments; raise `ClientError` naming a bad one."""
    check_table_name(name)
    if kind == "features":
        if dim is not None or default is not None:
            raise ClientError("features tables take no dim or default", field="dim")
        return pb.TableSchema(name=name, kind=pb.FEATURES)
    if kind != "embedding":
        raise ClientError(f"kind: {kind!r} is not 'embedding' or 'features'", field="kind")
    if dim is None:
        raise ClientError("dim: an embedding table needs a dim", field="dim")
    schema = pb.TableSchema(
        name=name,
        kind=pb.EMBEDDING,
        dim=check_dim(dim),
        dtype=dtype_code(dtype),
        allow_nonfinite=allow_nonfinite,
    )
    schema.default_vector = default_bytes(default, schema.dim)
    return schema


def default_bytes(default: Any, dim: int) -> bytes:
    if default is None or (isinstance(default, str) and default == "zeros"):
        return b""
    if isinstance(default, str) and default == "nan":
        return np.full(dim, np.nan, dtype="<f4").tobytes()
    if isinstance(default, str):
        raise ClientError(f"default: {default!r} is not 'zeros', 'nan' or a vector", field="default")
    row = np.asarray(default, dtype=np.float64)
    if row.shape != (dim,):
        raise ClientError(f"default: shape {row.shape} != ({dim},)", field="default")
    return row.astype("<f4").tobytes()
