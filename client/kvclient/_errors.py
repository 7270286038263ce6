"""The one error tree, shared by client and server, grouped by what the caller should do.

`ClientError` (fix the request; never retried), `RoutingError` (refresh the map and retry
at once), `UnavailableError` (back off, retry within the deadline), `DeadlineExceededError`,
`ServerError`. Classify by class, never by message text.
"""

from __future__ import annotations

from kvclient._proto import kvstore_pb2 as pb


class KvError(Exception):
    """Base of every error kvstore raises."""

    code: pb.ErrorCode.ValueType = pb.INTERNAL

    def __init__(self, message: str, *, field: str = "", epoch: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.epoch = epoch

    def to_proto(self) -> pb.Error:
        """Return the in-band wire form of this error."""
        return pb.Error(code=self.code, message=self.message, field=self.field, epoch=self.epoch)


class ClientError(KvError):
    """The request is wrong; retrying it unchanged cannot succeed."""

    code = pb.INVALID_ARGUMENT


class UnknownTableError(ClientError):
    """The named table does not exist in the cluster map."""

    code = pb.UNKNOWN_TABLE


class RoutingError(KvError):
    """The caller's cluster map is stale: refresh it and retry at once."""

    code = pb.STALE_MAP


class NotLeaderError(RoutingError):
    """A write or leader read reached a replica that does not lead its partition; `leaders` maps partition -> hint.

    A hint of "" means no leader is known yet (an election is running): back off, then retry.
    """

    code = pb.NOT_LEADER

    def __init__(self, message: str, *, field: str = "", epoch: int = 0, leaders: dict[int, str] | None = None) -> None:
        super().__init__(message, field=field, epoch=epoch)
        self.leaders = dict(leaders or {})

    def to_proto(self) -> pb.Error:
        err = super().to_proto()
        err.leaders.extend(pb.PartitionLeader(partition=p, node_id=n) for p, n in sorted(self.leaders.items()))
        return err


class UnavailableError(KvError):
    """A node could not be reached or is overloaded: back off and retry."""

    code = pb.UNAVAILABLE


class DeadlineExceededError(KvError):
    """The caller's deadline passed before every part of the request finished."""

    code = pb.UNAVAILABLE


class ServerError(KvError):
    """The server failed in a way the caller cannot fix."""

    code = pb.INTERNAL


_BY_CODE: dict[pb.ErrorCode.ValueType, type[KvError]] = {
    pb.INVALID_ARGUMENT: ClientError,
    pb.UNKNOWN_TABLE: UnknownTableError,
    pb.STALE_MAP: RoutingError,
    pb.UNAVAILABLE: UnavailableError,
    pb.INTERNAL: ServerError,
    pb.NOT_LEADER: NotLeaderError,
}


def error_from_proto(err: pb.Error) -> KvError:
    """Rebuild the error class a server sent in-band."""
    if err.code == pb.NOT_LEADER:
        leaders = {int(h.partition): h.node_id for h in err.leaders}
        return NotLeaderError(err.message, field=err.field, epoch=err.epoch, leaders=leaders)
    cls = _BY_CODE.get(err.code, ServerError)
    return cls(err.message, field=err.field, epoch=err.epoch)
