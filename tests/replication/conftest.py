"""Fixtures for replication tests: node processes that are always stopped, logs shown on failure."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.replication.harness import RaftCluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    raft = getattr(item, "funcargs", {}).get("raft3")
    if report.failed and isinstance(raft, RaftCluster):
        report.sections.append(("replicator logs (tail)", raft.logs()))
    return report


@pytest.fixture
def raft3(tmp_path: object) -> Iterator[RaftCluster]:
    """Three started node processes (no groups yet); every process is stopped afterwards."""
    cluster = RaftCluster(str(tmp_path), 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
