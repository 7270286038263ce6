"""The operator's CLI, run as a user would: separate processes against a detached cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.launcher import LocalCluster
from tests.conftest import wait_until


def kvstore(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvstore {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[str]:
    root = str(tmp_path / "cli")
    try:
        yield root
    finally:
        LocalCluster.open(root).down()


def test_operator_session(cluster_dir: str, tmp_path: Path) -> None:
    up = kvstore("cluster", "up", "--nodes", "3", "--dir", cluster_dir, "--partitions", "8", "--detach")
    assert "seeds" in up.stdout
    again = kvstore("cluster", "up", "--nodes", "3", "--dir", cluster_dir, "--detach", check=False)
    assert again.returncode == 2 and "already running" in again.stdout

    kvstore("table", "create", "items", "--dim", "8", "--dir", cluster_dir)
    kvstore("table", "create", "profiles", "--kind", "features", "--dir", cluster_dir)
    tables = json.loads(kvstore("table", "list", "--json", "--dir", cluster_dir).stdout)
    assert {(t["name"], t["kind"], t["dim"]) for t in tables} == {
        ("items", "embedding", 8),
        ("profiles", "features", 0),
    }

    ids = np.arange(2500, dtype=np.int64)
    vectors = np.random.default_rng(1).standard_normal((2500, 8)).astype(np.float32)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "vectors.npy", vectors)
    kvstore(
        "load",
        "items",
        "--ids",
        str(tmp_path / "ids.npy"),
        "--vectors",
        str(tmp_path / "vectors.npy"),
        "--batch-size",
        "1000",
        "--dir",
        cluster_dir,
    )

    rows = json.loads(kvstore("get", "items", "7", "2499", "9999", "--json", "--dir", cluster_dir).stdout)
    assert [r["found"] for r in rows] == [True, True, False]
    np.testing.assert_array_equal(np.array(rows[0]["vector"], dtype=np.float32), vectors[7])

    def status() -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(kvstore("status", "--json", "--dir", cluster_dir).stdout)
        return doc

    # A put returns once a majority applied it: the third replica may apply it a round later.
    wait_until(lambda: sum(n["keys_written"] for n in status()["nodes"]) == 2500 * 3, what="every replica's writes")
    doc = status()
    assert doc["replicas"] == 3  # the default with 3 nodes
    assert [n["state"] for n in doc["nodes"]] == ["up", "up", "up"]
    assert sum(n["partitions"] for n in doc["nodes"]) == 8 * 3
    human = kvstore("status", "--dir", cluster_dir).stdout
    assert "items" in human and "metadata group" in human

    # Writes do not fill node caches; `table warm` reads every replica's rows of the table into
    # them (the two rows read above are cached already on the replica that answered, and on
    # any the read was hedged to; 9999 does not exist).
    warmed = kvstore("table", "warm", "items", "--dir", cluster_dir).stdout
    cached = sum(int(m.replace(",", "")) for m in re.findall(r"([\d,]+) rows cached", warmed))
    assert 2500 * 3 - 2 * 3 <= cached <= 2500 * 3 - 2, warmed
    assert kvstore("table", "warm", "nope", "--dir", cluster_dir, check=False).returncode == 2

    bad = kvstore("table", "create", "broken", "--dim", "0", "--dir", cluster_dir, check=False)
    assert bad.returncode == 2 and "dim" in bad.stdout

    kvstore("table", "drop", "items", "--dir", cluster_dir)
    assert [t["name"] for t in json.loads(kvstore("table", "list", "--json", "--dir", cluster_dir).stdout)] == [
        "profiles"
    ]

    down = kvstore("cluster", "down", "--dir", cluster_dir)
    assert "stopped 3 node(s)" in down.stdout
    assert LocalCluster.open(cluster_dir).running() == []


def test_commands_without_a_cluster_explain_what_to_do(tmp_path: Path) -> None:
    proc = kvstore("status", "--dir", str(tmp_path / "none"), check=False)
    assert proc.returncode == 2 and "cluster up" in proc.stdout
