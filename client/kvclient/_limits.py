"""Documented request limits, enforced by the client before sending and by the node on receipt."""

from __future__ import annotations

MAX_BATCH_KEYS = 100_000
"""Most keys in one get/put/delete call."""

MAX_BATCH_BYTES = 64 * 1024 * 1024
"""Largest payload (values or records) of one call, in bytes."""

MAX_DIM = 16_384
"""Largest embedding dimension a table may declare."""

MAX_RECORD_BYTES = 1024 * 1024
"""Largest single feature record, msgpack-encoded."""

MAX_TABLE_NAME_CHARS = 128

GRPC_MESSAGE_BYTES = MAX_BATCH_BYTES + 16 * 1024 * 1024
"""gRPC's own message cap, raised deliberately above our batch limit so that our
limit, with its clear error, is the one a caller meets."""

GRPC_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES),
)
