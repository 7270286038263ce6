"""Cluster-map transitions: pure functions from one map (and a request) to the next.

The metadata owner (the metadata group's leader in a replicated cluster) applies them and
commits or pushes the result; every other node only adopts maps with a higher epoch. Each
function returns a new map with epoch + 1 (or the input itself when nothing changes), or
raises `ClientError` naming what is wrong; the input map is never modified.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from kvclient._codec import check_dim, check_table_name
from kvclient._errors import ClientError, UnknownTableError
from kvclient._proto import kvstore_pb2 as pb
from kvclient._ring import place
from kvstore.meta_group import meta_members

MAX_PARTITIONS = 4096


def bootstrap(nodes: Sequence[pb.NodeInfo], partitions: int, replicas: int, cluster_id: str = "") -> pb.ClusterMap:
    """Return the first map (epoch 1) of a new cluster.

    Single-copy: the first node owns metadata. Replicated: the first 3 (or 5) nodes form
    the metadata Raft group, and every node needs a Raft address.
    """
    if not nodes:
        raise ClientError("nodes: bootstrap needs at least one node", field="nodes")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids) or not all(ids):
        raise ClientError(f"nodes: node ids must be unique and non-empty, got {ids}", field="nodes")
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ClientError(f"partitions: {partitions} is not in 1..{MAX_PARTITIONS}", field="partitions")
    if replicas < 1:
        raise ClientError(f"replicas: {replicas} must be >= 1", field="replicas")
    if replicas > 1:
        lacking = [n.node_id for n in nodes if not n.raft_address]
        if lacking:
            raise ClientError(
                f"nodes: replicas > 1 needs a raft_address for every node, missing {lacking}", field="nodes"
            )
    placement = place(partitions, replicas, dict.fromkeys(ids, 1.0))
    return pb.ClusterMap(
        cluster_id=cluster_id or uuid.uuid4().hex[:12],
        epoch=1,
        partitions=partitions,
        replicas=replicas,
        nodes=list(nodes),
        placement=[pb.PartitionReplicas(node_ids=reps) for reps in placement],
        meta_node_id=ids[0],
        meta_node_ids=meta_members(ids) if replicas > 1 else [],
    )


def raft_addresses(cmap: pb.ClusterMap) -> dict[str, str]:
    """Return node id -> Raft address of every node that has one."""
    return {n.node_id: n.raft_address for n in cmap.nodes if n.raft_address}


def _next(cmap: pb.ClusterMap) -> pb.ClusterMap:
    out = pb.ClusterMap()
    out.CopyFrom(cmap)
    out.epoch = cmap.epoch + 1
    return out


def check_schema(schema: pb.TableSchema) -> None:
    """Raise `ClientError` unless `schema` is a valid new table schema."""
    check_table_name(schema.name)
    if schema.kind == pb.FEATURES:
        if schema.dim or schema.default_vector:
            raise ClientError("features tables take no dim or default", field="dim")
        return
    if schema.kind != pb.EMBEDDING:
        raise ClientError(f"kind: {schema.kind} is not EMBEDDING or FEATURES", field="kind")
    check_dim(int(schema.dim))
    if schema.dtype not in (pb.FLOAT32, pb.FLOAT16):
        raise ClientError(f"dtype: {schema.dtype} is not FLOAT32 or FLOAT16", field="dtype")
    if schema.default_vector and len(schema.default_vector) != 4 * schema.dim:
        raise ClientError(
            f"default: {len(schema.default_vector)} bytes != dim {schema.dim} float32 values",
            field="default",
        )


def _same_schema(a: pb.TableSchema, b: pb.TableSchema) -> bool:
    left, right = pb.TableSchema(), pb.TableSchema()
    left.CopyFrom(a)
    right.CopyFrom(b)
    left.table_id = right.table_id = 0
    return bool(left == right)


def create_table(cmap: pb.ClusterMap, schema: pb.TableSchema, if_not_exists: bool) -> pb.ClusterMap:
    """Return a map with `schema` added under a fresh table id.

    An existing name is an error, unless `if_not_exists` and the schema is the same (then
    the map is returned unchanged).
    """
    check_schema(schema)
    for table in cmap.tables:
        if table.name == schema.name:
            if if_not_exists and _same_schema(table, schema):
                return cmap
            raise ClientError(f"table {schema.name!r} already exists", field="table")
    out = _next(cmap)
    added = out.tables.add()
    added.CopyFrom(schema)
    # Never reuse an id: every id handed out so far is <= the epoch that added it.
    added.table_id = 1 + max([t.table_id for t in cmap.tables] + [int(cmap.epoch)])
    return out


def drop_table(cmap: pb.ClusterMap, name: str) -> pb.ClusterMap:
    """Return a map without table `name`; raises `UnknownTableError` if it is absent."""
    out = _next(cmap)
    kept = [t for t in cmap.tables if t.name != name]
    if len(kept) == len(cmap.tables):
        raise UnknownTableError(f"table {name!r} does not exist", field="table")
    del out.tables[:]
    out.tables.extend(kept)
    return out


def register_node(cmap: pb.ClusterMap, node: pb.NodeInfo) -> pb.ClusterMap:
    """Return a map with `node`'s current address; unchanged if it already matches.

    Raises `ClientError` for a node that is not a member (joining is a rebalance).
    """
    for existing in cmap.nodes:
        if existing.node_id == node.node_id:
            if existing.address == node.address:
                return cmap
            out = _next(cmap)
            for n in out.nodes:
                if n.node_id == node.node_id:
                    n.address = node.address
            return out
    raise ClientError(f"node {node.node_id!r} is not a member of cluster {cmap.cluster_id}", field="node_id")
