"""A node process: open the store, serve gRPC, follow the cluster map, stop cleanly.

Threads: one asyncio event loop runs the gRPC server (requests are served inline on it),
the map sync loop and metadata changes; gRPC's own completion-queue threads; RocksDB's
background threads. With `--raft-port` (clusters with replicas > 1) the Raft replicator
starts before the node serves: its driver thread runs every partition group (and, on
metadata members, the metadata group) and applies committed commands to the store;
replicated writes await their commits (`propose_async`) without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvclient._limits import GRPC_CHANNEL_OPTIONS
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.admin_service import AdminService
from kvstore.config import NodeConfig
from kvstore.data_service import DataService
from kvstore.meta_group import GroupStateMachines, MetaStateMachine
from kvstore.peers import Peers
from kvstore.replica_service import ReplicasService
from kvstore.replication import NodeId
from kvstore.replication.pysyncobj_engine import PySyncObjConfig, PySyncObjReplicator
from kvstore.rocks_engine import RocksEngine
from kvstore.state import NodeState
from kvstore.state_machine import StoreStateMachine
from kvstore.store import Store

log = logging.getLogger(__name__)


def _saved_port(config: NodeConfig) -> int:
    try:
        with open(config.info_path) as f:
            return int(json.load(f)["address"].rsplit(":", 1)[1])
    except (OSError, ValueError, KeyError):
        return 0


def _bind(server: grpc.aio.Server, config: NodeConfig) -> int:
    """Bind the configured port, else the last one used, else one the OS picks."""
    for port in dict.fromkeys([config.port or _saved_port(config), 0]):
        try:
            bound = server.add_insecure_port(f"{config.host}:{port}")
        except RuntimeError:
            bound = 0
        if bound:
            return bound
        if config.port:
            raise OSError(f"port: cannot bind {config.host}:{config.port}")
    raise OSError(f"cannot bind any port on {config.host}")


def _write_info(config: NodeConfig, address: str) -> None:
    tmp = config.info_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"node_id": config.node_id, "address": address, "pid": os.getpid()}, f)
    os.replace(tmp, config.info_path)


async def serve(config: NodeConfig, stop: asyncio.Event | None = None) -> None:
    """Run a node until `stop` is set (or SIGTERM/SIGINT when `stop` is None)."""
    config.validate()
    os.makedirs(config.data_dir, exist_ok=True)
    store = Store(RocksEngine(config.db_path, block_cache_bytes=config.block_cache_bytes), config.cache_bytes)
    meta = MetaStateMachine()
    replicator: PySyncObjReplicator | None = None
    try:
        replicator = _start_replicator(config, store, meta)
        await _serve(config, store, replicator, meta, stop)
    finally:
        if replicator is not None:
            replicator.close()
        meta.close()
        store.close()


def _start_replicator(config: NodeConfig, store: Store, meta: MetaStateMachine) -> PySyncObjReplicator | None:
    """Start the Raft replicator on the node's fixed port (only for replicated clusters)."""
    if not config.raft_port:
        return None
    rep = PySyncObjReplicator(
        NodeId(config.node_id),
        PySyncObjConfig(
            data_dir=config.raft_dir,
            bind_host=config.host,
            port=config.raft_port,
            secret=config.raft_secret,
            synced=config.raft_synced,
        ),
        GroupStateMachines(StoreStateMachine(store), meta),
    )
    rep.start()
    return rep


async def _serve(
    config: NodeConfig,
    store: Store,
    replicator: PySyncObjReplicator | None,
    meta: MetaStateMachine,
    stop: asyncio.Event | None,
) -> None:
    state = NodeState(config, store, replicator, meta if replicator is not None else None)
    peers = Peers()
    admin = AdminService(state, peers)
    server = grpc.aio.server(options=GRPC_CHANNEL_OPTIONS)
    data = DataService(state)
    pb_grpc.add_DataServicer_to_server(data, server)
    pb_grpc.add_AdminServicer_to_server(admin, server)
    pb_grpc.add_ReplicasServicer_to_server(ReplicasService(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = _bind(server, config)
    await server.start()
    state.address = f"{config.host}:{port}"
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if state.local is not None:
        await admin.register_self()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    _write_info(config, state.address)
    # Everything allocated so far lives as long as the process: keep it out of the
    # collector's full passes, which otherwise show up as tail latency.
    gc.freeze()
    log.info("node serving node=%s address=%s epoch=%d", config.node_id, state.address, state.epoch)
    sync = asyncio.create_task(_sync_loop(state, peers, admin, config.map_sync_interval_s))
    try:
        await stop.wait()
    finally:
        log.info("node stopping node=%s", config.node_id)
        sync.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=1.0)
        await peers.close()


async def _sync_loop(state: NodeState, peers: Peers, admin: AdminService, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await peers.sync_once(state)
        local = state.local
        # The map still has an old address of ours, e.g. the metadata node was down at start.
        if local is not None and local.view.addresses.get(state.node_id) != state.address:
            await admin.register_self()
