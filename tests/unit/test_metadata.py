"""Cluster-map transitions: epochs only grow, table ids are never reused, inputs never change."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvclient._errors import ClientError, UnknownTableError
from kvclient._proto import kvstore_pb2 as pb
from kvstore.metadata import MAX_PARTITIONS, bootstrap, check_schema, create_table, drop_table, register_node

NAMES = ["a", "b", "c"]


def nodes(*ids: str) -> list[pb.NodeInfo]:
    return [
        pb.NodeInfo(node_id=i, address=f"127.0.0.1:{7000 + n}", raft_address=f"127.0.0.1:{8000 + n}")
        for n, i in enumerate(ids)
    ]


def embedding(name: str, dim: int = 4) -> pb.TableSchema:
    return pb.TableSchema(name=name, kind=pb.EMBEDDING, dim=dim, dtype=pb.FLOAT32)


def features(name: str) -> pb.TableSchema:
    return pb.TableSchema(name=name, kind=pb.FEATURES)


schemas = st.builds(embedding, st.sampled_from(NAMES), st.sampled_from([4, 8])) | st.builds(
    features, st.sampled_from(NAMES)
)


class MapMachine(RuleBasedStateMachine):
    """Random create/drop/register sequences against a dict of the tables that should exist."""

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, pb.TableSchema] = {}
        self.ids_handed_out: set[int] = set()

    @initialize(count=st.integers(min_value=1, max_value=4), partitions=st.integers(1, 64), replicas=st.integers(1, 4))
    def start(self, count: int, partitions: int, replicas: int) -> None:
        members = nodes(*[f"n{i}" for i in range(count)])
        self.cmap = bootstrap(members, partitions, replicas, cluster_id="c1")
        assert self.cmap.epoch == 1
        assert self.cmap.meta_node_id == "n0"
        assert [n.node_id for n in self.cmap.nodes] == [n.node_id for n in members]
        assert len(self.cmap.placement) == partitions
        assert all(len(p.node_ids) == min(replicas, count) for p in self.cmap.placement)
        meta = list(self.cmap.meta_node_ids)
        if replicas == 1:
            assert meta == []
        else:  # an odd-sized majority group where the cluster allows it, members in node order
            assert meta == [n.node_id for n in members][: len(meta)]
            assert len(meta) == min(count, 3)

    def apply(self, change: Any, *args: Any) -> tuple[pb.ClusterMap, BaseException | None]:
        """Run one transition; check it left its input alone and moved the epoch correctly."""
        before = self.cmap.SerializeToString(deterministic=True)
        try:
            out, error = change(self.cmap, *args), None
        except ClientError as exc:  # UnknownTableError is a ClientError
            out, error = self.cmap, exc
        assert self.cmap.SerializeToString(deterministic=True) == before
        if out is not self.cmap and out != self.cmap:
            assert out.epoch == self.cmap.epoch + 1
        else:
            assert out.epoch == self.cmap.epoch
        self.cmap = out
        return out, error

    @rule(schema=schemas, if_not_exists=st.booleans())
    def create(self, schema: pb.TableSchema, if_not_exists: bool) -> None:
        old = self.model.get(schema.name)
        before = self.cmap
        out, error = self.apply(create_table, schema, if_not_exists)
        if old is None:
            assert error is None
            (added,) = [t for t in out.tables if t.name == schema.name]
            assert added.table_id not in self.ids_handed_out
            assert added.table_id > 0
            self.ids_handed_out.add(added.table_id)
            self.model[schema.name] = added
        elif if_not_exists and old.kind == schema.kind and old.dim == schema.dim:
            assert error is None
            assert out == before
        else:
            assert type(error) is ClientError
            assert schema.name in str(error)

    @rule(name=st.sampled_from(NAMES))
    def drop(self, name: str) -> None:
        _, error = self.apply(drop_table, name)
        if name in self.model:
            assert error is None
            del self.model[name]
        else:
            assert isinstance(error, UnknownTableError)
            assert error.field == "table"

    @rule(index=st.integers(0, 5), port=st.integers(7000, 7003))
    def register(self, index: int, port: int) -> None:
        node = pb.NodeInfo(node_id=f"n{index}", address=f"127.0.0.1:{port}")
        members = {n.node_id: n.address for n in self.cmap.nodes}
        out, error = self.apply(register_node, node)
        if node.node_id not in members:
            assert type(error) is ClientError
        else:
            assert error is None
            assert {n.node_id: n.address for n in out.nodes} == {**members, node.node_id: node.address}

    @invariant()
    def tables_match_the_model(self) -> None:
        if not hasattr(self, "cmap"):
            return
        assert {t.name: t for t in self.cmap.tables} == self.model


TestMapTransitions = MapMachine.TestCase


@pytest.mark.parametrize(
    "members,partitions,replicas,field",
    [
        ([], 8, 1, "nodes"),
        (nodes("a", "a"), 8, 1, "nodes"),
        (nodes("a", ""), 8, 1, "nodes"),
        (nodes("a"), 0, 1, "partitions"),
        (nodes("a"), MAX_PARTITIONS + 1, 1, "partitions"),
        (nodes("a"), 8, 0, "replicas"),
        ([pb.NodeInfo(node_id="a", address="127.0.0.1:1")], 8, 2, "nodes"),
    ],
)
def test_bootstrap_rejects_bad_arguments(
    members: list[pb.NodeInfo], partitions: int, replicas: int, field: str
) -> None:
    with pytest.raises(ClientError) as info:
        bootstrap(members, partitions, replicas)
    assert info.value.field == field


def test_bootstrap_gives_each_cluster_its_own_id() -> None:
    assert bootstrap(nodes("a"), 4, 1).cluster_id != bootstrap(nodes("a"), 4, 1).cluster_id


@pytest.mark.parametrize(
    "schema,field",
    [
        (pb.TableSchema(name="t", kind=pb.FEATURES, dim=4), "dim"),
        (pb.TableSchema(name="t", kind=pb.KIND_UNSPECIFIED), "kind"),
        (pb.TableSchema(name="t", kind=pb.EMBEDDING, dim=0, dtype=pb.FLOAT32), "dim"),
        (pb.TableSchema(name="t", kind=pb.EMBEDDING, dim=4), "dtype"),
        (pb.TableSchema(name="t", kind=pb.EMBEDDING, dim=4, dtype=pb.FLOAT32, default_vector=b"\0" * 15), "default"),
        (pb.TableSchema(name="bad name", kind=pb.FEATURES), "table"),
    ],
)
def test_invalid_schemas_are_client_errors_naming_the_field(schema: pb.TableSchema, field: str) -> None:
    cmap = bootstrap(nodes("a"), 4, 1)
    with pytest.raises(ClientError) as info:
        check_schema(schema)
    assert info.value.field == field
    with pytest.raises(ClientError):
        create_table(cmap, schema, if_not_exists=False)


def test_create_ignores_a_caller_supplied_table_id() -> None:
    cmap = create_table(bootstrap(nodes("a"), 4, 1), embedding("a"), False)
    taken = cmap.tables[0].table_id
    forged = embedding("b")
    forged.table_id = taken
    out = create_table(cmap, forged, False)
    assert [t.table_id for t in out.tables if t.name == "b"] != [taken]
    assert forged.table_id == taken  # the caller's schema is not modified either


@pytest.mark.parametrize(("count", "size"), [(5, 5), (7, 5)])
def test_large_clusters_get_five_metadata_members(count: int, size: int) -> None:
    cmap = bootstrap(nodes(*[f"n{i}" for i in range(count)]), 8, 3)
    assert len(cmap.meta_node_ids) == size
    assert len(set(cmap.meta_node_ids)) == size
