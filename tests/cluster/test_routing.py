"""A client with a stale map is corrected by the nodes and retries on its own."""

from __future__ import annotations

import numpy as np

from kvclient import Client
from kvclient._clustermap import ClusterView
from kvclient._proto import kvstore_pb2 as pb


def _rotated(view: ClusterView) -> ClusterView:
    """The same map with every partition pointed at the wrong node and an older epoch."""
    stale = pb.ClusterMap()
    stale.CopyFrom(view.proto)
    stale.epoch = 1
    nodes = [n.node_id for n in stale.nodes]
    for reps in stale.placement:
        owner = reps.node_ids[0]
        reps.node_ids[0] = nodes[(nodes.index(owner) + 1) % len(nodes)]
    return ClusterView.from_proto(stale)


def test_stale_map_is_refreshed_and_the_request_retried(kv: Client) -> None:
    kv.create_table("routed", dim=4)
    ids = np.arange(2000, dtype=np.uint64)
    vectors = np.random.default_rng(9).standard_normal((2000, 4)).astype(np.float32)
    kv.put("routed", ids, vectors)
    current = kv.view

    kv._aio._view = _rotated(current)  # as if this client missed a placement change
    retries = kv.stats.routing_retries
    res = kv.get("routed", ids)
    assert kv.stats.routing_retries > retries
    assert res.found.all()
    np.testing.assert_array_equal(res.values, vectors)
    assert kv.view.epoch == current.epoch

    kv._aio._view = _rotated(current)
    kv.put("routed", ids, vectors * 2)
    assert kv.view.epoch == current.epoch
    np.testing.assert_array_equal(kv.get("routed", ids).values, vectors * 2)
