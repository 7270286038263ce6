"""Pure pieces of the proposal path: `when_all` and the deadline heap."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.replication import ProposalTimeoutError, ReplicationError, when_all
from kvstore.replication.proposals import Deadlines, settle


@given(st.permutations(range(6)), st.sets(st.integers(0, 5)))
def test_when_all_completes_exactly_when_the_last_future_does(order: list[int], failing: set[int]) -> None:
    futures: list[Future[int]] = [Future() for _ in range(6)]
    combined = when_all(futures)
    for step, i in enumerate(order):
        assert not combined.done()
        if i in failing:
            futures[i].set_exception(RuntimeError(i))
        else:
            futures[i].set_result(i)
        assert combined.done() == (step == len(order) - 1)
    assert combined.result(0) is None  # never fails: the caller reads each future


def test_when_all_of_nothing_is_done() -> None:
    assert when_all([]).done()


def test_when_all_from_many_threads() -> None:
    futures: list[Future[int]] = [Future() for _ in range(400)]
    combined = when_all(futures)
    threads = [threading.Thread(target=lambda chunk=futures[i::8]: [f.set_result(1) for f in chunk]) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert combined.result(5) is None


def test_a_cancelled_waiter_does_not_break_the_last_completion() -> None:
    future: Future[int] = Future()
    combined = when_all([future])
    assert combined.cancel()
    future.set_result(1)  # would raise InvalidStateError inside the callback if unguarded
    assert combined.cancelled()


def test_deadlines_fail_only_open_futures_past_their_deadline() -> None:
    deadlines = Deadlines()
    late: Future[bytes | None] = Future()
    answered: Future[bytes | None] = Future()
    pending: Future[bytes | None] = Future()
    deadlines.track(late, 3, 1.0)
    deadlines.track(answered, 3, 1.0)
    deadlines.track(pending, 4, 5.0)
    settle(answered, b"ok")
    assert deadlines.expire(1.0) == 1
    with pytest.raises(ProposalTimeoutError, match="partition 3"):
        late.result(0)
    assert answered.result(0) == b"ok"
    assert not pending.done() and len(deadlines) == 1
    settle(late, b"a late outcome is ignored")
    with pytest.raises(ProposalTimeoutError):
        late.result(0)
    deadlines.fail_all("closing")
    with pytest.raises(ReplicationError, match="partition 4: closing"):
        pending.result(0)
