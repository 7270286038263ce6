"""Start and stop a local cluster: N node processes on 127.0.0.1 with data under one folder.

Layout of the folder: `cluster.json` (what is running: pids, addresses), and per node
`n<i>/` (its RocksDB, map, `node.json` and, with replicas > 1, `raft.json` holding the
node's fixed Raft port and synced flag, and `raft/` its Raft log) plus `n<i>.log`. With replicas > 1 the
folder also holds `raft.secret` (mode 0600), the cluster secret the nodes read through
$KVSTORE_RAFT_SECRET_FILE. Processes are started in their own session so a terminal's
Ctrl-C does not hit them mid-write, and are stopped by pid, only after checking the pid
still runs our node for this folder.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# glibc returns large freed buffers to the OS each time; these keep them (grpc-call-cost.md:
# halves the cost of 256 KB replies). Clients benefit from the same settings.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}
STATE_FILE = "cluster.json"
RAFT_FILE = "raft.json"
DEFAULT_REPLICAS = 3
SECRET_FILE = "raft.secret"


class ClusterError(RuntimeError):
    """A local-cluster operation cannot proceed; the message says why and what to do."""


@dataclass
class NodeProcess:
    node_id: str
    data_dir: str
    log_path: str
    pid: int = 0
    address: str = ""


@dataclass
class LocalCluster:
    """A local cluster rooted at `root`; see the module docstring for the layout."""

    root: str
    nodes: list[NodeProcess] = field(default_factory=list)

    @classmethod
    def open(cls, root: str) -> LocalCluster:
        """Describe the cluster in `root` from its node folders and state file."""
        root = os.path.abspath(root)
        cluster = cls(root)
        state = _read_json(os.path.join(root, STATE_FILE)) or {}
        running = {n["node_id"]: n for n in state.get("nodes", [])}
        for name in sorted(_node_dirs(root), key=lambda n: (len(n), n)):
            node = cluster._describe(name)
            node.pid = int(running.get(name, {}).get("pid", 0))
            node.address = running.get(name, {}).get("address", "")
            cluster.nodes.append(node)
        return cluster

    def _describe(self, node_id: str) -> NodeProcess:
        return NodeProcess(node_id, os.path.join(self.root, node_id), os.path.join(self.root, f"{node_id}.log"))

    @property
    def seeds(self) -> list[str]:
        return [n.address for n in self.nodes if n.address]

    def running(self) -> list[NodeProcess]:
        """Return the nodes whose recorded process is alive and is our node."""
        return [n for n in self.nodes if _is_our_node(n.pid, n.data_dir)]

    def up(
        self,
        nodes: int = 3,
        *,
        partitions: int = 64,
        replicas: int | None = None,
        cache_bytes: str = "256MiB",
        raft_synced: bool = False,
        timeout_s: float = 30.0,
    ) -> list[str]:
        """Start every node, bootstrap a new cluster if needed; return the addresses.

        `replicas` defaults to 3 (fewer with fewer nodes) for a new cluster, and to what the
        folder's cluster was created with on a restart.

        Raises `ClusterError` if any node of this folder is already running, or if the
        folder holds a cluster with a different node count.
        """
        if self.running():
            live = ", ".join(f"{n.node_id} (pid {n.pid})" for n in self.running())
            raise ClusterError(
                f"a cluster is already running in {self.root}: {live}; "
                f"run 'kvstore cluster down --dir {self.root}' first"
            )
        if self.nodes and len(self.nodes) != nodes:
            raise ClusterError(
                f"{self.root} holds a {len(self.nodes)}-node cluster, not {nodes}; adding nodes is a rebalance"
            )
        os.makedirs(self.root, exist_ok=True)
        if replicas is None:
            replicas = self._replicas_on_disk() if self.nodes else min(DEFAULT_REPLICAS, nodes)
        if not self.nodes:
            self.nodes = [self._describe(f"n{i}") for i in range(1, nodes + 1)]
        if replicas > 1:
            self._prepare_raft(raft_synced)
        try:
            for node in self.nodes:
                self.start_node(node.node_id, cache_bytes=cache_bytes)
            for node in self.nodes:
                self._await_address(node, timeout_s)
            self._save()
            self._bootstrap(partitions, replicas, timeout_s)
        except BaseException:
            self.down()
            raise
        return self.seeds

    def _replicas_on_disk(self) -> int:
        """More than one when this folder's nodes were given Raft ports (a replicated cluster)."""
        return DEFAULT_REPLICAS if any(raft_port(n.data_dir) for n in self.nodes) else 1

    def _prepare_raft(self, synced: bool) -> None:
        """Generate the cluster secret and each node's fixed Raft port (once per folder); record `synced`."""
        secret_path = os.path.join(self.root, SECRET_FILE)
        if not os.path.exists(secret_path):
            fd = os.open(secret_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            os.replace(secret_path + ".tmp", secret_path)
        taken = {raft_port(n.data_dir) for n in self.nodes}
        for node in self.nodes:
            os.makedirs(node.data_dir, exist_ok=True)
            path = os.path.join(node.data_dir, RAFT_FILE)
            port = raft_port(node.data_dir)
            if port == 0:
                port = _free_port()
                while port in taken:  # the OS may hand the same free port out twice
                    port = _free_port()
                taken.add(port)
            with open(path + ".tmp", "w") as f:
                json.dump({"raft_port": port, "synced": synced}, f)
            os.replace(path + ".tmp", path)

    def start_node(self, node_id: str, *, cache_bytes: str = "256MiB") -> NodeProcess:
        """Start one node process (also used to restart a stopped node)."""
        node = next(n for n in self.nodes if n.node_id == node_id)
        os.makedirs(node.data_dir, exist_ok=True)
        info = os.path.join(node.data_dir, "node.json")
        if os.path.exists(info):
            os.replace(info, info + ".last")  # the new process writes a fresh one
        cmd = [
            sys.executable,
            "-m",
            "kvstore",
            "node",
            "--node-id",
            node_id,
            "--dir",
            node.data_dir,
            "--cache-bytes",
            cache_bytes,
            "--port",
            str(_last_port(info + ".last")),
        ]
        env = {**os.environ, **MALLOC_ENV}
        port = raft_port(node.data_dir)
        if port:
            cmd += ["--raft-port", str(port)]
            if (_read_json(os.path.join(node.data_dir, RAFT_FILE)) or {}).get("synced"):
                cmd.append("--raft-synced")
            secret_path = os.path.join(self.root, SECRET_FILE)
            if os.path.exists(secret_path):
                env.pop("KVSTORE_RAFT_SECRET", None)  # the folder's secret, whatever the caller's shell has
                env["KVSTORE_RAFT_SECRET_FILE"] = secret_path
        with open(node.log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        node.pid, node.address = proc.pid, ""
        return node

    def wait_ready(self, node_id: str, timeout_s: float = 30.0) -> str:
        """Wait until a started node serves; return its address."""
        node = next(n for n in self.nodes if n.node_id == node_id)
        address = self._await_address(node, timeout_s)
        self._save()
        return address

    def _await_address(self, node: NodeProcess, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        info_path = os.path.join(node.data_dir, "node.json")
        while time.monotonic() < deadline:
            info = _read_json(info_path)
            if info and info.get("pid") == node.pid:
                node.address = str(info["address"])
                return node.address
            if not _alive(node.pid):
                raise ClusterError(f"node {node.node_id} exited at start; see {node.log_path}:\n{_tail(node.log_path)}")
            time.sleep(0.05)
        raise ClusterError(f"node {node.node_id} did not start within {timeout_s:.0f} s; see {node.log_path}")

    def _bootstrap(self, partitions: int, replicas: int, timeout_s: float) -> None:
        req = pb.BootstrapRequest(
            nodes=[
                pb.NodeInfo(node_id=n.node_id, address=n.address, raft_address=_raft_address(n.data_dir))
                for n in self.nodes
            ],
            partitions=partitions,
            replicas=replicas,
        )
        with grpc.insecure_channel(self.nodes[0].address) as channel:
            admin = pb_grpc.AdminStub(channel)
            cmap = admin.GetClusterMap(pb.GetClusterMapRequest(), timeout=timeout_s, wait_for_ready=True)
            if cmap.epoch == 0:
                admin.Bootstrap(req, timeout=timeout_s)

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one node (only if the pid is still our node)."""
        node = next(n for n in self.nodes if n.node_id == node_id)
        if _is_our_node(node.pid, node.data_dir):
            os.kill(node.pid, sig)

    def down(self, timeout_s: float = 10.0) -> list[str]:
        """Stop every running node (SIGTERM, then SIGKILL after `timeout_s`); return their ids.

        Also stops nodes of this folder that another `LocalCluster` object started (as
        recorded in the state file).
        """
        live = self.running()
        known = {n.pid for n in live}
        live += [n for n in LocalCluster.open(self.root).running() if n.pid not in known]
        for node in live:
            os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for node in live:
            while _alive(node.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(node.pid):
                log.warning("node did not stop, killing node=%s pid=%d", node.node_id, node.pid)
                os.kill(node.pid, signal.SIGKILL)
                _wait_gone(node.pid)
        if os.path.isdir(self.root):
            self._save(running=False)
        return [n.node_id for n in live]

    def _save(self, running: bool = True) -> None:
        nodes = [{"node_id": n.node_id, "pid": n.pid if running else 0, "address": n.address} for n in self.nodes]
        tmp = os.path.join(self.root, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"nodes": nodes, "seeds": self.seeds}, f, indent=1)
        os.replace(tmp, os.path.join(self.root, STATE_FILE))


def seeds_from_dir(root: str) -> list[str]:
    """Return the addresses recorded for the cluster in `root` (empty if none)."""
    state = _read_json(os.path.join(os.path.abspath(root), STATE_FILE)) or {}
    return [str(s) for s in state.get("seeds", [])]


def raft_port(data_dir: str) -> int:
    """Return the node's fixed Raft port recorded in its folder (0: single-copy node)."""
    info = _read_json(os.path.join(data_dir, RAFT_FILE))
    try:
        return int(info["raft_port"]) if info else 0
    except (KeyError, ValueError, TypeError):
        return 0


def _raft_address(data_dir: str) -> str:
    port = raft_port(data_dir)
    return f"127.0.0.1:{port}" if port else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node_dirs(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return [
        d for d in os.listdir(root) if d.startswith("n") and d[1:].isdigit() and os.path.isdir(os.path.join(root, d))
    ]


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _last_port(info_path: str) -> int:
    info = _read_json(info_path)
    try:
        return int(str(info["address"]).rsplit(":", 1)[1]) if info else 0
    except (KeyError, ValueError, IndexError):
        return 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _state(pid) != "Z"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _is_our_node(pid: int, data_dir: str) -> bool:
    """True only if `pid` is alive and runs `kvstore node` on `data_dir` (no pid reuse)."""
    if not _alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return b"kvstore" in args and data_dir.encode() in args


def _wait_gone(pid: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
