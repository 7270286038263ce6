"""Node configuration checks: bad settings are refused with the field named."""

from __future__ import annotations

import pytest

from kvstore.config import NodeConfig, parse_bytes


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "node1.internal"])
def test_raft_secret_required_off_loopback(host: str) -> None:
    config = NodeConfig(node_id="n1", data_dir="/tmp/x", host=host, raft_port=7000)
    with pytest.raises(ValueError, match="raft_secret"):
        config.validate()
    assert NodeConfig(node_id="n1", data_dir="/tmp/x", host=host, raft_port=7000, raft_secret=b"s").validate()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_dev_cluster_needs_no_secret(host: str) -> None:
    assert NodeConfig(node_id="n1", data_dir="/tmp/x", host=host, raft_port=7000).validate().raft_secret is None


def test_single_copy_node_needs_no_secret() -> None:
    assert NodeConfig(node_id="n1", data_dir="/tmp/x", host="0.0.0.0").validate().raft_port == 0


@pytest.mark.parametrize(("text", "expected"), [("1048576", 1 << 20), ("512MiB", 512 << 20), ("2G", 2 << 30)])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_names_bad_text() -> None:
    with pytest.raises(ValueError, match="12 parsecs"):
        parse_bytes("12 parsecs")
