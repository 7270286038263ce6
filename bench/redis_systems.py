"""The Redis peers: one `redis-server` answering MGET, and a 3-master Redis Cluster.

The harness starts its own `redis-server` processes on 127.0.0.1, on ports the OS hands
out, with persistence off (`--save "" --appendonly no`) and a temporary `--dir`, and stops
them by pid. Keys are the id as 8 big-endian bytes; values are the row's bytes in the
stored dtype, the same bytes kvstore stores.

Client: redis-py with hiredis. Its blocking client is faster per call than `redis.asyncio`
(about 1.3x at K=1000 on this machine, asyncio's stream reader being the difference), so
by default (`redis_client = "thread"`) each request runs the blocking client in a thread
pool of the generator process; `redis_client = "asyncio"` uses `redis.asyncio` on the loop.
The cluster client's multi-get is `mget_nonatomic` (split by slot, one MGET per slot,
pipelined per node, results restored to the caller's order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

from bench.scenario import Scenario
from bench.system import PeerUnavailableError, System, free_port, wait_for
from bench.workload import F32, U64, Dataset

log = logging.getLogger(__name__)

INSTALL_HINT = "apt-get update && apt-get install -y redis-server  (or: kvstore bench run ... --install-peers)"
LOAD_CHUNK = 10_000
THREADS = 4  # more threads only contend for the GIL on 2 cores; Redis itself is one thread


def redis_server_path() -> str:
    """Return the `redis-server` on PATH; raise `PeerUnavailableError` with the install command."""
    path = shutil.which("redis-server")
    if path is None:
        raise PeerUnavailableError(f"redis-server is not on PATH; install it with: {INSTALL_HINT}")
    return path


def redis_server_version() -> str:
    try:
        out = subprocess.run([redis_server_path(), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (PeerUnavailableError, OSError, subprocess.SubprocessError):
        return ""
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())


def redis_keys(ids: U64) -> list[bytes]:
    """Return each id as 8 big-endian bytes (the Redis key)."""
    raw = ids.astype(">u8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def assemble(values: list[bytes | None], dataset: Dataset) -> tuple[F32, int]:
    """Join MGET replies into a float32 matrix; a missing key becomes a zero row (and is counted)."""
    missing = values.count(None)
    if missing:
        zero = bytes(dataset.row_bytes)
        values = [v if v is not None else zero for v in values]
    rows = np.frombuffer(b"".join(values), dtype=dataset.stored.dtype).reshape(len(values), dataset.dim)  # type: ignore[arg-type]
    return rows.astype(np.float32, copy=False), missing


class RedisServer:
    """One `redis-server` process we started; `stop()` ends it by pid."""

    def __init__(self, root: str, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.dir = os.path.join(root, f"redis-{self.port}")
        os.makedirs(self.dir, exist_ok=True)
        cmd = [redis_server_path(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly"]
        cmd += ["no", "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"), *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self._pings, timeout_s=15.0, what=f"redis-server on port {self.port}")

    def _pings(self) -> bool:
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise PeerUnavailableError(f"redis-server on port {self.port} exited: {err.strip()}")
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0) as r:
            return bool(r.ping())

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


class _RedisBase(System):
    """What both peers share: server processes, the thread pool, and the two client modes."""

    def __init__(self, scn: Scenario) -> None:
        super().__init__()
        self.scn = scn
        self.root = ""
        self.servers: list[RedisServer] = []
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.load_s = 0.0
        self._local = threading.local()
        self._aclient: Any = None
        self._lock = threading.Lock()
        self._active = 0  # calls running in the pool (cancelled tasks do not stop them)

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        for server in self.servers:
            server.stop()
        self.servers = []
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""

    def _start_servers(self, count: int, extra: Callable[[], list[str]]) -> None:
        redis_server_path()
        self.root = tempfile.mkdtemp(prefix=f"kvstore-bench-{self.name}-")
        for _ in range(count):
            self.servers.append(RedisServer(self.root, extra()))

    def _load(self, mset: Callable[[dict[bytes, bytes]], Any]) -> None:
        t0 = time.perf_counter()
        data = self.data
        for start in range(0, data.keys, LOAD_CHUNK):
            ids = np.arange(start, min(data.keys, start + LOAD_CHUNK), dtype=np.uint64)
            raw = data.rows(ids).tobytes()
            width = data.row_bytes
            mset(dict(zip(redis_keys(ids), (raw[i : i + width] for i in range(0, len(raw), width)), strict=True)))
        self.load_s = time.perf_counter() - t0

    client_mode = ""  # "thread" or "asyncio"; empty: the scenario's `redis_client`

    @property
    def mode(self) -> str:
        return self.client_mode or self.scn.redis_client

    async def open(self) -> None:
        if self.mode == "asyncio":
            self._aclient = self._async_client()
        else:
            self.pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix=self.name)

    async def close(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None

    def _thread_client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._sync_client()
        return client

    def _sync_client(self) -> Any:
        raise NotImplementedError

    def _async_client(self) -> Any:
        raise NotImplementedError

    def _mget_sync(self, ids: U64) -> tuple[F32, int]:
        raise NotImplementedError

    async def _mget_async(self, ids: U64) -> tuple[F32, int]:
        raise NotImplementedError

    def _tracked(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            self._active += 1
        try:
            return fn()
        finally:
            with self._lock:
                self._active -= 1

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._tracked, fn)

    async def quiesce(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def get(self, ids: U64) -> tuple[F32, int]:
        if self._aclient is not None:
            return await self._mget_async(ids)
        result: tuple[F32, int] = await self._in_thread(lambda: self._mget_sync(ids))
        return result

    def _mset_rows(self, client: Any, ids: U64) -> None:
        raw = self.data.rows(ids).tobytes()
        width = self.data.row_bytes
        mapping = dict(zip(redis_keys(ids), (raw[i : i + width] for i in range(0, len(raw), width)), strict=True))
        client.mset_nonatomic(mapping) if hasattr(client, "mset_nonatomic") else client.mset(mapping)

    async def put(self, ids: U64) -> None:
        if self._aclient is not None:
            raw = self.data.rows(ids).tobytes()
            width = self.data.row_bytes
            mapping = dict(zip(redis_keys(ids), (raw[i : i + width] for i in range(0, len(raw), width)), strict=True))
            setter = getattr(self._aclient, "mset_nonatomic", None) or self._aclient.mset
            await setter(mapping)
            return
        await self._in_thread(lambda: self._mset_rows(self._thread_client(), ids))

    def server_pids(self) -> list[int]:
        return [s.pid for s in self.servers]

    def _info(self, label: str, multi_get: str) -> dict[str, Any]:
        return {
            "label": label,
            "server": f"redis-server {redis_server_version()}",
            "client": f"redis-py {metadata.version('redis')} + hiredis {metadata.version('hiredis')}, "
            + ("redis.asyncio on the loop" if self.mode == "asyncio" else f"blocking, {THREADS} threads"),
            "multi_get": multi_get,
            "ports": [s.port for s in self.servers],
            "load_s": round(self.load_s, 2),
        }


class RedisSystem(_RedisBase):
    """One `redis-server`, MGET of the batch's keys."""

    name = "redis"

    def start(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._start_servers(1, list)
        client = self._sync_client()
        self._load(client.mset)
        self.check_sample(lambda ids: self._mget_sync(ids)[0])

    def _sync_client(self) -> Any:
        return redis.Redis(host="127.0.0.1", port=self.servers[0].port, socket_timeout=self.scn.deadline_s + 5)

    def _async_client(self) -> Any:
        return redis.asyncio.Redis(host="127.0.0.1", port=self.servers[0].port, socket_timeout=self.scn.deadline_s + 5)

    def _mget_sync(self, ids: U64) -> tuple[F32, int]:
        return assemble(self._thread_client().mget(redis_keys(ids)), self.data)

    async def _mget_async(self, ids: U64) -> tuple[F32, int]:
        return assemble(await self._aclient.mget(redis_keys(ids)), self.data)

    def info(self) -> dict[str, Any]:
        return self._info("Redis single MGET", "MGET")


class RedisAsyncioSystem(RedisSystem):
    """The same single server through `redis.asyncio` on the generator's loop (no threads).

    Costs more client CPU per call than the blocking client, but never contends with the
    generator's loop for the GIL; both are measured so the faster one can be the peer.
    """

    name = "redis_asyncio"
    client_mode = "asyncio"

    def info(self) -> dict[str, Any]:
        return self._info("Redis single MGET, redis.asyncio", "MGET")


class RedisClusterSystem(_RedisBase):
    """A 3-master Redis Cluster (no replicas), redis-py's `mget_nonatomic`."""

    name = "redis_cluster"
    masters = 3

    def start(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._start_servers(self.masters, self._cluster_args)
        self._create_cluster()
        client = self._sync_client()
        self._load(client.mset_nonatomic)
        self.check_sample(lambda ids: self._mget_sync(ids)[0])

    def _cluster_args(self) -> list[str]:
        # The bus port defaults to port + 10000, which may be taken or out of range: pick one.
        return ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", str(free_port())]

    def _create_cluster(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise PeerUnavailableError(f"redis-cli is not on PATH; install it with: {INSTALL_HINT}")
        addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
        cmd = [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise PeerUnavailableError(f"redis-cli --cluster create failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        for server in self.servers:
            what = f"cluster state on port {server.port}"
            wait_for(lambda s=server: self._cluster_ok(s.port), timeout_s=30.0, what=what)

    @staticmethod
    def _cluster_ok(port: int) -> bool:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0) as r:
            info = r.execute_command("CLUSTER INFO")
        if isinstance(info, dict):  # redis-py parses CLUSTER INFO into a dict
            return str(info.get("cluster_state")) == "ok"
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def _sync_client(self) -> Any:
        return redis.cluster.RedisCluster(
            host="127.0.0.1", port=self.servers[0].port, socket_timeout=self.scn.deadline_s + 5
        )

    def _async_client(self) -> Any:
        return redis.asyncio.cluster.RedisCluster(
            host="127.0.0.1", port=self.servers[0].port, socket_timeout=self.scn.deadline_s + 5
        )

    def _mget_sync(self, ids: U64) -> tuple[F32, int]:
        return assemble(self._thread_client().mget_nonatomic(redis_keys(ids)), self.data)

    async def _mget_async(self, ids: U64) -> tuple[F32, int]:
        return assemble(await self._aclient.mget_nonatomic(redis_keys(ids)), self.data)

    def info(self) -> dict[str, Any]:
        info = self._info(f"Redis Cluster {self.masters} masters", "mget_nonatomic")
        info["masters"] = self.masters
        return info
