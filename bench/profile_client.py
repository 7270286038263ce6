"""Where the time of one `get` of K=1000 ids goes: client side (per stage) and server side.

Starts a local cluster on 127.0.0.1 (3 nodes by default), loads N keys, and drives
`AsyncClient.get(table, ids)` in a closed loop on this thread's event loop (`asyncio.run`),
so every profiler sees the event loop too. Four views, each bounded in batches and time:

1. **un-profiled** loop: wall per batch, CPU of the main thread (`time.thread_time`), CPU of
   the whole process split user/sys (the difference is gRPC's own poller thread);
2. **cProfile** (wall clock) over the same loop; each stage is the cumulative time of its
   anchor functions minus the anchors nested in them (see `CLIENT_STAGES`); what no anchor
   covers is asyncio + grpc.aio + connection machinery;
3. **py-spy** sampling of this process (`--idle`, so waiting shows too) at low overhead;
   each sample goes to the stage of the innermost anchor on its stack — the cross-check of
   view 2 without cProfile's per-call overhead;
4. **micro-timings**: the pure stages (`as_ids`, `dedupe`, `group_by_node`, request build,
   `SerializeToString`, `DataResponse.FromString`, `VectorMerge`) called directly on the same
   data, un-profiled, median µs per batch.

Server side: py-spy `--native` records one node for a few seconds while 8 callers load the
cluster; samples are split by innermost Python anchor and by native library, and scaled
to µs of that node's CPU per request (from /proc/<pid>/stat and the node's request count).

py-spy is optional (`.venv/bin/pip install py-spy`); without it views 3 and the server
profile are skipped. Malloc thresholds: as bench/transport.py (re-exec with them).

    .venv/bin/python bench/profile_client.py --out /tmp/profile.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import os
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.scratch import scratch_cluster
from kvclient import AsyncClient
from kvclient._batch import KeyStatus, VectorMerge, choose_replicas, dedupe, group_by_node
from kvclient._codec import NUMPY_DTYPES, as_ids, default_row, pack_ids
from kvclient._connection import NodeConnection
from kvclient._proto import kvstore_pb2 as pb
from kvclient._results import GetResult
from kvclient._ring import partitions_of
from kvstore.config import NodeConfig
from kvstore.data_service import DataService
from kvstore.launcher import MALLOC_ENV
from kvstore.rocks_engine import RocksEngine
from kvstore.state import NodeState
from kvstore.store import Store

TABLE = "bench_profile"
_REEXEC_MARK = "KVSTORE_BENCH_REEXEC"
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
MACHINERY = "asyncio + grpc.aio + connection machinery"
WAIT = "wait: event loop idle in epoll (network + servers)"

# (stage, file suffix, function name). The stage of a sample or of profiled time is that of
# the innermost anchor around it. Anchors listed under MACHINERY exist so that time in
# their bodies is not charged to an enclosing anchor (`get`).
CLIENT_STAGES: list[tuple[str, str, str]] = [
    ("validate/dedupe/hash/group", "kvclient/_codec.py", "as_ids"),
    ("validate/dedupe/hash/group", "kvclient/_aio.py", "_schema"),
    ("validate/dedupe/hash/group", "kvclient/_batch.py", "dedupe"),
    ("validate/dedupe/hash/group", "kvclient/_batch.py", "__init__"),  # VectorMerge()
    ("validate/dedupe/hash/group", "kvclient/_codec.py", "default_row"),
    ("validate/dedupe/hash/group", "kvclient/_aio.py", "_routes"),
    ("validate/dedupe/hash/group", "kvclient/_batch.py", "group_by_node"),
    ("request build (pb objects, pack_ids)", "kvclient/_aio.py", "build"),
    ("serialise (SerializeToString)", "grpc/_common.py", "serialize"),
    ("gRPC send (C-core write, syscalls)", "grpc/aio/_call.py", "_write"),
    ("gRPC unary call (C-core send+receive)", "grpc/aio/_call.py", "_invoke"),
    (WAIT, "selectors.py", "select"),
    ("gRPC receive (C-core -> bytes)", "grpc/aio/_call.py", "_read"),
    ("deserialise (FromString)", "grpc/_common.py", "deserialize"),
    ("merge (frombuffer, VectorMerge, result)", "kvclient/_batch.py", "add"),
    ("merge (frombuffer, VectorMerge, result)", "kvclient/_batch.py", "result"),
    ("merge (frombuffer, VectorMerge, result)", "kvclient/_aio.py", "get"),  # get's own body
    (MACHINERY, "kvclient/_aio.py", "_scatter"),
    (MACHINERY, "kvclient/_aio.py", "_send"),
]

# Server anchors (py-spy frames of a node): innermost wins.
SERVER_STAGES: list[tuple[str, str, str]] = [
    ("route: unpack ids, hash, ownership", "kvstore/data_service.py", "_route"),
    ("cache lookup (dict per key)", "kvstore/lru.py", "lookup"),
    ("cache gather (numpy rows)", "kvstore/lru.py", "rows"),
    ("store: get_vectors body (masks, copies)", "kvstore/store.py", "get_vectors"),
    ("store: RocksDB misses", "kvstore/store.py", "_read_misses"),
    ("response build (tobytes, pb.GetResponse)", "kvstore/data_service.py", "_get"),
    ("handle (dispatch, DataResponse wrap)", "kvstore/data_service.py", "handle"),
    ("Session / unary handler body", "kvstore/data_service.py", "Session"),
    ("Session / unary handler body", "kvstore/data_service.py", "MultiGet"),
]


# ---- small helpers ----


def proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def ctx_switches(path: str) -> tuple[int, int]:
    """Return (voluntary, involuntary) context switches from a /proc .../status file (0s if gone)."""
    vol = invol = 0
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    invol = int(line.split()[1])
    except OSError:
        pass
    return vol, invol


def process_ctx_switches(pid: int) -> tuple[int, int]:
    """Sum (voluntary, involuntary) context switches over every thread of `pid`."""
    vol = invol = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        v, i = ctx_switches(f"/proc/{pid}/task/{tid}/status")
        vol, invol = vol + v, invol + i
    return vol, invol


def ensure_malloc_env(enabled: bool) -> None:
    if not enabled or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    if os.environ.get(_REEXEC_MARK):
        print("warning: malloc thresholds still missing after re-exec", file=sys.stderr)
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV, _REEXEC_MARK: "1"})


def find_py_spy() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.access(here, os.X_OK) else shutil.which("py-spy")


_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_frame(frame: str) -> tuple[str, str]:
    """Return (function name, file) of one py-spy raw frame 'qual.name (path/file.py:12)'."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("name"), m.group("file")


