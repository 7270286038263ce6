"""Settings of a node's replication engine, checked before anything starts."""

from __future__ import annotations

from dataclasses import dataclass

_LOOPBACK_PREFIXES = ("127.", "localhost")


class ConfigError(ValueError):
    """A replication setting is invalid."""


@dataclass(frozen=True)
class PySyncObjConfig:
    """Settings of a node's replication engine. Times in seconds."""

    data_dir: str
    bind_host: str = "127.0.0.1"
    port: int = 0
    secret: bytes | None = None
    synced: bool = False
    election_timeout_s: tuple[float, float] = (1.0, 2.0)
    heartbeat_s: float = 0.25
    tick_s: float = 0.1
    leader_fallback_s: float = 2.0
    reconnect_s: float = 0.5
    log_compaction_min_entries: int = 1000
    log_compaction_min_time_s: float = 300.0
    log_compaction_max_bytes: int = 16 * 1024 * 1024
    append_batch_bytes: int = 512 * 1024
    max_command_bytes: int = 448 * 1024
    snapshot_chunk_bytes: int = 256 * 1024
    compress_min_bytes: int | None = None
    balance_leaders: bool = True
    balance_interval_s: float = 3.0

    @property
    def read_lease_s(self) -> float:
        """How recently a majority must have answered a leader for it to serve leader reads.

        Below the minimum election timeout: when a leader is cut off, its lease runs out
        before the others can even start an election.
        """
        return 0.8 * self.election_timeout_s[0]

    def validate(self) -> None:
        """Raise ConfigError naming the setting that is out of range."""
        low, high = self.election_timeout_s
        if not 0 < low < high:
            raise ConfigError(f"election_timeout_s {self.election_timeout_s}: need 0 < min < max")
        if not 0 < self.heartbeat_s * 3 < low:
            raise ConfigError(f"heartbeat_s {self.heartbeat_s}: must be below election min / 3 ({low / 3:.3f})")
        if not self.heartbeat_s < self.leader_fallback_s:
            raise ConfigError(f"leader_fallback_s {self.leader_fallback_s} must exceed heartbeat_s {self.heartbeat_s}")
        if not 0 < self.tick_s <= self.heartbeat_s:
            raise ConfigError(f"tick_s {self.tick_s} must be in (0, heartbeat_s]")
        if not 0 < self.max_command_bytes < self.append_batch_bytes - 1024:
            # pysyncobj's path for one entry >= the batch size chunks it with an off-by-one
            # ('finish' is decided against the command length, not the pickled length).
            raise ConfigError(f"max_command_bytes {self.max_command_bytes} must be < append_batch_bytes - 1 KiB")
        if self.log_compaction_min_entries < 2:
            raise ConfigError("log_compaction_min_entries must be >= 2")
        if self.secret is None and not self.bind_host.startswith(_LOOPBACK_PREFIXES):
            raise ConfigError(f"bind_host {self.bind_host}: a cluster secret is required off loopback")
