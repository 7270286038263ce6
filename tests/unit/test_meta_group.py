"""The metadata state machine: a compare-and-set chain of maps that every member follows alike."""

from __future__ import annotations

import io
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvclient._proto import kvstore_pb2 as pb
from kvstore.meta_group import OK, STALE, MetaStateMachine, decode_change, encode_change


def cmap(epoch: int, tag: str = "") -> pb.ClusterMap:
    return pb.ClusterMap(cluster_id=f"c{tag}", epoch=epoch, partitions=8, replicas=3)


def collecting() -> tuple[MetaStateMachine, list[int], threading.Event]:
    """A state machine whose adoptions are recorded (they happen on its adopter thread)."""
    sm = MetaStateMachine()
    adopted: list[int] = []
    done = threading.Event()

    def on_commit(m: pb.ClusterMap) -> None:
        adopted.append(int(m.epoch))
        done.set()

    sm.on_commit = on_commit
    return sm, adopted, done


@given(base=st.integers(0, 2**64 - 1), epoch=st.integers(0, 2**64 - 1), name=st.text(max_size=20))
def test_change_round_trips(base: int, epoch: int, name: str) -> None:
    m = pb.ClusterMap(cluster_id=name, epoch=epoch)
    assert decode_change(encode_change(base, m)) == (base, m)


@pytest.mark.parametrize("bad", [b"", b"\x01\x00", b"\x02" + bytes(8)])
def test_bad_command_is_an_error_result_not_a_raise(bad: bytes) -> None:
    sm = MetaStateMachine()
    sm.seed(cmap(1))
    assert sm.apply(0, bad, 1).startswith(b"error:")
    assert sm.map == cmap(1)
    sm.close()


def test_only_a_change_on_the_current_epoch_applies() -> None:
    sm, adopted, _ = collecting()
    sm.seed(cmap(1))
    assert sm.apply(0, encode_change(1, cmap(2, "a")), 1) == OK
    # A racing change computed on epoch 1 as well (e.g. by a deposed leader) loses.
    assert sm.apply(0, encode_change(1, cmap(2, "b")), 2) == STALE
    # A change that skips an epoch is refused too.
    assert sm.apply(0, encode_change(2, cmap(4)), 3) == STALE
    assert sm.map == cmap(2, "a")
    assert sm.applied_index(0) == 3
    sm.close()
    assert adopted == [2]


@given(
    st.lists(st.tuples(st.integers(0, 3), st.sampled_from("abc")), min_size=1, max_size=30),
    st.integers(0, 30),
)
def test_members_seeded_at_different_points_end_alike(log: list[tuple[int, str]], seed_after: int) -> None:
    """A member seeded from a later committed map (a push) ends where one replaying from genesis does.

    Each entry is proposed on a map some epochs behind the committed one (`lag`: a deposed
    or not yet caught-up leader), never ahead of it: a leader holds every committed entry.
    """
    from_genesis = MetaStateMachine()
    from_genesis.seed(cmap(1))
    commands: list[bytes] = []
    committed: list[pb.ClusterMap] = [cmap(1)]
    for index, (lag, tag) in enumerate(log, 1):
        base = max(1, committed[-1].epoch - lag)
        commands.append(encode_change(base, cmap(base + 1, tag)))
        if from_genesis.apply(0, commands[-1], index) == OK:
            assert from_genesis.map is not None
            committed.append(from_genesis.map)
    late = MetaStateMachine()
    late.seed(committed[min(seed_after, len(committed) - 1)])
    for index, command in enumerate(commands, 1):
        late.apply(0, command, index)
    assert late.map == from_genesis.map
    from_genesis.close()
    late.close()


def test_seed_never_moves_back() -> None:
    sm = MetaStateMachine()
    sm.seed(cmap(5))
    sm.seed(cmap(3))
    assert sm.map == cmap(5)
    sm.close()


def test_snapshot_restores_the_map_and_adopts_it() -> None:
    sm = MetaStateMachine()
    sm.seed(cmap(1))
    sm.apply(0, encode_change(1, cmap(2)), 7)
    buf = io.BytesIO()
    assert sm.snapshot(0, buf) == 7
    sm.close()
    other, adopted, done = collecting()
    other.seed(cmap(1))
    other.restore(0, io.BytesIO(buf.getvalue()))
    assert other.map == cmap(2)
    assert other.applied_index(0) == 7  # a later snapshot of this member records the index it holds
    assert done.wait(5)
    other.close()
    assert adopted == [2]
