"""Unary calls vs the shared bidirectional stream: latency, throughput and server CPU per request.

Starts a local cluster on 127.0.0.1 (3 nodes by default), loads N keys x dim float32, then
rotates through every variant (K x client mode x transport) in short slices, several rounds,
so machine noise hits all variants equally (`notes/performance-floors.md`, "side by side").
Client modes:

- `sync-c1`: the blocking `Client`, one caller, back to back (closed loop) — what a threaded
  ranking service sees, including the hop to the client's loop thread;
- `aio-c1`:  `AsyncClient` on this thread's event loop, one caller, closed loop;
- `aio-c8`:  `AsyncClient`, 8 callers (`asyncio.gather` of 8 closed loops) — throughput.

Per variant: p50/p99/p99.9 of each `get` (HDR histogram, µs), requests/s and keys/s over the
measured slices, server CPU per request (utime+stime of every node process from
/proc/<pid>/stat, summed over nodes) and client CPU per request (getrusage of this process,
all threads). Prints Markdown tables and writes JSON to --out.

Malloc: glibc returns every large freed buffer to the OS (mmap/munmap per 256 KB reply);
`grpc-call-cost.md` measured that `MALLOC_MMAP_THRESHOLD_=67108864` and
`MALLOC_TRIM_THRESHOLD_=268435456` halve K=1000 latency. The launcher sets them for the node
processes; client processes should set them too. glibc reads them once at start, so this
script re-executes itself with them when they are missing (`--no-malloc-env` to compare).

Bounded: every loop stops by count and by time; the cluster is always stopped. Example:

    .venv/bin/python bench/transport.py --out /tmp/transport.json
    .venv/bin/python bench/transport.py --nodes 1 --rounds 3 --out /tmp/transport-1node.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from hdrh.histogram import HdrHistogram

from bench.scratch import scratch_cluster
from kvclient import AsyncClient, Client
from kvclient._connection import Transport
from kvstore.launcher import MALLOC_ENV

TABLE = "bench_transport"
TRANSPORTS: tuple[Transport, ...] = ("unary", "stream")
MODES = ("sync-c1", "aio-c1", "aio-c8")
MAX_REQUESTS_PER_SLICE = 200_000  # a hard cap next to the time bound
_REEXEC_MARK = "KVSTORE_BENCH_REEXEC"
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


# ---- measurement records ----


@dataclass
class Variant:
    """One cell of the comparison and everything measured for it."""

    k: int
    mode: str
    transport: str
    hist: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    requests: int = 0
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    checked: int = 0
    slices: list[dict[str, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"K={self.k} {self.mode} {self.transport}"

    def summary(self) -> dict[str, Any]:
        n = max(1, self.requests)
        wall = max(self.wall_s, 1e-9)
        per_slice_rps = [s["requests"] / s["wall_s"] for s in self.slices if s["wall_s"] > 0]
        return {
            "k": self.k,
            "mode": self.mode,
            "transport": self.transport,
            "requests": self.requests,
            "wall_s": round(self.wall_s, 3),
            "p50_us": self.hist.get_value_at_percentile(50),
            "p99_us": self.hist.get_value_at_percentile(99),
            "p999_us": self.hist.get_value_at_percentile(99.9),
            "max_us": self.hist.get_max_value(),
            "mean_us": round(self.hist.get_mean_value(), 1),
            "req_per_s": round(self.requests / wall, 1),
            "keys_per_s": round(self.requests * self.k / wall, 1),
            "req_per_s_slice_min": round(min(per_slice_rps), 1) if per_slice_rps else 0.0,
            "req_per_s_slice_max": round(max(per_slice_rps), 1) if per_slice_rps else 0.0,
            "server_cpu_us_per_req": round(self.server_cpu_s * 1e6 / n, 1),
            "client_cpu_us_per_req": round(self.client_cpu_s * 1e6 / n, 1),
            "checked_bit_exact": self.checked,
            "slices": self.slices,
        }


def proc_cpu_s(pid: int) -> float:
    """Return utime+stime of process `pid` in seconds (all its threads), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ")" of comm: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---- the workload ----