def read_raw(path: str) -> list[tuple[list[str], int]]:
    """Read py-spy's raw (collapsed) output: one 'frame;frame;... count' per line."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            out.append((stack.split(";"), int(count)))
    return out


def stage_of_stack(frames: list[str], anchors: list[tuple[str, str, str]], default: str) -> str:
    for frame in reversed(frames):
        name, file = parse_frame(frame)
        short = name.rsplit(".", 1)[-1]
        for stage, suffix, func in anchors:
            if short == func and file.endswith(suffix):
                return stage
    return default


# ---- workload ----


@dataclass
class Setup:
    seeds: list[str]
    pids: list[int]
    vectors: npt.NDArray[np.float32]
    batches: list[npt.NDArray[np.uint64]]


async def load(kv: AsyncClient, keys: int, dim: int) -> npt.NDArray[np.float32]:
    await kv.create_table(TABLE, dim=dim, if_not_exists=True)
    vectors = np.random.default_rng(7).standard_normal((keys, dim), dtype=np.float32)
    ids = np.arange(keys, dtype=np.uint64)
    for start in range(0, keys, 50_000):
        await kv.put(TABLE, ids[start : start + 50_000], vectors[start : start + 50_000])
    return vectors


async def closed_loop(kv: AsyncClient, s: Setup, batches: int, seconds: float, callers: int = 1) -> tuple[int, float]:
    """Run `get` back to back (per caller) until `batches` or `seconds`; return (count, wall)."""
    end = time.perf_counter() + seconds
    cap = max(1, batches // callers)

    async def one(offset: int) -> int:
        n = 0
        while n < cap and time.perf_counter() < end:
            await kv.get(TABLE, s.batches[(offset + n * callers) % len(s.batches)])
            n += 1
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(callers)))
    return sum(counts), time.perf_counter() - t0


# ---- view 1: un-profiled ----


async def unprofiled(kv: AsyncClient, s: Setup, batches: int, seconds: float) -> dict[str, float]:
    lat = []
    ru0, th0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
    node0 = [proc_cpu_s(p) for p in s.pids]
    cs_main0, cs_nodes0 = ctx_switches("/proc/thread-self/status"), [process_ctx_switches(p) for p in s.pids]
    t_start = time.perf_counter()
    end = t_start + seconds
    n = 0
    while n < batches and time.perf_counter() < end:
        t0 = time.perf_counter()
        await kv.get(TABLE, s.batches[n % len(s.batches)])
        lat.append(time.perf_counter() - t0)
        n += 1
    wall = time.perf_counter() - t_start
    th1, ru1 = time.thread_time(), resource.getrusage(resource.RUSAGE_SELF)
    node1 = [proc_cpu_s(p) for p in s.pids]
    cs_main1, cs_nodes1 = ctx_switches("/proc/thread-self/status"), [process_ctx_switches(p) for p in s.pids]
    us = 1e6 / n
    main_cpu = (th1 - th0) * us
    user, sys_ = (ru1.ru_utime - ru0.ru_utime) * us, (ru1.ru_stime - ru0.ru_stime) * us
    return {
        "batches": n,
        "wall_us_per_batch": wall * us,
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": float(np.percentile(lat, 99) * 1e6),
        "main_thread_cpu_us": main_cpu,
        "process_user_us": user,
        "process_sys_us": sys_,
        "other_threads_cpu_us": user + sys_ - main_cpu,
        "main_thread_not_on_cpu_us": wall * us - main_cpu,
        "server_cpu_us_sum_nodes": sum(b - a for a, b in zip(node0, node1, strict=True)) * us,
        "main_thread_voluntary_cs": (cs_main1[0] - cs_main0[0]) / n,
        "main_thread_involuntary_cs": (cs_main1[1] - cs_main0[1]) / n,
        "server_voluntary_cs_sum_nodes": sum(b[0] - a[0] for a, b in zip(cs_nodes0, cs_nodes1, strict=True)) / n,
        "server_involuntary_cs_sum_nodes": sum(b[1] - a[1] for a, b in zip(cs_nodes0, cs_nodes1, strict=True)) / n,
    }


# ---- view 2: cProfile ----


def _key_matches(key: tuple[str, int, str], suffix: str, func: str) -> bool:
    return key[2] == func and key[0].endswith(suffix)


def cprofile_stages(stats: pstats.Stats, total_s: float, batches: int) -> dict[str, Any]:
    """Exclusive cumulative time per stage: anchor cumtime minus anchors called from it."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    anchor_keys: dict[Any, str] = {}
    for key in raw:
        for stage, suffix, func in CLIENT_STAGES:
            if _key_matches(key, suffix, func):
                anchor_keys[key] = stage
    per_stage: dict[str, float] = collections.defaultdict(float)
    per_anchor: dict[str, float] = {}
    for key, stage in anchor_keys.items():
        cumtime = raw[key][3]
        nested = 0.0
        for other in anchor_keys:
            edge = raw[other][4].get(key)  # callers of `other` include `key`?
            if edge is not None and other != key:
                nested += edge[3]
        excl = max(0.0, cumtime - nested)
        per_stage[stage] += excl
        per_anchor[f"{key[0].rsplit('/', 2)[-2]}/{key[0].rsplit('/', 1)[-1]}:{key[2]}"] = excl * 1e6 / batches
    per_stage[MACHINERY] += max(0.0, total_s - sum(per_stage.values()))
    return {
        "us_per_batch": {k: v * 1e6 / batches for k, v in sorted(per_stage.items(), key=lambda x: -x[1])},
        "share": {k: v / total_s for k, v in per_stage.items()},
        "anchors_us_per_batch": dict(sorted(per_anchor.items(), key=lambda x: -x[1])),
    }


