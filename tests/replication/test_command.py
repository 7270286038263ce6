"""The versioned command format: round trips and refusal of malformed input."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.replication.command import VERSION, Command, CommandError, decode, encode

u32 = st.integers(0, 2**32 - 1)
packed_ids = st.lists(st.integers(0, 2**64 - 1), max_size=20).map(
    lambda xs: b"".join(x.to_bytes(8, "little") for x in xs)
)


@st.composite
def commands(draw: st.DrawFn) -> Command:
    ids = draw(packed_ids)
    n = len(ids) // 8
    kind = draw(st.sampled_from(["values", "records"]))
    values = records = None
    if n and kind == "values":
        values = draw(st.binary(min_size=1, max_size=16)) * n
    elif n:
        records = tuple(draw(st.lists(st.binary(max_size=30), min_size=n, max_size=n)))
    return Command(draw(u32), draw(u32), ids, values, records, draw(packed_ids))


@given(commands())
def test_round_trip(command: Command) -> None:
    data = encode(command)
    assert data[0] == VERSION
    assert decode(data) == command


@given(st.binary(max_size=64))
def test_decode_never_raises_anything_but_command_error(data: bytes) -> None:
    with contextlib.suppress(CommandError):
        decode(data)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (Command(0, 1, b"\x00" * 7), "multiple of 8"),
        (Command(0, 1, b"\x00" * 8), "without values or records"),
        (Command(0, 1, b"\x00" * 16, values=b"abc"), "equal rows"),
        (Command(0, 1, b"\x00" * 8, records=(b"a", b"b")), "records: 2 != 1"),
        (Command(0, 1, b"\x00" * 8, values=b"a", records=(b"a",)), "both set"),
        (Command(-1, 1), "partition -1"),
    ],
)
def test_inconsistent_commands_are_refused(command: Command, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        encode(command)


def test_unknown_version_is_refused() -> None:
    data = bytes([VERSION + 1]) + msgpack.packb([0, 1, b"", None, None, b""])
    with pytest.raises(CommandError, match="version"):
        decode(data)