class Workload:
    """Pre-generated id batches (RNG cost stays out of the timed region) and the truth."""

    def __init__(self, vectors: npt.NDArray[np.float32], ks: list[int], seed: int = 11) -> None:
        self.vectors = vectors
        rng = np.random.default_rng(seed)
        self.batches = {k: [rng.integers(0, len(vectors), k, dtype=np.uint64) for _ in range(64)] for k in ks}

    def ids(self, k: int, i: int) -> npt.NDArray[np.uint64]:
        return self.batches[k][i % len(self.batches[k])]

    def check(self, ids: npt.NDArray[np.uint64], values: npt.NDArray[np.float32], found: npt.NDArray[np.bool_]) -> None:
        if not (found.all() and np.array_equal(values, self.vectors[ids.astype(np.intp)])):
            raise AssertionError("a lookup returned wrong rows")


@dataclass
class Clients:
    sync: dict[str, Client]
    aio: dict[str, AsyncClient]


def run_slice(
    variant: Variant,
    clients: Clients,
    loop: asyncio.AbstractEventLoop,
    work: Workload,
    seconds: float,
    record: bool,
    pids: list[int],
    concurrency: int,
) -> None:
    """Run one variant for `seconds`; when `record`, add its latencies, counts and CPU."""
    hist = variant.hist if record else HdrHistogram(1, 60_000_000, 3)
    cpu0 = [proc_cpu_s(p) for p in pids]
    self0 = self_cpu_s()
    t0 = time.perf_counter()
    if variant.mode == "sync-c1":
        count = _sync_loop(clients.sync[variant.transport], work, variant.k, seconds, hist)
    else:
        callers = concurrency if variant.mode == "aio-c8" else 1
        count = loop.run_until_complete(
            _aio_loops(clients.aio[variant.transport], work, variant.k, seconds, hist, callers)
        )
    wall = time.perf_counter() - t0
    self1 = self_cpu_s()
    cpu1 = [proc_cpu_s(p) for p in pids]
    if not record:
        return
    server = sum(b - a for a, b in zip(cpu0, cpu1, strict=True))
    variant.requests += count
    variant.wall_s += wall
    variant.server_cpu_s += server
    variant.client_cpu_s += self1 - self0
    variant.checked += 1
    variant.slices.append(
        {
            "requests": count,
            "wall_s": round(wall, 4),
            "server_cpu_s": round(server, 3),
            "client_cpu_s": round(self1 - self0, 4),
        }
    )