def cprofile_top(stats: pstats.Stats, batches: int, n: int = 25) -> list[dict[str, Any]]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(raw.items(), key=lambda kv: -kv[1][2])[:n]
    return [
        {
            "function": f"{_short_path(k[0])}:{k[1]}({k[2]})",
            "calls_per_batch": round(v[1] / batches, 2),
            "tottime_us_per_batch": round(v[2] * 1e6 / batches, 1),
            "cumtime_us_per_batch": round(v[3] * 1e6 / batches, 1),
        }
        for k, v in rows
    ]


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/client/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


async def profiled(kv: AsyncClient, s: Setup, batches: int, seconds: float) -> dict[str, Any]:
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    n, _ = await closed_loop(kv, s, batches, seconds)
    total = time.perf_counter() - t0
    prof.disable()
    stats = pstats.Stats(prof)
    return {
        "batches": n,
        "wall_us_per_batch": total * 1e6 / n,
        **cprofile_stages(stats, total, n),
        "top_tottime": cprofile_top(stats, n),
    }


# ---- view 3: py-spy on this process ----


async def spy_self(
    kv: AsyncClient, s: Setup, py_spy: str, seconds: float, rate: int, out_dir: str, tag: str
) -> dict[str, Any]:
    path = os.path.join(out_dir, f"client-{tag}.raw.txt")
    cmd = [
        py_spy,
        "record",
        "-p",
        str(os.getpid()),
        "-d",
        str(int(seconds)),
        "-r",
        str(rate),
        "--idle",
        "--threads",
        "-f",
        "raw",
        "-o",
        path,
    ]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The load starts at once and outlasts the recording, so no sample sees an idle loop.
    n, wall = await closed_loop(kv, s, 1_000_000, seconds + 1.0)
    try:
        _, err = await asyncio.get_running_loop().run_in_executor(None, lambda: spy.communicate(timeout=30))
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
        return {"error": "py-spy did not finish"}
    if spy.returncode != 0 or not os.path.exists(path):
        return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    samples = read_raw(path)
    main = [(fr, c) for fr, c in samples if "MainThread" in fr[0]]
    total = sum(c for _, c in main) or 1
    stages: collections.Counter[str] = collections.Counter()
    for frames, count in main:
        stages[stage_of_stack(frames, CLIENT_STAGES, MACHINERY)] += count
    wall_us = wall * 1e6 / max(1, n)
    # The sampler pauses the process, so the loop ran slower: scale shares by this window's wall/batch.
    return {
        "batches": n,
        "wall_us_per_batch": wall_us,
        "samples_main_thread": total,
        "raw_file": path,
        "us_per_batch": {k: v / total * wall_us for k, v in stages.most_common()},
        "share": {k: v / total for k, v in stages.most_common()},
        "top_self_main_thread": _top_leaves(main, total, 15),
        "other_threads_samples": sum(c for fr, c in samples if "MainThread" not in fr[0]),
    }


