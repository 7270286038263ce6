"""What reads return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kvclient._proto import kvstore_pb2 as pb

_KIND_NAMES = {pb.EMBEDDING: "embedding", pb.FEATURES: "features"}
_DTYPE_NAMES = {pb.FLOAT32: "float32", pb.FLOAT16: "float16"}


@dataclass(frozen=True)
class GetResult:
    """A multi-get answer in the caller's order.

    `values`: (K, dim) float32, the table default where a key is missing; `found`: bool (K,);
    `status`: uint8 (K,) of `KeyStatus` (FOUND, MISSING, ERROR for partial results).
    """

    values: npt.NDArray[np.float32]
    found: npt.NDArray[np.bool_]
    status: npt.NDArray[np.uint8]


@dataclass(frozen=True)
class FeaturesResult:
    """A feature multi-get answer: one dict per key, None where missing."""

    records: list[dict[str, Any] | None]
    found: npt.NDArray[np.bool_]
    status: npt.NDArray[np.uint8]


@dataclass(frozen=True)
class TableInfo:
    """A table's schema as the caller sees it."""

    name: str
    kind: str
    dim: int
    dtype: str
    default: npt.NDArray[np.float32] | None
    allow_nonfinite: bool

    @classmethod
    def from_proto(cls, schema: pb.TableSchema) -> TableInfo:
        default = np.frombuffer(schema.default_vector, "<f4").copy() if schema.default_vector else None
        return cls(
            name=schema.name,
            kind=_KIND_NAMES.get(schema.kind, "unknown"),
            dim=int(schema.dim),
            dtype=_DTYPE_NAMES.get(schema.dtype, ""),
            default=default,
            allow_nonfinite=schema.allow_nonfinite,
        )
