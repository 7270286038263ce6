"""pysyncobj's journal interface over our RocksDB-backed `GroupLog`.

Compaction is one atomic range delete and every change goes through the log store's
per-round write batch (see `kvstore.replication.raft_log`).
"""

from __future__ import annotations

from typing import Any

from pysyncobj.journal import Journal

from kvstore.replication.raft_log import GroupLog


class GroupJournal(Journal):
    """pysyncobj's journal interface over a `GroupLog` (RocksDB-backed)."""

    def __init__(self, group_log: GroupLog) -> None:
        self._log = group_log

    def add(self, command: bytes, idx: int, term: int) -> None:
        self._log.add(bytes(command), int(idx), int(term))

    def clear(self) -> None:
        self._log.clear()

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802, N803
        self._log.delete_from(entryFrom)

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802, N803
        self._log.delete_to(entryTo)

    def __getitem__(self, item: Any) -> Any:
        return self._log.entries[item]

    def __len__(self) -> int:
        return len(self._log.entries)

    def _destroy(self) -> None:
        pass

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802, N803
        self._log.set_commit_index(raftCommitIndex)

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return self._log.commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:  # noqa: N802, N803
        self._log.set_term(term, votedForNodeId)

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self._log.term

    def getVotedForNodeId(self) -> str | None:  # noqa: N802
        return self._log.voted_for