def _sync_loop(kv: Client, work: Workload, k: int, seconds: float, hist: HdrHistogram) -> int:
    first = work.ids(k, 0)
    res = kv.get(TABLE, first)  # untimed; checks correctness once per slice
    work.check(first, res.values, res.found)
    count = 0
    end = time.perf_counter() + seconds
    while count < MAX_REQUESTS_PER_SLICE:
        ids = work.ids(k, count)
        t0 = time.perf_counter_ns()
        kv.get(TABLE, ids)
        t1 = time.perf_counter_ns()
        hist.record_value(max(1, (t1 - t0) // 1000))
        count += 1
        if t1 * 1e-9 >= end:
            break
    return count


async def _aio_loops(kv: AsyncClient, work: Workload, k: int, seconds: float, hist: HdrHistogram, callers: int) -> int:
    first = work.ids(k, 0)
    res = await kv.get(TABLE, first)
    work.check(first, res.values, res.found)
    end = time.perf_counter() + seconds
    cap = MAX_REQUESTS_PER_SLICE // callers

    async def one(offset: int) -> int:
        count = 0
        while count < cap:
            ids = work.ids(k, offset + count * callers)
            t0 = time.perf_counter_ns()
            await kv.get(TABLE, ids)
            t1 = time.perf_counter_ns()
            hist.record_value(max(1, (t1 - t0) // 1000))
            count += 1
            if t1 * 1e-9 >= end:
                break
        return count

    counts = await asyncio.gather(*(one(i) for i in range(callers)))
    return sum(counts)


# ---- setup ----


def load(kv: Client, keys: int, dim: int) -> tuple[npt.NDArray[np.float32], float]:
    kv.create_table(TABLE, dim=dim, if_not_exists=True)
    vectors = np.random.default_rng(7).standard_normal((keys, dim), dtype=np.float32)
    ids = np.arange(keys, dtype=np.uint64)
    t0 = time.perf_counter()
    step = 50_000
    for start in range(0, keys, step):
        kv.put(TABLE, ids[start : start + step], vectors[start : start + step])
    return vectors, time.perf_counter() - t0


async def _open_aio(seeds: list[str]) -> dict[str, AsyncClient]:
    out: dict[str, AsyncClient] = {}
    for t in TRANSPORTS:
        kv = AsyncClient(seeds, deadline_s=10.0, transport=t)
        await kv.connect()
        out[t] = kv
    return out


async def _close_aio(clients: dict[str, AsyncClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)


def ensure_malloc_env(enabled: bool) -> None:
    """Re-exec this script with the malloc thresholds if they are not in force yet."""
    if not enabled or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    if os.environ.get(_REEXEC_MARK):
        print("warning: malloc thresholds still missing after re-exec; continuing without", file=sys.stderr)
        return
    env = {**os.environ, **MALLOC_ENV, _REEXEC_MARK: "1"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, choices=[1, 3], default=3, help="node processes to start (default 3)")
    p.add_argument("--keys", type=int, default=200_000, help="keys to load (default 200,000)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension (float32; default 64)")
    p.add_argument("--ks", default="100,1000", help="batch sizes, comma-separated (default 100,1000)")
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"client modes, comma-separated (default {','.join(MODES)})"
    )
    p.add_argument("--concurrency", type=int, default=8, help="callers in the aio-c8 mode (default 8)")
    p.add_argument("--slice-s", type=float, default=1.0, help="seconds per variant per round (default 1.0)")
    p.add_argument("--rounds", type=int, default=5, help="rounds through all variants (default 5)")
    p.add_argument("--warmup-s", type=float, default=0.3, help="unrecorded warm-up per variant (default 0.3)")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting new rounds after this (default 150)")
    p.add_argument("--dir", help="cluster folder (default: a temporary one, removed afterwards)")
    p.add_argument("--out", help="write the JSON results here")
    p.add_argument("--no-malloc-env", action="store_true", help="do not set the malloc thresholds for this client")
    args = p.parse_args(argv)
    args.ks = [int(x) for x in args.ks.split(",") if x]
    args.modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in args.modes if m not in MODES]:
        p.error(f"--modes: unknown {bad}; choose from {MODES}")
    if not (1 <= args.rounds <= 50 and 0.1 <= args.slice_s <= 10 and 1 <= args.concurrency <= 64):
        p.error("--rounds 1..50, --slice-s 0.1..10, --concurrency 1..64")
    if not 1 <= args.keys <= 5_000_000 or any(not 1 <= k <= 100_000 for k in args.ks):
        p.error("--keys 1..5,000,000 and each K in 1..100,000")
    return args


# ---- reporting ----


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"nodes={meta['nodes']} keys={meta['keys']:,} dim={meta['dim']} rounds={meta['rounds_done']} "
        f"slice={meta['slice_s']} s, malloc env in client={meta['client_malloc_env']}, cores={meta['cores']}",
        "",
        "| K | client | transport | p50 µs | p99 µs | p99.9 µs | req/s (slice min–max) | keys/s "
        "| server CPU µs/req (Σ nodes) | client CPU µs/req | requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['k']} | {r['mode']} | {r['transport']} | {r['p50_us']} | {r['p99_us']} | {r['p999_us']} "
            f"| {r['req_per_s']:,.0f} ({r['req_per_s_slice_min']:,.0f}–{r['req_per_s_slice_max']:,.0f}) "
            f"| {r['keys_per_s'] / 1e6:.2f}M | {r['server_cpu_us_per_req']:.0f} | {r['client_cpu_us_per_req']:.0f} "
            f"| {r['requests']:,} |"
        )
    lines += [
        "",
        "stream ÷ unary (below 1 is better for latency and CPU, above 1 for throughput):",
        "",
        "| K | client | p50 | p99 | req/s | server CPU/req | client CPU/req |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r["k"], r["mode"], r["transport"]): r for r in results}
    for k in meta["ks"]:
        for mode in meta["modes"]:
            u, s = by.get((k, mode, "unary")), by.get((k, mode, "stream"))
            if not (u and s):
                continue

            def ratio(key: str, u: dict[str, Any] = u, s: dict[str, Any] = s) -> str:
                return f"{s[key] / u[key]:.2f}" if u[key] else "-"

            lines.append(
                f"| {k} | {mode} | {ratio('p50_us')} | {ratio('p99_us')} | {ratio('req_per_s')} "
                f"| {ratio('server_cpu_us_per_req')} | {ratio('client_cpu_us_per_req')} |"
            )
    return "\n".join(lines)


# ---- main ----


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_malloc_env(not args.no_malloc_env)
    with scratch_cluster("kvstore-bench-transport-", args.dir) as cluster:
        loop = asyncio.new_event_loop()
        sync: dict[str, Client] = {}
        aio: dict[str, AsyncClient] = {}
        started = time.monotonic()
        try:
            print(f"starting {args.nodes} node(s) under {cluster.root} ...", flush=True)
            seeds = cluster.up(args.nodes, replicas=1)
            pids = [n.pid for n in cluster.nodes]
            print(f"serving at {','.join(seeds)} (pids {pids})", flush=True)
            for t in TRANSPORTS:
                sync[t] = Client(seeds, deadline_s=10.0, transport=t)
                sync[t].connect()
            vectors, load_s = load(sync["stream"], args.keys, args.dim)
            print(f"loaded {args.keys:,} keys x {args.dim} in {load_s:.1f} s", flush=True)
            aio = loop.run_until_complete(_open_aio(seeds))
            clients = Clients(sync, aio)
            work = Workload(vectors, args.ks)
            variants = [Variant(k, m, t) for k in args.ks for m in args.modes for t in TRANSPORTS]

            def each(fn: Callable[[Variant], None], order: list[Variant]) -> None:
                for v in order:
                    fn(v)

            each(lambda v: run_slice(v, clients, loop, work, args.warmup_s, False, pids, args.concurrency), variants)
            rounds_done = 0
            bench_t0 = time.monotonic()
            per_round = len(variants) * args.slice_s
            for r in range(args.rounds):
                if time.monotonic() - bench_t0 + per_round > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s reached after {rounds_done} rounds", flush=True)
                    break
                order = variants if r % 2 == 0 else variants[::-1]  # no variant always follows the same one
                each(lambda v: run_slice(v, clients, loop, work, args.slice_s, True, pids, args.concurrency), order)
                rounds_done += 1
                print(f"round {r + 1}/{args.rounds} done", flush=True)
            results = [v.summary() for v in variants]
            meta = {
                "nodes": args.nodes,
                "keys": args.keys,
                "dim": args.dim,
                "ks": args.ks,
                "modes": args.modes,
                "concurrency": args.concurrency,
                "slice_s": args.slice_s,
                "rounds": args.rounds,
                "rounds_done": rounds_done,
                "warmup_s": args.warmup_s,
                "load_s": round(load_s, 2),
                "client_malloc_env": all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()),
                "malloc_env": MALLOC_ENV,
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "grpcio": grpc.__version__,
                "numpy": np.__version__,
                "loadavg_end": os.getloadavg(),
                "total_s": round(time.monotonic() - started, 1),
            }
            print()
            print(markdown(results, meta))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "results": results}, f, indent=1)
                print(f"\nJSON written to {args.out}")
        finally:
            for kv in sync.values():
                kv.close()
            if aio:
                loop.run_until_complete(_close_aio(aio))
            loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