def _top_leaves(samples: list[tuple[list[str], int]], total: int, n: int) -> list[tuple[str, float]]:
    leaves: collections.Counter[str] = collections.Counter()
    for frames, count in samples:
        leaves[re.sub(r"0x[0-9a-f]+ ", "", frames[-1])] += count
    return [(k, round(v / total, 4)) for k, v in leaves.most_common(n)]


def _top_inclusive(samples: list[tuple[list[str], int]], total: int, n: int) -> list[tuple[str, float]]:
    incl: collections.Counter[str] = collections.Counter()
    for frames, count in samples:
        for name in {parse_frame(f)[0] + " (" + parse_frame(f)[1] + ")" for f in frames[1:] if "(" in f}:
            incl[name] += count
    return [(k, round(v / total, 4)) for k, v in incl.most_common(n)]


# ---- view 4: micro-timings of the pure stages ----


def _median_us(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


async def micro(kv: AsyncClient, s: Setup, reps: int) -> dict[str, float]:
    view = kv.view
    schema = view.table(TABLE)
    ids = s.batches[0]
    id_arr = as_ids(ids)
    uniq = dedupe(id_arr)
    routes = choose_replicas(view.replica_index, np.zeros(len(view.node_ids)))
    todo = np.arange(len(uniq.ids), dtype=np.intp)
    groups = group_by_node(TABLE, uniq.ids, todo, view.partitions, routes)

    def build_all() -> list[pb.DataRequest]:
        return [
            pb.DataRequest(get=pb.GetRequest(table=TABLE, ids=pack_ids(uniq.ids[g.positions]), epoch=view.epoch))
            for g in groups
        ]

    reqs = build_all()
    wire_reqs = [r.SerializeToString() for r in reqs]
    conns = [NodeConnection(view.node_ids[g.node], view.addresses[view.node_ids[g.node]], "stream") for g in groups]
    try:
        resps = [await c.request(r, 5.0) for c, r in zip(conns, reqs, strict=True)]
    finally:
        for c in conns:
            await c.close()
    wire_resps = [r.SerializeToString() for r in resps]

    def merge_all() -> GetResult:
        merge = VectorMerge(len(uniq.ids), default_row(schema))
        for g, resp in zip(groups, resps, strict=True):
            found = np.frombuffer(resp.get.found, dtype=np.bool_)
            rows = np.frombuffer(resp.get.values, dtype=NUMPY_DTYPES[resp.get.dtype])
            merge.add(g.positions, found, rows.reshape(-1, schema.dim))
        values, status = merge.result(uniq)
        return GetResult(values=values, found=status == KeyStatus.FOUND, status=status)

    got = merge_all()
    if not (got.found.all() and np.array_equal(got.values, s.vectors[ids.astype(np.intp)])):
        raise AssertionError("micro: merged rows differ from the loaded vectors")
    return {
        "as_ids": _median_us(lambda: as_ids(ids), reps),
        "schema lookup (view.table)": _median_us(lambda: view.table(TABLE), reps),
        "dedupe (np.unique + inverse)": _median_us(lambda: dedupe(id_arr), reps),
        "VectorMerge init (K x dim fill)": _median_us(lambda: VectorMerge(len(uniq.ids), default_row(schema)), reps),
        "choose_replicas": _median_us(lambda: choose_replicas(view.replica_index, np.zeros(len(view.node_ids))), reps),
        "partitions_of (hash)": _median_us(lambda: partitions_of(TABLE, uniq.ids, view.partitions), reps),
        "group_by_node (hash + argsort + split)": _median_us(
            lambda: group_by_node(TABLE, uniq.ids, todo, view.partitions, routes), reps
        ),
        "build requests (all nodes)": _median_us(build_all, reps),
        "SerializeToString (all nodes)": _median_us(lambda: [r.SerializeToString() for r in reqs], reps),
        "DataResponse.FromString (all nodes)": _median_us(
            lambda: [pb.DataResponse.FromString(b) for b in wire_resps], reps
        ),
        "merge: frombuffer + VectorMerge.add x nodes + result": _median_us(merge_all, reps),
        "request bytes (all nodes)": float(sum(len(b) for b in wire_reqs)),
        "response bytes (all nodes)": float(sum(len(b) for b in wire_resps)),
        "nodes per batch": float(len(groups)),
    }


# ---- view 5: the node's request handler in process, without gRPC ----


def handler_floor(kv: AsyncClient, s: Setup, keys: int, tmp: str, passes: int = 3) -> dict[str, float]:
    """Time `DataService.handle` on a real Store for the exact requests node 1 gets.

    A Store over RocksDB in `tmp` adopts the running cluster's map as node 1, loads node 1's
    share of the keys through `handle` (so its cache is warm, as on the node), then serves the
    get requests the client would send node 1 for the benchmark batches.
    """
    view = kv.view
    node_id = view.node_ids[0]
    config = NodeConfig(node_id=node_id, data_dir=tmp)
    os.makedirs(config.data_dir, exist_ok=True)
    store = Store(RocksEngine(config.db_path, block_cache_bytes=config.block_cache_bytes), config.cache_bytes)
    try:
        state = NodeState(config, store)
        state.apply_map(view.proto)
        svc = DataService(state)
        schema = view.table(TABLE)
        ids = np.arange(keys, dtype=np.uint64)
        local = state.current()
        mine = ids[local.owned[partitions_of(TABLE, ids, view.partitions)]]
        for start in range(0, len(mine), 50_000):
            chunk = mine[start : start + 50_000]
            put = pb.PutRequest(
                table=TABLE,
                ids=pack_ids(chunk),
                values=s.vectors[chunk.astype(np.intp)].tobytes(),
                dtype=schema.dtype,
                epoch=view.epoch,
            )
            resp = svc.handle(pb.DataRequest(put=put))
            if resp.HasField("error"):
                raise RuntimeError(f"handler floor: load failed: {resp.error}")
        routes = view.replica_index[:, 0]
        reqs = []
        for batch in s.batches:
            uniq = dedupe(as_ids(batch))
            todo = np.arange(len(uniq.ids), dtype=np.intp)
            for g in group_by_node(TABLE, uniq.ids, todo, view.partitions, routes):
                if g.node == 0:
                    get = pb.GetRequest(table=TABLE, ids=pack_ids(uniq.ids[g.positions]), epoch=view.epoch)
                    reqs.append(pb.DataRequest(get=get, request_id=1))
        wires = [r.SerializeToString() for r in reqs]
        resps = [svc.handle(r) for r in reqs]
        if any(r.HasField("error") for r in resps):
            raise RuntimeError("handler floor: a get failed")
        cache = store._vectors[schema.table_id]
        parsed = [(np.frombuffer(r.get.ids, "<u8"), r.get.ids) for r in reqs]
        parts = [partitions_of(TABLE, i, view.partitions) for i, _ in parsed]

        def per_call(fn: Callable[[int], object]) -> float:
            t0 = time.perf_counter()
            for _ in range(passes):
                for i in range(len(reqs)):
                    fn(i)
            return (time.perf_counter() - t0) * 1e6 / (passes * len(reqs))

        wire_resps = [r.SerializeToString() for r in resps]
        return {
            "requests timed": float(len(reqs) * passes),
            "ids per request (mean)": float(np.mean([len(i) for i, _ in parsed])),
            "parse request (DataRequest.FromString)": per_call(lambda i: pb.DataRequest.FromString(wires[i])),
            "handle() total": per_call(lambda i: svc.handle(reqs[i])),
            "  _route (unpack ids, hash, ownership)": per_call(lambda i: svc._route(TABLE, parsed[i][1])),
            "  VectorCache.lookup": per_call(lambda i: cache.lookup(parsed[i][0])),
            "  Store.get_vectors (lookup + gather + copies)": per_call(
                lambda i: store.get_vectors(schema, parsed[i][0], parts[i])
            ),
            "serialise response (SerializeToString)": per_call(lambda i: resps[i].SerializeToString()),
            "response bytes (mean)": float(np.mean([len(w) for w in wire_resps])),
        }
    finally:
        store.close()


# ---- server: py-spy --native on one node under load ----


async def spy_node(
    kv: AsyncClient,
    s: Setup,
    py_spy: str,
    node: int,
    seconds: float,
    rate: int,
    callers: int,
    out_dir: str,
    native: bool,
) -> dict[str, Any]:
    pid = s.pids[node]
    path = os.path.join(out_dir, f"node{node + 1}.raw.txt")
    cmd = [
        py_spy,
        "record",
        "-p",
        str(pid),
        "-d",
        str(int(seconds)),
        "-r",
        str(rate),
        "--threads",
        "-f",
        "raw",
        "-o",
        path,
    ]
    if native:
        cmd.append("--native")
    stats0 = await kv.node_stats()
    cpu0 = proc_cpu_s(pid)
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    n, wall = await closed_loop(kv, s, 1_000_000, seconds + 1.0, callers)
    try:
        _, err = await asyncio.get_running_loop().run_in_executor(None, lambda: spy.communicate(timeout=30))
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
        return {"error": "py-spy did not finish"}
    cpu1 = proc_cpu_s(pid)
    stats1 = await kv.node_stats()
    if spy.returncode != 0 or not os.path.exists(path):
        return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    s0, s1 = stats0[node], stats1[node]
    requests = int(s1.requests - s0.requests) if isinstance(s1, pb.NodeStats) and isinstance(s0, pb.NodeStats) else n
    cpu_us_per_req = (cpu1 - cpu0) * 1e6 / max(1, requests)
    samples = read_raw(path)
    # py-spy --native also samples threads blocked in epoll_wait: that is idle, not CPU.
    busy = [(fr, c) for fr, c in samples if not _is_idle(fr[-1])]
    idle = sum(c for fr, c in samples) - sum(c for _, c in busy)
    total = sum(c for _, c in busy) or 1
    by_thread: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    libs: collections.Counter[str] = collections.Counter()
    pairs: collections.Counter[str] = collections.Counter()
    for frames, count in busy:
        thread = _thread_name(frames[0])
        lib = _native_lib(frames[-1])
        stage = stage_of_stack(frames, SERVER_STAGES, "")
        if not stage:
            stage = "gRPC poller thread" if "poll" in thread else f"event loop outside handlers: {lib}"
        by_thread[thread] += count
        stages[stage] += count
        libs[lib] += count
        pairs[f"{stage} | {lib}"] += count
    return {
        "node": node + 1,
        "pid": pid,
        "callers": callers,
        "batches": n,
        "wall_s": wall,
        "requests": requests,
        "node_cpu_us_per_request": cpu_us_per_req,
        "samples": total,
        "idle_samples_excluded": idle,
        "raw_file": path,
        "native": native,
        "threads_share": {k: round(v / total, 4) for k, v in by_thread.most_common()},
        "stage_share": {k: round(v / total, 4) for k, v in stages.most_common()},
        "stage_us_per_request": {k: v / total * cpu_us_per_req for k, v in stages.most_common()},
        "leaf_library_share": {k: round(v / total, 4) for k, v in libs.most_common(14)},
        "stage_x_leaf_share": {k: round(v / total, 4) for k, v in pairs.most_common(20)},
        "top_self": _top_leaves(busy, total, 20),
        "top_inclusive_python": [x for x in _top_inclusive(busy, total, 40) if ".py" in x[0]][:25],
    }


def _is_idle(leaf: str) -> bool:
    name, _ = parse_frame(re.sub(r"0x[0-9a-f]+ ", "", leaf))
    return name in ("epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pthread_cond_timedwait")


def _thread_name(frame: str) -> str:
    return frame.split(":", 1)[1].strip() if ":" in frame else frame


def _native_lib(frame: str) -> str:
    name, file = parse_frame(frame)
    if file.endswith(".py") or ".py:" in frame:
        return "python code (interpreter)"
    if file.endswith((".c", ".h")):
        return "CPython runtime (C)"
    m = re.search(r"([\w.+-]+?)(?:\.cpython[^/]*)?\.so", file) or re.search(r"([\w.+-]+\.so[\d.]*)", file)
    lib = m.group(1) if m else (file or "?")
    if "libc.so" in file:
        return f"libc: {name.split('@')[0] if name and not name.startswith('0x') else 'unresolved'}"
    return lib


# ---- report ----


def markdown(res: dict[str, Any]) -> str:
    out = []
    for tr, r in res["transports"].items():
        u = r["unprofiled"]
        out += [
            f"### client, transport={tr}, K={res['k']}, {res['nodes']} nodes (un-profiled: {u['batches']} batches)",
            "",
            f"wall {u['wall_us_per_batch']:.0f} µs/batch (p50 {u['p50_us']:.0f}, p99 {u['p99_us']:.0f}); "
            f"main-thread CPU {u['main_thread_cpu_us']:.0f}; "
            f"process user {u['process_user_us']:.0f} + sys {u['process_sys_us']:.0f}; "
            f"other threads (gRPC poller) {u['other_threads_cpu_us']:.0f}; main thread off-CPU "
            f"{u['main_thread_not_on_cpu_us']:.0f}; servers {u['server_cpu_us_sum_nodes']:.0f} µs CPU/batch (Σ nodes)",
            "",
            f"context switches per batch: client main thread {u['main_thread_voluntary_cs']:.1f} voluntary + "
            f"{u['main_thread_involuntary_cs']:.1f} involuntary (preempted); servers (Σ threads, Σ nodes) "
            f"{u['server_voluntary_cs_sum_nodes']:.1f} + {u['server_involuntary_cs_sum_nodes']:.1f}",
            "",
        ]
        cp, sp = r["cprofile"], r.get("pyspy", {})
        stages = list(dict.fromkeys([*cp["us_per_batch"], *sp.get("us_per_batch", {})]))
        out += [
            f"| stage | cProfile µs/batch (wall {cp['wall_us_per_batch']:.0f}) | share | "
            f"py-spy µs/batch (wall {sp.get('wall_us_per_batch', 0):.0f}) | share |",
            "|---|---|---|---|---|",
        ]
        for st in stages:
            out.append(
                f"| {st} | {cp['us_per_batch'].get(st, 0):.0f} | {cp['share'].get(st, 0) * 100:.1f}% "
                f"| {sp.get('us_per_batch', {}).get(st, 0):.0f} | {sp.get('share', {}).get(st, 0) * 100:.1f}% |"
            )
        out += ["", "cProfile top by own time (µs/batch):", ""]
        out += [
            f"- {t['function']}: {t['tottime_us_per_batch']} (calls/batch {t['calls_per_batch']})"
            for t in cp["top_tottime"][:12]
        ]
        if sp.get("top_self_main_thread"):
            out += ["", "py-spy main thread, top leaf frames (share of samples):", ""]
            out += [f"- {name}: {share * 100:.1f}%" for name, share in sp["top_self_main_thread"][:10]]
        out.append("")
    m = res["micro"]
    out += [
        f"### client stages called directly, un-profiled (median µs per K={res['k']} batch)",
        "",
        "| stage | µs |",
        "|---|---|",
    ]
    out += [f"| {k} | {v:.1f} |" for k, v in m.items()]
    h = res.get("handler")
    if h:
        out += [
            "",
            "### node 1's request handler in process, no gRPC (mean µs per request)",
            "",
            "| part | µs |",
            "|---|---|",
        ]
        out += [f"| {k} | {v:.1f} |" for k, v in h.items()]
    srv = res.get("server")
    if srv and "error" not in srv:
        out += [
            "",
            f"### server: node {srv['node']} under {srv['callers']} callers (stream, K={res['k']}), "
            f"py-spy{' --native' if srv['native'] else ''}: {srv['samples']} samples, "
            f"{srv['node_cpu_us_per_request']:.0f} µs CPU per request on this node "
            f"({srv['idle_samples_excluded']} idle epoll_wait samples excluded)",
            "",
            "| stage (innermost kvstore frame) | share | µs/request |",
            "|---|---|---|",
        ]
        out += [
            f"| {k} | {v * 100:.1f}% | {srv['stage_us_per_request'][k]:.0f} |" for k, v in srv["stage_share"].items()
        ]
        out += ["", "| where the sampled thread was (leaf library / libc call) | share |", "|---|---|"]
        out += [f"| {k} | {v * 100:.1f}% |" for k, v in srv["leaf_library_share"].items()]
        out += ["", "| stage x leaf (top) | share |", "|---|---|"]
        out += [f"| {k} | {v * 100:.1f}% |" for k, v in list(srv["stage_x_leaf_share"].items())[:12]]
        out += ["", "threads: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in srv["threads_share"].items())]
        out += ["", "top inclusive Python frames (share of samples):", ""]
        out += [f"- {k}: {v * 100:.1f}%" for k, v in srv["top_inclusive_python"][:15]]
    elif srv:
        out += ["", f"server profile skipped: {srv['error']}"]
    return "\n".join(out)


# ---- main ----


async def run(args: argparse.Namespace, seeds: list[str], pids: list[int]) -> dict[str, Any]:
    py_spy = None if args.no_py_spy else find_py_spy()
    out_dir = args.spy_dir or tempfile.mkdtemp(prefix="kvstore-pyspy-")
    os.makedirs(out_dir, exist_ok=True)
    result: dict[str, Any] = {
        "k": args.k,
        "nodes": args.nodes,
        "keys": args.keys,
        "py_spy": py_spy,
        "spy_dir": out_dir,
        "transports": {},
    }
    async with AsyncClient(seeds, deadline_s=10.0, transport="stream") as loader:
        vectors = await load(loader, args.keys, args.dim)
    rng = np.random.default_rng(11)
    setup = Setup(seeds, pids, vectors, [rng.integers(0, args.keys, args.k, dtype=np.uint64) for _ in range(64)])
    for tr in args.transports:
        async with AsyncClient(seeds, deadline_s=10.0, transport=tr) as kv:
            await closed_loop(kv, setup, 200, 1.0)  # warm-up: streams open, caches hot
            r: dict[str, Any] = {"unprofiled": await unprofiled(kv, setup, args.batches, args.seconds)}
            print(f"[{tr}] un-profiled: {r['unprofiled']['wall_us_per_batch']:.0f} µs/batch", flush=True)
            r["cprofile"] = await profiled(kv, setup, args.batches, args.seconds)
            print(f"[{tr}] cProfile done", flush=True)
            if py_spy:
                r["pyspy"] = await spy_self(kv, setup, py_spy, args.spy_seconds, args.spy_rate, out_dir, tr)
                print(f"[{tr}] py-spy on client done", flush=True)
            result["transports"][tr] = r
    async with AsyncClient(seeds, deadline_s=10.0, transport="stream") as kv:
        result["micro"] = await micro(kv, setup, args.reps)
        floor_dir = tempfile.mkdtemp(prefix="kvstore-handler-floor-")
        try:
            result["handler"] = handler_floor(kv, setup, args.keys, floor_dir)
        finally:
            shutil.rmtree(floor_dir, ignore_errors=True)
        print("in-process handler timed", flush=True)
        if py_spy and not args.no_server:
            result["server"] = await spy_node(
                kv, setup, py_spy, 0, args.spy_seconds, args.spy_rate, args.callers, out_dir, not args.no_native
            )
            print("py-spy on node 1 done", flush=True)
        elif args.no_py_spy:
            result["server"] = {"error": "--no-py-spy"}
        elif not py_spy:
            result["server"] = {"error": "py-spy not found (.venv/bin/pip install py-spy)"}
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, choices=[1, 3], default=3)
    p.add_argument("--keys", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("-k", type=int, default=1000, help="ids per get (default 1000)")
    p.add_argument("--transports", default="stream,unary", help="comma-separated (default stream,unary)")
    p.add_argument("--batches", type=int, default=2000, help="batches per view, at most (default 2000)")
    p.add_argument("--seconds", type=float, default=6.0, help="seconds per view, at most (default 6)")
    p.add_argument("--reps", type=int, default=300, help="repetitions per micro-timing (default 300)")
    p.add_argument("--spy-seconds", type=float, default=5.0, help="py-spy recording length (default 5)")
    p.add_argument("--spy-rate", type=int, default=200, help="py-spy samples/s (default 200)")
    p.add_argument("--callers", type=int, default=8, help="concurrent callers while profiling the node (default 8)")
    p.add_argument("--spy-dir", help="keep py-spy raw files here (default: a temporary folder)")
    p.add_argument("--no-py-spy", action="store_true")
    p.add_argument("--no-server", action="store_true", help="skip py-spy on the node")
    p.add_argument("--no-native", action="store_true", help="py-spy on the node without --native")
    p.add_argument("--no-malloc-env", action="store_true")
    p.add_argument("--dir", help="cluster folder (default: a temporary one, removed afterwards)")
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    args.transports = [t for t in args.transports.split(",") if t]
    if any(t not in ("stream", "unary") for t in args.transports):
        p.error("--transports: stream and/or unary")
    if not (
        1 <= args.k <= 100_000
        and 1 <= args.batches <= 100_000
        and 0.5 <= args.seconds <= 30
        and 2 <= args.spy_seconds <= 30
        and 1 <= args.callers <= 64
        and 1 <= args.keys <= 5_000_000
    ):
        p.error("out of bounds: -k 1..100000, --batches 1..100000, --seconds 0.5..30, --spy-seconds 2..30")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_malloc_env(not args.no_malloc_env)
    with scratch_cluster("kvstore-bench-profile-", args.dir) as cluster:
        started = time.monotonic()
        print(f"starting {args.nodes} node(s) under {cluster.root} ...", flush=True)
        seeds = cluster.up(args.nodes, replicas=1)
        pids = [n.pid for n in cluster.nodes]
        result = asyncio.run(run(args, seeds, pids))
        result["client_malloc_env"] = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
        result["total_s"] = round(time.monotonic() - started, 1)
        print()
        print(markdown(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)
            print(f"\nJSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
