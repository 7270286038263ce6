"""Helpers for tests of replicated clusters: reach one node directly, see its Raft groups."""

from __future__ import annotations

import grpc
import numpy as np

from kvclient._aio import RetryPolicy
from kvclient._codec import pack_ids
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvclient._ring import partitions_of
from kvstore.launcher import LocalCluster
from kvstore.meta_group import META_GROUP

PATIENT = RetryPolicy(max_attempts=40, backoff_s=0.02, max_backoff_s=0.2)
"""Retries that outlast an election (1-2 s) on a busy machine."""


def address(cluster: LocalCluster, node_id: str) -> str:
    return next(n.address for n in cluster.nodes if n.node_id == node_id)


def partition_groups(cluster: LocalCluster, node_id: str) -> list[pb.GroupStatus]:
    """`node_id`'s view of each partition group it holds (not the metadata group)."""
    with grpc.insecure_channel(address(cluster, node_id)) as channel:
        resp = pb_grpc.AdminStub(channel).GetPartitionStatus(pb.PartitionStatusRequest(), timeout=5.0)
    return [g for g in resp.groups if g.partition != META_GROUP]


def partition_leaders(cluster: LocalCluster) -> dict[int, str]:
    """Partition -> node that reports itself leader (only nodes that answer)."""
    out: dict[int, str] = {}
    for node in cluster.running():
        try:
            out.update({g.partition: node.node_id for g in partition_groups(cluster, node.node_id) if g.is_leader})
        except grpc.RpcError:
            continue
    return out


def read_direct(
    cluster: LocalCluster, node_id: str, table: str, ids: np.ndarray, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unary MultiGet to one node (no client routing): (found, rows as float32, zeros where missing)."""
    with grpc.insecure_channel(address(cluster, node_id)) as channel:
        resp = pb_grpc.DataStub(channel).MultiGet(pb.GetRequest(table=table, ids=pack_ids(ids)), timeout=5.0)
    found = np.frombuffer(resp.found, dtype=np.bool_)
    rows = np.zeros((len(ids), dim), dtype=np.float32)
    rows[found] = np.frombuffer(resp.values, dtype="<f4").reshape(-1, dim)
    return found, rows


def ids_of_partition(table: str, keys: int, partitions: int, part: int) -> np.ndarray:
    """The ids below `keys` that hash to partition `part` of `table`."""
    ids = np.arange(keys, dtype=np.uint64)
    return ids[partitions_of(table, ids, partitions) == part]
