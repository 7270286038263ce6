"""Fixtures that start real node processes on 127.0.0.1 and always stop them."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

import pytest

from kvclient import Client
from kvstore.launcher import LocalCluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    cluster = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and isinstance(cluster, LocalCluster):
        for node in cluster.nodes:
            try:
                with open(node.log_path, errors="replace") as f:
                    tail = "".join(f.readlines()[-40:])
            except OSError:
                tail = "(no log)"
            report.sections.append((f"node {node.node_id} log (tail)", tail))
    return report


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One 3-node cluster shared by a test module (tests use their own table names)."""
    cluster = LocalCluster.open(str(tmp_path_factory.mktemp("cluster")))
    try:
        cluster.up(3, partitions=16, replicas=1, cache_bytes="32MiB")
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def cluster(shared_cluster: LocalCluster) -> LocalCluster:
    return shared_cluster


@pytest.fixture
def kv(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.seeds, deadline_s=10.0) as client:
        yield client
