"""The versioned command format: round trips and refusal of malformed input."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.replication.command import VERSION, Command, CommandError, decode, encode, merge_puts

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


def _apply(model: dict[tuple[int, int, int], bytes], command: Command) -> None:
    """What a replica does with a command: its puts in order (a later id wins), then its deletes."""
    ids = [int.from_bytes(command.ids[i : i + 8], "little") for i in range(0, len(command.ids), 8)]
    width = command.row_bytes
    for n, key in enumerate(ids):
        value = (
            command.records[n] if command.records is not None else (command.values or b"")[n * width : (n + 1) * width]
        )
        model[(command.partition, command.table_id, key)] = value
    for i in range(0, len(command.deletes), 8):
        model.pop((command.partition, command.table_id, int.from_bytes(command.deletes[i : i + 8], "little")), None)


small_ids = st.lists(st.integers(0, 6), max_size=6).map(lambda xs: b"".join(x.to_bytes(8, "little") for x in xs))


@st.composite
def put_runs(draw: st.DrawFn) -> list[Command]:
    """Puts to one table of one partition (ids often repeated across commands), sometimes one with deletes."""
    width, kind = draw(st.integers(1, 4)), draw(st.sampled_from(["values", "records"]))
    out = []
    for _ in range(draw(st.integers(2, 5))):
        ids = draw(small_ids)
        n = len(ids) // 8
        values = draw(st.binary(min_size=width * n, max_size=width * n)) if kind == "values" and n else None
        records = tuple(draw(st.lists(st.binary(max_size=8), min_size=n, max_size=n))) if kind == "records" else None
        deletes = draw(small_ids) if draw(st.integers(0, 9)) == 0 else b""
        out.append(Command(3, 7, ids, values, records if n else None, deletes))
    return out


@given(put_runs())
def test_merged_puts_do_what_the_commands_do_in_order(run: list[Command]) -> None:
    merged = merge_puts([encode(c) for c in run])
    if any(c.deletes for c in run):
        assert merged is None  # a delete then a put of the same id would not survive a merge
        return
    assert merged is not None
    one: dict[tuple[int, int, int], bytes] = {}
    each: dict[tuple[int, int, int], bytes] = {}
    _apply(one, decode(merged))
    for command in run:
        _apply(each, command)
    assert one == each


def test_commands_of_different_tables_or_shapes_are_not_merged() -> None:
    one_id = (5).to_bytes(8, "little")
    a = encode(Command(3, 7, one_id, b"abcd"))
    assert merge_puts([a]) is None
    assert merge_puts([a, encode(Command(3, 8, one_id, b"abcd"))]) is None  # another table
    assert merge_puts([a, encode(Command(3, 7, one_id, b"ab"))]) is None  # another row width
    assert merge_puts([a, encode(Command(3, 7, one_id, records=(b"r",)))]) is None  # records and rows
    assert merge_puts([a, b"\x09garbage"]) is None
