"""`kvstore` command line: node, local cluster, status, tables, load, get, replica, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from kvclient import Client, ClientError, KvError
from kvclient._proto import kvstore_pb2 as pb
from kvstore.config import NodeConfig, parse_bytes
from kvstore.launcher import ClusterError, LocalCluster, seeds_from_dir

DEFAULT_DIR = ".kvstore"
console = Console()


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", help="comma-separated host:port list (default: $KVSTORE_SEEDS, else --dir)")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"local cluster folder (default {DEFAULT_DIR})")


def _seeds(args: argparse.Namespace) -> list[str]:
    text = args.seeds or os.environ.get("KVSTORE_SEEDS", "")
    seeds = [s for s in text.split(",") if s] or seeds_from_dir(args.dir)
    if not seeds:
        raise ClusterError(
            "no cluster to talk to: pass --seeds host:port, set KVSTORE_SEEDS, "
            f"or start one with 'kvstore cluster up --dir {args.dir}'"
        )
    return seeds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Distributed embedding and feature store")
    parser.add_argument("--log-level", default=os.environ.get("KVSTORE_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run one storage node in the foreground")
    node.add_argument("--node-id", required=True)
    node.add_argument("--dir", required=True, help="data folder of this node")
    node.add_argument("--host", default="127.0.0.1")
    node.add_argument("--port", type=int, default=0, help="0: the last port used, else one from the OS")
    node.add_argument("--cache-bytes", default="256MiB", help="in-memory row cache budget")
    node.add_argument("--block-cache-bytes", default="256MiB", help="RocksDB block cache")
    node.add_argument(
        "--raft-port",
        type=int,
        default=0,
        help="fixed Raft port (needed for replicas > 1; keep it across restarts). "
        "The cluster secret comes from $KVSTORE_RAFT_SECRET or the file named by $KVSTORE_RAFT_SECRET_FILE "
        "(required unless --host is loopback)",
    )
    node.add_argument(
        "--raft-synced",
        action="store_true",
        help="fsync the Raft log before acknowledging: writes survive power loss, at a latency cost",
    )

    cluster = sub.add_parser("cluster", help="start or stop a local cluster")
    csub = cluster.add_subparsers(dest="action", required=True)
    up = csub.add_parser("up", help="start N nodes on 127.0.0.1")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--dir", default=DEFAULT_DIR)
    up.add_argument("--partitions", type=int, default=64)
    up.add_argument(
        "--replicas", type=int, default=None, help="copies of each partition (default 3, at most --nodes; 1: no Raft)"
    )
    up.add_argument("--raft-synced", action="store_true", help="replicated clusters: fsync every Raft log append")
    up.add_argument("--cache-bytes", default="256MiB")
    up.add_argument("--detach", action="store_true", help="return once the cluster serves")
    down = csub.add_parser("down", help="stop the local cluster")
    down.add_argument("--dir", default=DEFAULT_DIR)

    status = sub.add_parser("status", help="nodes, partitions and tables")
    _add_target(status)
    status.add_argument("--json", action="store_true")
    status.add_argument("--partitions", action="store_true", help="print each partition's replicas, leader and lag")

    table = sub.add_parser("table", help="create, list or drop tables")
    tsub = table.add_subparsers(dest="action", required=True)
    create = tsub.add_parser("create")
    create.add_argument("name")
    create.add_argument("--kind", choices=["embedding", "features"], default="embedding")
    create.add_argument("--dim", type=int)
    create.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    create.add_argument("--default", choices=["zeros", "nan"], default=None)
    create.add_argument("--allow-nonfinite", action="store_true")
    create.add_argument("--if-not-exists", action="store_true")
    _add_target(create)
    tlist = tsub.add_parser("list")
    tlist.add_argument("--json", action="store_true")
    _add_target(tlist)
    drop = tsub.add_parser("drop")
    drop.add_argument("name")
    _add_target(drop)
    warm = tsub.add_parser("warm", help="read a table's rows into every node's cache (writes do not fill it)")
    warm.add_argument("name")
    _add_target(warm)

    load = sub.add_parser("load", help="load ids and vectors from .npy files")
    load.add_argument("table")
    load.add_argument("--ids", required=True, help=".npy of K integer ids")
    load.add_argument("--vectors", required=True, help=".npy of K x dim floats")
    load.add_argument("--batch-size", type=int, default=10_000)
    _add_target(load)

    get = sub.add_parser("get", help="print the rows of some ids")
    get.add_argument("table")
    get.add_argument("ids", nargs="+", type=int)
    get.add_argument("--json", action="store_true")
    _add_target(get)

    replica = sub.add_parser("replica", help="add, remove or move the leadership of one partition replica")
    rsub = replica.add_subparsers(dest="action", required=True)
    radd = rsub.add_parser("add", help="open a replica on a node, add it to the group, wait until it caught up")
    radd.add_argument("--max-lag", type=int, default=0, help="entries the new replica may still lack when done")
    rremove = rsub.add_parser("remove", help="remove a node's replica (moving the leadership first) and delete it")
    rtransfer = rsub.add_parser("transfer", help="hand a partition's leadership to another replica")
    rtransfer.add_argument("--to", default=None, help="target node (default: the most caught-up follower)")
    for p, needs_node in ((radd, True), (rremove, True), (rtransfer, False)):
        p.add_argument("--partition", type=int, required=True)
        if needs_node:
            p.add_argument("--node", required=True, help="node id (as in 'kvstore status')")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole move (default 60)")
        p.add_argument("--json", action="store_true")
        _add_target(p)

    # Listed for --help only: main() hands 'kvstore bench ...' to the harness before parsing.
    sub.add_parser("bench", help="benchmark harness (see 'kvstore bench --help')", add_help=False)

    demo = sub.add_parser("demo", help="start a cluster, load, time lookups, stop")
    demo.add_argument("--dir", default=None, help="cluster folder (default: a temporary one)")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--keys", type=int, default=100_000)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--batch", type=int, default=1000)
    demo.add_argument("--seconds", type=float, default=5.0)
    demo.add_argument("--transport", choices=["stream", "unary"], default="stream")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the harness parses its own options, --help included
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(COMMANDS[args.command](args) or 0)
    except (ClusterError, ClientError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    except KvError as err:
        console.print(f"[red]error:[/red] {type(err).__name__}: {err}", highlight=False)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_node(args: argparse.Namespace) -> int:
    from kvstore.node import serve

    config = NodeConfig(
        node_id=args.node_id,
        data_dir=os.path.abspath(args.dir),
        host=args.host,
        port=args.port,
        cache_bytes=parse_bytes(args.cache_bytes),
        block_cache_bytes=parse_bytes(args.block_cache_bytes),
        raft_port=args.raft_port,
        raft_secret=_raft_secret(),
        raft_synced=args.raft_synced,
    ).validate()
    asyncio.run(serve(config))
    return 0


def _raft_secret() -> bytes | None:
    """Return the cluster secret from the environment (never from the command line)."""
    secret = os.environ.get("KVSTORE_RAFT_SECRET", "")
    path = os.environ.get("KVSTORE_RAFT_SECRET_FILE", "")
    if not secret and path:
        with open(path) as f:
            secret = f.read().strip()
    return secret.encode() if secret else None


def cmd_cluster(args: argparse.Namespace) -> int:
    cluster = LocalCluster.open(args.dir)
    if args.action == "down":
        stopped = cluster.down()
        console.print(
            f"stopped {len(stopped)} node(s) in {cluster.root}" if stopped else f"no running nodes in {cluster.root}"
        )
        return 0
    parse_bytes(args.cache_bytes)
    seeds = cluster.up(
        args.nodes,
        partitions=args.partitions,
        replicas=args.replicas,
        cache_bytes=args.cache_bytes,
        raft_synced=args.raft_synced,
    )
    console.print(f"cluster of {len(seeds)} node(s) serving; connect with seeds: [bold]{','.join(seeds)}[/bold]")
    console.print(f"data and logs: {cluster.root}")
    if args.detach:
        console.print(f"stop with: kvstore cluster down --dir {args.dir}")
        return 0
    console.print("press Ctrl-C to stop")
    try:
        while cluster.running():
            time.sleep(0.5)
        console.print("[red]every node exited[/red]; see the logs in the folder")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.down()


def cmd_status(args: argparse.Namespace) -> int:
    with Client(_seeds(args)) as kv:
        view = kv.refresh_map()
        stats = kv.node_stats()
        groups = kv.partition_status() if view.proto.replicas > 1 else []
    doc = _status_doc(view.proto, stats)
    if groups:
        _add_replication(doc, view.proto, groups)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    console.print(
        f"cluster [bold]{doc['cluster_id']}[/bold]  epoch {doc['epoch']}  "
        f"partitions {doc['partitions']}  replicas {doc['replicas']}"
    )
    nodes = Table()
    for name in ("node", "address", "state", "partitions", "cache", "hit rate", "disk", "requests"):
        nodes.add_column(name, no_wrap=name in ("node", "address"))
    for n in doc["nodes"]:
        nodes.add_row(
            n["node_id"] + (" (meta)" if n["meta"] else ""),
            n["address"],
            n["state"],
            str(n["partitions"]),
            f"{_mib(n.get('cache_bytes', 0))} / {_mib(n.get('cache_budget_bytes', 0))}",
            f"{n['hit_rate']:.0%}" if n.get("hit_rate") is not None else "-",
            _mib(n.get("disk_bytes", 0)),
            str(n.get("requests", "-")),
        )
    console.print(nodes)
    if groups:
        _print_replication(doc)
        if args.partitions:
            _print_partitions(doc["partition_status"])
    _print_tables(doc["tables"])
    return 0


def _status_doc(cmap: Any, stats: list[Any]) -> dict[str, Any]:
    nodes = []
    for info, st in zip(cmap.nodes, stats, strict=True):
        row: dict[str, Any] = {
            "node_id": info.node_id,
            "address": info.address,
            "meta": info.node_id in (cmap.meta_node_ids or [cmap.meta_node_id]),
            "partitions": sum(info.node_id in p.node_ids for p in cmap.placement),
        }
        if isinstance(st, Exception):
            row.update(state="down", error=str(st))
        else:
            reads = st.cache_hits + st.cache_misses
            row.update(
                state="up",
                epoch=st.epoch,
                cache_bytes=st.cache_bytes,
                cache_budget_bytes=st.cache_budget_bytes,
                hit_rate=(st.cache_hits / reads) if reads else None,
                disk_bytes=st.disk_bytes,
                requests=st.requests,
                keys_read=st.keys_read,
                keys_written=st.keys_written,
                uptime_s=round(st.uptime_s, 1),
            )
        nodes.append(row)
    tables = [_table_doc(t) for t in cmap.tables]
    return {
        "cluster_id": cmap.cluster_id,
        "epoch": cmap.epoch,
        "partitions": cmap.partitions,
        "replicas": cmap.replicas,
        "meta_node_id": cmap.meta_node_id,
        "meta_node_ids": list(cmap.meta_node_ids),
        "nodes": nodes,
        "tables": tables,
    }


def _add_replication(doc: dict[str, Any], cmap: Any, groups: list[Any]) -> None:
    """Add each partition's leader, applied indexes and lag (from every node's view) to `doc`."""
    parts: list[dict[str, Any]] = [
        {"partition": p, "replicas": list(r.node_ids), "leader": None, "term": 0, "commit_index": 0, "applied": {}}
        for p, r in enumerate(cmap.placement)
    ]
    meta: dict[str, Any] = {"members": list(cmap.meta_node_ids), "leader": None, "term": 0, "applied": {}}
    for info, resp, node in zip(cmap.nodes, groups, doc["nodes"], strict=True):
        if isinstance(resp, Exception):
            continue
        for g in resp.groups:
            row = parts[g.partition] if g.partition < len(parts) else meta
            row["applied"][info.node_id] = g.applied_index
            if g.is_leader and g.term >= row["term"]:
                row.update(leader=info.node_id, term=g.term, commit_index=g.commit_index)
        node["leads"] = sum(1 for g in resp.groups if g.is_leader and g.partition < len(parts))
    for row in parts:
        top = row["commit_index"] or max(row["applied"].values(), default=0)
        row["lag"] = {n: max(0, top - a) for n, a in row["applied"].items()}
    for node in doc["nodes"]:
        lags = [row["lag"][node["node_id"]] for row in parts if node["node_id"] in row["lag"]]
        if node["node_id"] in {n for row in parts for n in row["applied"]}:
            node["max_lag"] = max(lags, default=0)
    doc["partition_status"] = parts
    doc["metadata_group"] = meta


def _print_replication(doc: dict[str, Any]) -> None:
    parts = doc["partition_status"]
    meta = doc["metadata_group"]
    console.print(
        f"metadata group: members {','.join(meta['members']) or '-'}  "
        f"leader {meta['leader'] or '[red]none[/red]'}  term {meta['term']}"
    )
    leaderless = [str(p["partition"]) for p in parts if not p["leader"]]
    table = Table(title="replication (Raft groups)")
    for name in ("node", "holds", "leads", "max lag"):
        table.add_column(name)
    for n in doc["nodes"]:
        table.add_row(n["node_id"], str(n["partitions"]), str(n.get("leads", "-")), str(n.get("max_lag", "-")))
    console.print(table)
    if leaderless:
        console.print(f"[red]partitions without a leader:[/red] {', '.join(leaderless)}")
    else:
        console.print("every partition has a leader; --partitions prints each one")


def _print_partitions(parts: list[dict[str, Any]]) -> None:
    table = Table()
    for name in ("partition", "replicas", "leader", "term", "commit", "applied (lag)"):
        table.add_column(name)
    for row in parts:
        applied = "  ".join(
            f"{n}:{row['applied'][n]} ({row['lag'][n]})" if n in row["applied"] else f"{n}:down"
            for n in row["replicas"]
        )
        table.add_row(
            str(row["partition"]),
            ",".join(row["replicas"]),
            row["leader"] or "[red]none[/red]",
            str(row["term"]),
            str(row["commit_index"]),
            applied,
        )
    console.print(table)


def _table_doc(schema: Any) -> dict[str, Any]:
    from kvclient import TableInfo

    info = TableInfo.from_proto(schema)
    return {
        "name": info.name,
        "kind": info.kind,
        "dim": info.dim,
        "dtype": info.dtype,
        "default": "zeros" if info.default is None else ("nan" if np.isnan(info.default).all() else "vector"),
        "allow_nonfinite": info.allow_nonfinite,
    }


def _print_tables(tables: list[dict[str, Any]]) -> None:
    out = Table("table", "kind", "dim", "dtype", "default")
    for t in tables:
        out.add_row(t["name"], t["kind"], str(t["dim"] or "-"), t["dtype"] or "-", t["default"])
    console.print(out if tables else "no tables")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_table(args: argparse.Namespace) -> int:
    with Client(_seeds(args)) as kv:
        if args.action == "create":
            kv.create_table(
                args.name,
                dim=args.dim,
                dtype=args.dtype,
                kind=args.kind,
                default=args.default,
                allow_nonfinite=args.allow_nonfinite,
                if_not_exists=args.if_not_exists,
            )
            console.print(f"table {args.name!r} created")
        elif args.action == "drop":
            kv.drop_table(args.name)
            console.print(f"table {args.name!r} dropped")
        elif args.action == "warm":
            return _print_warm(kv.warm_cache(args.name))
        else:
            docs = [_table_doc(t) for t in kv.refresh_map().proto.tables]
            if args.json:
                print(json.dumps(docs, indent=1))
            else:
                _print_tables(docs)
    return 0


def _print_warm(replies: list[pb.WarmCacheReply | KvError]) -> int:
    """One line per node; exit status 1 when a node could not be warmed."""
    failed = 0
    for reply in replies:
        if isinstance(reply, KvError):
            failed += 1
            console.print(f"[red]{type(reply).__name__}[/red]: {reply}", highlight=False)
            continue
        full = " (cache full)" if reply.cache_full else ""
        console.print(
            f"{reply.node_id}: {reply.rows_cached:,} rows cached{full}; cache {reply.cache_bytes / 2**20:,.1f} MiB",
            highlight=False,
        )
    return 1 if failed else 0


def cmd_load(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    ids = np.load(args.ids, mmap_mode="r")
    vectors = np.load(args.vectors, mmap_mode="r")
    if len(ids) != len(vectors):
        raise ClientError(f"--ids has {len(ids)} rows but --vectors has {len(vectors)}; counts must match")
    if args.batch_size < 1:
        raise ClientError(f"--batch-size {args.batch_size} must be >= 1")
    with Client(_seeds(args), deadline_s=30.0) as kv, tqdm(total=len(ids), unit="key", unit_scale=True) as bar:
        for start in range(0, len(ids), args.batch_size):
            stop = start + args.batch_size
            kv.put(args.table, np.asarray(ids[start:stop]), np.asarray(vectors[start:stop]))
            bar.update(min(stop, len(ids)) - start)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with Client(_seeds(args)) as kv:
        res = kv.get(args.table, np.array(args.ids, dtype=np.uint64))
    rows = [
        {"id": i, "found": bool(f), "vector": v.tolist()}
        for i, f, v in zip(args.ids, res.found, res.values, strict=True)
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        vec = np.array(row["vector"])
        shown = np.array2string(vec[:8], precision=4, separator=", ") + (" ..." if len(vec) > 8 else "")
        console.print(f"{row['id']}: {'found' if row['found'] else 'missing'} {shown}", highlight=False)
    return 0


def cmd_replica(args: argparse.Namespace) -> int:
    from kvstore.replica_ops import ReplicaOps, describe

    if args.timeout <= 0:
        raise ClientError(f"--timeout {args.timeout} must be > 0")

    async def run() -> dict[str, Any]:
        async with ReplicaOps(_seeds(args), deadline_s=args.timeout) as ops:
            if args.action == "add":
                return describe(await ops.add(args.partition, args.node, max_lag=args.max_lag))
            if args.action == "remove":
                return describe(await ops.remove(args.partition, args.node))
            leader = await ops.transfer(args.partition, args.to)
            return {"partition": args.partition, "leader": leader}

    doc = asyncio.run(run())
    if args.json:
        print(json.dumps(doc))
    elif args.action == "transfer":
        console.print(f"partition {doc['partition']}: leader is now {doc['leader']}")
    else:
        done = "added to" if args.action == "add" else "removed from"
        console.print(
            f"{args.node} {done} partition {doc['partition']}: members {', '.join(doc['members'])}, "
            f"leader {doc['leader']}, commit index {doc['commit_index']}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kvstore.demo import run_demo

    return run_demo(args)


COMMANDS = {
    "node": cmd_node,
    "cluster": cmd_cluster,
    "status": cmd_status,
    "table": cmd_table,
    "load": cmd_load,
    "get": cmd_get,
    "demo": cmd_demo,
    "replica": cmd_replica,
}


if __name__ == "__main__":
    sys.exit(main())
