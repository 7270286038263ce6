"""One TCP link per peer node, shared by every Raft group, on one event poller.

Frames: ``>IBI`` (payload length, kind, group) + payload. Messages are msgpack (peers'
bytes are never unpickled by this layer). A link starts with a handshake naming the
caller's Raft address; an address outside the known peers, or from another IP, is refused.
With a cluster secret both sides prove knowledge of it (HMAC-SHA256 over fresh nonces)
before any message is accepted.

Fairness: each group has its own FIFO queue per link and groups take turns, so one group's
snapshot or large batch cannot delay another group's heartbeat (a group's own messages keep
their order: pysyncobj needs that).

Durability ordering: `before_write` (the Raft log's flush) runs before any byte is written
to a socket, so no ack or vote leaves before the log changes it answers for are written.

Not thread-safe: every method runs on the driver thread that owns the poller.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import hmac
import logging
import os
import select
import socket
import struct
import zlib
from collections.abc import Callable
from typing import Any

import msgpack

log = logging.getLogger(__name__)

# Same values as pysyncobj's POLL_EVENT_TYPE, so its PipeNotifier can subscribe here.
READ, WRITE, ERROR = 1, 2, 4

_HEADER = struct.Struct(">IBI")
_HELLO, _WELCOME, _AUTH, _MSG, _MSG_Z = range(5)
_MAX_FRAME_BYTES = 256 * 1024 * 1024
_FLUSH_CHUNK_BYTES = 256 * 1024
_RECV_BYTES = 1024 * 1024


class Poller:
    """epoll with pysyncobj's subscribe/unsubscribe/poll interface."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int, int], None]] = {}

    def subscribe(self, fd: int, callback: Callable[[int, int], None], mask: int) -> None:
        events = (select.EPOLLIN if mask & READ else 0) | (select.EPOLLOUT if mask & WRITE else 0)
        if fd in self._callbacks:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def unsubscribe(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def poll(self, timeout_s: float) -> None:
        for fd, ev in self._epoll.poll(max(timeout_s, 0.0)):
            mask = (READ if ev & select.EPOLLIN else 0) | (WRITE if ev & select.EPOLLOUT else 0)
            if ev & (select.EPOLLERR | select.EPOLLHUP):
                mask |= ERROR | READ
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(fd, mask)

    def close(self) -> None:
        self._epoll.close()


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()


class _Link:
    """One TCP connection to a peer: framing, handshake state and the send queues."""

    def __init__(self, sock: socket.socket, peer: str | None, outgoing: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.outgoing = outgoing
        self.up = False
        self.connecting = outgoing
        self.mask = READ | WRITE if outgoing else READ
        self.nonce = os.urandom(16)
        self.peer_nonce = b""
        self.rbuf = bytearray()
        self.out = bytearray()
        self.control: collections.deque[bytes] = collections.deque()  # handshake frames
        self.queues: collections.OrderedDict[int, collections.deque[bytes]] = collections.OrderedDict()

    def queue(self, group: int, frame: bytes) -> None:
        self.queues.setdefault(group, collections.deque()).append(frame)

    def has_pending(self) -> bool:
        return bool(self.out or self.control or self.queues)

    def refill(self) -> None:
        """Move queued frames into `out`: handshake first, then one frame per group in turn.

        Each group's frames keep their order (Raft over pysyncobj needs in-order delivery);
        groups take turns, so one group's snapshot cannot hold back another's heartbeat.
        """
        while self.control and len(self.out) < _FLUSH_CHUNK_BYTES:
            self.out += self.control.popleft()
        while self.queues and len(self.out) < _FLUSH_CHUNK_BYTES:
            group, frames = self.queues.popitem(last=False)
            self.out += frames.popleft()
            if frames:
                self.queues[group] = frames  # to the back of the round


class Mux:
    """Links to the peer nodes; delivers (peer, group, message) to `on_message`."""

    def __init__(
        self,
        poller: Poller,
        *,
        secret: bytes | None,
        on_message: Callable[[str, int, dict[str, Any]], None],
        on_link: Callable[[str, bool], None],
        reconnect_s: float = 0.5,
        compress_min_bytes: int | None = None,
        socket_buffer_bytes: int = 1024 * 1024,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        self._poller = poller
        self._before_write = before_write
        self._secret = secret
        self._on_message = on_message
        self._on_link = on_link
        self._reconnect_s = reconnect_s
        self._compress_min_bytes = compress_min_bytes
        self._sockbuf = socket_buffer_bytes
        self._server: socket.socket | None = None
        self.address = ""
        self._peers: set[str] = set()
        self._peer_ips: dict[str, str] = {}
        self._links: dict[str, _Link] = {}  # peer -> link that is up
        self._pending: dict[int, _Link] = {}  # fd -> link not yet up (or outgoing attempt)
        self._last_attempt: dict[str, float] = {}
        self._dirty: set[_Link] = set()
        self.blocked: set[str] = set()  # test-only: peers whose messages are dropped both ways
        self.messages_sent = 0  # a counter for benches and tests

    # ---- setup ----

    def listen(self, host: str, port: int) -> str:
        """Bind and listen; return this node's `host:port` (port 0 picks a free one)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
        self._server = sock
        self.address = f"{host}:{sock.getsockname()[1]}"
        self._poller.subscribe(sock.fileno(), self._on_accept, READ)
        return self.address

    def set_peers(self, peers: set[str]) -> None:
        """Set the peers allowed to connect (and to be connected to); drop links to others."""
        self._peers = set(peers) - {self.address}
        for peer in [p for p in self._links if p not in self._peers]:
            self._close(self._links[peer])

    def is_up(self, peer: str) -> bool:
        return peer in self._links

    # ---- sending ----

    def send(self, peer: str, group: int, message: dict[str, Any]) -> bool:
        """Queue a message; return False when there is no link to `peer`."""
        link = self._links.get(peer)
        if link is None:
            return False
        if peer in self.blocked:
            return True  # a black hole: the sender cannot tell
        payload = msgpack.packb(message, use_bin_type=True)
        kind = _MSG
        if self._compress_min_bytes is not None and len(payload) >= self._compress_min_bytes:
            payload, kind = zlib.compress(payload, 1), _MSG_Z
        link.queue(group, _HEADER.pack(len(payload), kind, group) + payload)
        self._dirty.add(link)
        self.messages_sent += 1
        return True

    def flush(self) -> None:
        """Write what the sockets accept now; the rest leaves when they become writable."""
        dirty, self._dirty = self._dirty, set()
        for link in dirty:
            self._write(link)

    def _write(self, link: _Link) -> None:
        if self._before_write is not None:
            self._before_write()
        while True:
            if not link.out:
                link.refill()
                if not link.out:
                    break
            try:
                sent = link.sock.send(link.out)
            except BlockingIOError:
                break
            except OSError:
                self._close(link)
                return
            del link.out[:sent]
        mask = READ | (WRITE if link.has_pending() or link.connecting else 0)
        if mask != link.mask:
            link.mask = mask
            self._poller.subscribe(link.fd, functools.partial(self._on_event, link), mask)

    def _send_raw(self, link: _Link, kind: int, body: dict[str, Any]) -> None:
        payload = msgpack.packb(body, use_bin_type=True)
        link.control.append(_HEADER.pack(len(payload), kind, 0) + payload)
        self._dirty.add(link)

    # ---- connecting ----

    def maintain(self, now: float) -> None:
        """Start outgoing connections that are missing (we dial peers with a smaller address)."""
        dialing = {link.peer for link in self._pending.values() if link.outgoing}
        for peer in self._peers:
            if peer in self._links or peer in dialing or not self._dials(peer):
                continue
            if now - self._last_attempt.get(peer, -1e9) < self._reconnect_s:
                continue
            self._last_attempt[peer] = now
            self._dial(peer)

    def _dials(self, peer: str) -> bool:
        return self.address > peer

    def _dial(self, peer: str) -> None:
        host, port = peer.rsplit(":", 1)
        sock = self._new_socket()
        try:
            sock.connect((host, int(port)))
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            return
        link = _Link(sock, peer, outgoing=True)
        self._pending[link.fd] = link
        self._poller.subscribe(link.fd, functools.partial(self._on_event, link), READ | WRITE)

    def _new_socket(self, sock: socket.socket | None = None) -> socket.socket:
        sock = sock or socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sockbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._sockbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        return sock

    def _on_accept(self, fd: int, ev: int) -> None:
        assert self._server is not None
        while True:
            try:
                sock, _ = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("raft accept failed error=%s", exc)
                return
            link = _Link(self._new_socket(sock), None, outgoing=False)
            self._pending[link.fd] = link
            self._poller.subscribe(link.fd, functools.partial(self._on_event, link), READ)

    # ---- receiving ----

    def _on_event(self, link: _Link, fd: int, ev: int) -> None:
        if link.connecting and ev & (WRITE | ERROR):
            err = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._close(link)
                return
            link.connecting = False
            self._send_raw(link, _HELLO, {"addr": self.address, "nonce": link.nonce})
        if ev & READ and not self._read(link):
            return
        if ev & WRITE or link.has_pending():
            self._write(link)

    def _read(self, link: _Link) -> bool:
        while True:
            try:
                chunk = link.sock.recv(_RECV_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    self._close(link)
                    return False
                continue
            if not chunk:
                self._close(link)
                return False
            link.rbuf += chunk
            if len(chunk) < _RECV_BYTES:
                break
        return self._parse(link)

    def _parse(self, link: _Link) -> bool:
        buf = link.rbuf
        pos = 0
        ok = True
        while len(buf) - pos >= _HEADER.size:
            size, kind, group = _HEADER.unpack_from(buf, pos)
            if size > _MAX_FRAME_BYTES:
                ok = False
                break
            end = pos + _HEADER.size + size
            if len(buf) < end:
                break
            payload = bytes(buf[pos + _HEADER.size : end])
            pos = end
            if not self._on_frame(link, kind, group, payload):
                ok = False
                break
        if not ok:
            self._close(link)
            return False
        del buf[:pos]
        return True

    def _on_frame(self, link: _Link, kind: int, group: int, payload: bytes) -> bool:
        if link.up and kind in (_MSG, _MSG_Z):
            assert link.peer is not None
            if link.peer in self.blocked:
                return True
            if kind == _MSG_Z:
                payload = zlib.decompress(payload)
            try:
                message = msgpack.unpackb(payload, raw=False)
            except Exception:  # malformed input from an authenticated peer: drop the link
                log.warning("undecodable raft message peer=%s group=%d", link.peer, group)
                return False
            if isinstance(message, dict):
                try:
                    self._on_message(link.peer, group, message)
                except Exception:  # the frame is consumed either way: never deliver it twice
                    log.exception("raft message handler failed peer=%s group=%d", link.peer, group)
            return link.up
        try:
            body = msgpack.unpackb(payload, raw=False)
        except Exception:
            return False
        if not isinstance(body, dict):
            return False
        return self._handshake(link, kind, body)

    def _handshake(self, link: _Link, kind: int, body: dict[str, Any]) -> bool:
        if kind == _HELLO and not link.outgoing and link.peer is None:
            return self._on_hello(link, body)
        if kind == _WELCOME and link.outgoing and not link.up and link.peer is not None:
            if body.get("addr") != link.peer:
                log.warning("raft peer answered with another address expected=%s got=%s", link.peer, body.get("addr"))
                return False
            if self._secret is not None:
                nonce = body.get("nonce", b"")
                expect = _mac(self._secret, b"A", link.nonce, nonce, link.peer.encode())
                if not isinstance(nonce, bytes) or not hmac.compare_digest(expect, body.get("mac", b"")):
                    log.warning("raft peer failed authentication peer=%s", link.peer)
                    return False
                self._send_raw(link, _AUTH, {"mac": _mac(self._secret, b"I", nonce, link.nonce, self.address.encode())})
            self._set_up(link)
            return True
        if kind == _AUTH and not link.outgoing and link.peer is not None and not link.up and self._secret is not None:
            expect = _mac(self._secret, b"I", link.nonce, link.peer_nonce, link.peer.encode())
            if not hmac.compare_digest(expect, body.get("mac", b"")):
                log.warning("raft peer failed authentication peer=%s", link.peer)
                return False
            self._set_up(link)
            return True
        return False

    def _on_hello(self, link: _Link, body: dict[str, Any]) -> bool:
        peer, nonce = body.get("addr"), body.get("nonce")
        if not isinstance(peer, str) or not isinstance(nonce, bytes) or peer not in self._peers:
            log.warning("raft connection refused: unknown peer %r", peer)
            return False
        source_ip = link.sock.getpeername()[0]
        if source_ip != self._resolve(peer):
            log.warning("raft connection refused: peer %s connected from %s", peer, source_ip)
            return False
        link.peer, link.peer_nonce = peer, nonce
        reply: dict[str, Any] = {"addr": self.address}
        if self._secret is not None:
            reply["nonce"] = link.nonce
            reply["mac"] = _mac(self._secret, b"A", nonce, link.nonce, self.address.encode())
        self._send_raw(link, _WELCOME, reply)
        if self._secret is None:
            self._set_up(link)
        return True

    def _resolve(self, peer: str) -> str:
        ip = self._peer_ips.get(peer)
        if ip is None:
            ip = self._peer_ips[peer] = socket.gethostbyname(peer.rsplit(":", 1)[0])
        return ip

    def _set_up(self, link: _Link) -> None:
        assert link.peer is not None
        self._pending.pop(link.fd, None)
        old = self._links.get(link.peer)
        if old is not None:
            self._close(old, notify=False)
        link.up = True
        self._links[link.peer] = link
        log.info("raft link up peer=%s", link.peer)
        self._on_link(link.peer, True)

    def _close(self, link: _Link, *, notify: bool = True) -> None:
        self._pending.pop(link.fd, None)
        self._poller.unsubscribe(link.fd)
        self._dirty.discard(link)
        with contextlib.suppress(OSError):
            link.sock.close()
        was_up = link.up
        link.up = False
        if was_up and link.peer is not None and self._links.get(link.peer) is link:
            del self._links[link.peer]
            log.info("raft link down peer=%s", link.peer)
            if notify:
                self._on_link(link.peer, False)

    def close(self) -> None:
        """Close every link and the listening socket."""
        for link in list(self._links.values()) + list(self._pending.values()):
            self._close(link, notify=False)
        if self._server is not None:
            self._poller.unsubscribe(self._server.fileno())
            self._server.close()
            self._server = None
