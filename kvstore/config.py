"""Node configuration."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

_NODE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """Parse '256MiB', '1g', '1048576' into bytes; raises ValueError naming the text."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1048576, 512MiB, 2G)")
    unit = (match.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(match.group(1)) * _UNITS[unit])


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node process needs to start."""

    node_id: str
    data_dir: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: reuse the last port from data_dir, else let the OS choose
    cache_bytes: int = 256 * 1024 * 1024
    block_cache_bytes: int = 256 * 1024 * 1024
    map_sync_interval_s: float = 1.0
    raft_port: int = 0  # > 0: run the Raft replicator on this fixed port (clusters with replicas > 1)
    raft_secret: bytes | None = None  # shared cluster secret authenticating Raft peers; None: none (loopback dev)
    raft_synced: bool = False  # fsync the Raft log on every append: acknowledged writes survive power loss

    def validate(self) -> NodeConfig:
        """Return self, or raise ValueError naming the bad field."""
        if not _NODE_ID.fullmatch(self.node_id):
            raise ValueError(f"node_id: {self.node_id!r} must be 1..64 of letters, digits, '_', '.', '-'")
        if not self.data_dir:
            raise ValueError("data_dir: required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not in 0..65535")
        if self.cache_bytes < 0 or self.block_cache_bytes < 1 << 20:
            raise ValueError(
                f"cache_bytes {self.cache_bytes} must be >= 0 and block_cache_bytes {self.block_cache_bytes} >= 1 MiB"
            )
        if not 0 <= self.raft_port <= 65535:
            raise ValueError(f"raft_port: {self.raft_port} is not in 0..65535")
        if self.raft_port and not self.raft_secret and not _is_loopback(self.host):
            raise ValueError(
                f"raft_secret: required when the node listens on {self.host}, not loopback "
                "(set $KVSTORE_RAFT_SECRET or $KVSTORE_RAFT_SECRET_FILE)"
            )
        if self.map_sync_interval_s <= 0:
            raise ValueError(f"map_sync_interval_s: {self.map_sync_interval_s} must be > 0")
        return self

    @property
    def db_path(self) -> str:
        return os.path.join(self.data_dir, "db")

    @property
    def map_path(self) -> str:
        return os.path.join(self.data_dir, "cluster_map.pb")

    @property
    def raft_dir(self) -> str:
        return os.path.join(self.data_dir, "raft")

    @property
    def info_path(self) -> str:
        return os.path.join(self.data_dir, "node.json")
