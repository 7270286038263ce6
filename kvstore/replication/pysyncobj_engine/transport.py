"""How a group talks: its poller is the driver's, its messages go through the node's `Mux`.

`GroupTransport` also carries two fixes of pysyncobj behaviour (internals 5 and 6 in the
package docstring): the stale-ack guard and the restore of a received snapshot off the
driver thread.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from pysyncobj.node import TCPNode
from pysyncobj.transport import Transport

from kvstore.replication.driver import Driver

if TYPE_CHECKING:
    from kvstore.replication.pysyncobj_engine.replicator import PySyncObjReplicator

log = logging.getLogger(__name__)

KEEP_NEXT_INDEX_ON_STALE_ACK = True  # the fix in `GroupTransport._deliver_ack`; tests turn it off
ASYNC_RESTORE = True  # `GroupTransport._start_restore`; False restores on the driver thread


class GroupPoller:
    """What a group sees as its poller: subscriptions go to the driver's, `poll` is a no-op."""

    def __init__(self, replicator: PySyncObjReplicator, partition: int) -> None:
        self._replicator = replicator
        self._partition = partition
        self.fds: set[int] = set()

    def subscribe(self, fd: int, callback: Any, mask: int) -> None:
        def on_event(fd: int, ev: int) -> None:
            callback(fd, ev)
            self._replicator._driver.mark(self._partition)

        self.fds.add(fd)
        self._replicator._poller.subscribe(fd, on_event, mask)

    def unsubscribe(self, fd: int) -> None:
        self.fds.discard(fd)
        self._replicator._poller.unsubscribe(fd)

    def poll(self, timeout: float) -> None:
        pass


class DriverNotifier:
    """Stands in for pysyncobj's PipeNotifier: a queued command marks its group for the driver."""

    def __init__(self, driver: Driver, partition: int) -> None:
        self._driver = driver
        self._partition = partition

    def notify(self) -> None:
        self._driver.mark_threadsafe(self._partition)


class GroupTransport(Transport):
    """pysyncobj transport of one group over the node's shared `Mux`."""

    def __init__(
        self, replicator: PySyncObjReplicator, partition: int, syncobj: Any, self_node: Any, others: Any
    ) -> None:
        super().__init__(syncobj, self_node, others)
        self._syncObj = syncobj
        self._held: list[tuple[TCPNode, dict[str, Any]]] | None = None  # while a snapshot restores
        self._replicator = replicator
        self._partition = partition
        self.nodes: dict[str, TCPNode] = {node.address: node for node in others}

    @property
    def ready(self) -> bool:
        return True

    def addNode(self, node: TCPNode) -> None:  # noqa: N802
        self.nodes[node.address] = node
        self._replicator._peers_changed()
        if self._replicator._mux.is_up(node.address):
            self._onNodeConnected(node)

    def dropNode(self, node: TCPNode) -> None:  # noqa: N802
        if self.nodes.pop(node.address, None) is not None:
            self._onNodeDisconnected(node)
        self._replicator._peers_changed()

    def send(self, node: TCPNode, message: Any) -> bool:
        if node.address not in self.nodes:
            return False
        return self._replicator._mux.send(node.address, self._partition, message)

    def deliver(self, peer: str, message: dict[str, Any]) -> None:
        node = self.nodes.get(peer)
        if node is None:
            return  # a peer outside this group's members is refused
        if self._held is not None:
            self._held.append((node, message))  # delivered in order once the restore is done
            return
        if _is_last_snapshot_chunk(message) and self._start_restore():
            self._held = [(node, message)]
            return
        if KEEP_NEXT_INDEX_ON_STALE_ACK and message.get("type") == "next_node_idx" and message.get("success"):
            self._deliver_ack(node, message)
        else:
            self._onMessageReceived(node, message)

    def _deliver_ack(self, node: TCPNode, message: dict[str, Any]) -> None:
        # pysyncobj sets nextIndex to the acknowledged index + 1 on every successful ack, so
        # an ack that overtakes entries already sent moves nextIndex back; the entries are
        # sent again and the follower truncates and rewrites its log from there (entries it
        # had acknowledged, even applied: a kill -9 in between loses them on that replica).
        # The leader keeps the larger nextIndex; a follower that really lacks entries still
        # answers reset=True, which pysyncobj honours.
        next_index = self._syncObj._SyncObj__raftNextIndex
        before = next_index.get(node)
        self._onMessageReceived(node, message)
        after = next_index.get(node)
        if before is not None and after is not None and after < before:
            next_index[node] = before

    def _start_restore(self) -> bool:
        """Restore the received snapshot on the snapshot thread; the group pauses meanwhile.

        pysyncobj would restore inside the message handler, on the driver thread, stalling
        every group of the node (and their leaderships) for as long as the restore takes.
        """
        raft = self._syncObj
        incoming = getattr(raft._SyncObj__serializer, "_Serializer__incomingTransmissionFile", None)
        if not ASYNC_RESTORE or incoming is None:
            return False
        incoming.flush()
        raft._kv_restoring = True
        replicator = self._replicator
        job = replicator._snapshots.submit(raft._kv_restore_file, incoming.name)
        job.add_done_callback(lambda _: replicator._driver.call_soon(lambda: self._finish_restore(job)))
        return True

    def _finish_restore(self, job: Future[None]) -> None:
        raft, held = self._syncObj, self._held or []
        self._held = None
        raft._kv_restoring = False
        if job.exception() is not None:
            log.error(
                "snapshot restore failed partition=%d error=%r (retrying on the driver thread)",
                self._partition,
                job.exception(),
            )
        if self._replicator._groups.get(self._partition) is None:
            return  # the group was removed meanwhile
        node, last_chunk = held[0]
        self._onMessageReceived(node, last_chunk)  # pysyncobj installs it; our data is already there
        for node, message in held[1:]:
            self.deliver(node.address, message)
        self._replicator._driver.mark(self._partition)

    def link_changed(self, peer: str, up: bool) -> None:
        node = self.nodes.get(peer)
        if node is not None:
            (self._onNodeConnected if up else self._onNodeDisconnected)(node)

    def announce_links(self) -> None:
        for address, node in self.nodes.items():
            if self._replicator._mux.is_up(address):
                self._onNodeConnected(node)

    def destroy(self) -> None:
        self.setOnMessageReceivedCallback(None)
        self.setOnNodeConnectedCallback(None)
        self.setOnNodeDisconnectedCallback(None)


def _is_last_snapshot_chunk(message: dict[str, Any]) -> bool:
    serialized = message.get("serialized") if message.get("type") == "append_entries" else None
    return isinstance(serialized, list | tuple) and len(serialized) == 3 and bool(serialized[2])
