"""Run one scenario against every system, side by side; return the result as plain data.

Steps:
1. Build the dataset and the key sequences (seeded: every system gets the same).
2. Start every system and load it (blocking); a system that cannot run here is skipped
   with its message, and the others still run.
3. On one event loop: connect, warm every system up (closed loop, not recorded), then for
   each phase (open loop at a rate, or closed loop at a concurrency) rotate through the
   systems in slices of `slice_s`, so that noise from other work on the machine hits all
   of them alike. Slice j of every system replays the same batches. A timeline
   (`actions`) runs alongside a single unrotated kvstore slice; a write stream
   (`write_stream_rate`) runs alongside every kvstore slice, recorded apart from the reads.
4. Stop every system (always), and return environment, scenario, per-system info and
   per-phase figures (`bench.loadgen.Recorder.summary`).
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.actions import run_timeline
from bench.environment import environment
from bench.failover import write_failover
from bench.floor_systems import NumpyFloorSystem, RocksFloorSystem
from bench.kvstore_system import TABLE, KvstoreSystem
from bench.loadgen import LoadOptions, Recorder, Requester, closed_loop, hist_summary, merged, open_loop
from bench.redis_systems import RedisAsyncioSystem, RedisClusterSystem, RedisSystem
from bench.scenario import Scenario
from bench.system import PeerUnavailableError, System, machine_busy_s, proc_cpu_s
from bench.workload import U64, KeyStream, batch_count, make_dataset, unique_fraction
from kvclient._ring import partitions_of

log = logging.getLogger(__name__)

SYSTEM_CLASSES: dict[str, Callable[[Scenario], System]] = {
    "kvstore": KvstoreSystem,
    "redis": RedisSystem,
    "redis_asyncio": RedisAsyncioSystem,
    "redis_cluster": RedisClusterSystem,
    "floor_rocksdict": RocksFloorSystem,
    "floor_numpy": NumpyFloorSystem,
}
POOL_CAP_KEYS = 8_000_000  # a closed-loop phase cycles through at most this many precomputed ids
QUIET_OTHER_CORES = 0.25  # a slice is "quiet" if other processes used less than this many cores
SUSTAINED_ACHIEVED = 0.95  # an open-loop rate is "held" if >= 95 % of it completes ...
WRITE_STREAM_PHASES = 1000  # the write stream's key sequences use phase index + this, apart from the reads'


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_scenario(scn: Scenario, *, command: str = "") -> dict[str, Any]:
    """Run `scn` (see module docstring); return the result dict that `bench.report` renders."""
    result: dict[str, Any] = {"schema": 1, "command": command, "started_at": _utc_now()}
    result["environment"] = environment()
    result["scenario"] = scn.to_dict()
    log.info("building dataset keys=%d dim=%d dtype=%s", scn.keys, scn.dim, scn.dtype)
    dataset = make_dataset(scn)
    stream = KeyStream(scn)
    systems, status = [], {}
    try:
        for name in scn.systems:
            system, status[name] = _start(name, scn, dataset)
            if system is not None:
                systems.append(system)
        gc.collect()
        gc.freeze()  # the dataset and the loaded clients are long-lived: keep them out of GC scans
        opts = LoadOptions(max_inflight=scn.max_inflight, check_every=scn.check_every, drain_s=scn.deadline_s + 2.0)
        result["phases"] = asyncio.run(_measure(scn, stream, systems, opts)) if systems else []
        for system in systems:
            status[system.name]["info"] = system.info()
    finally:
        for system in reversed(systems):
            _stop(system)
        gc.unfreeze()
    result["systems"] = status
    result["environment"]["loadavg_at_end"] = list(os.getloadavg())
    result["finished_at"] = _utc_now()
    return result


def make_system(name: str, scn: Scenario) -> System:
    """Return the system called `name` (`kvstore_r<N>`: kvstore with N copies per partition)."""
    copies = scn.kvstore_replicas(name)
    if copies is not None:
        return KvstoreSystem(scn, name=name, replicas=copies)
    return SYSTEM_CLASSES[name](scn)


def _start(name: str, scn: Scenario, dataset: Any) -> tuple[System | None, dict[str, Any]]:
    system = make_system(name, scn)
    log.info("starting and loading system=%s", name)
    t0 = time.perf_counter()
    try:
        system.start(dataset)
    except PeerUnavailableError as exc:
        log.warning("skipping system=%s: %s", name, exc)
        _stop(system)
        return None, {"status": "skipped", "reason": str(exc)}
    except Exception as exc:
        log.exception("system failed to start system=%s", name)
        _stop(system)
        return None, {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    log.info("ready system=%s start_and_load_s=%.1f", name, time.perf_counter() - t0)
    return system, {"status": "ok", "start_and_load_s": round(time.perf_counter() - t0, 2)}


def _stop(system: System) -> None:
    try:
        system.stop()
    except Exception:
        log.exception("stopping system=%s failed", system.name)


async def _measure(scn: Scenario, stream: KeyStream, systems: list[System], opts: LoadOptions) -> list[dict[str, Any]]:
    opened: list[System] = []
    try:
        for system in systems:
            await system.open()
            opened.append(system)
        await _warm_up(scn, stream, systems, opts)
        phases: list[dict[str, Any]] = []
        overloaded: dict[str, float] = {}
        for index, (mode, value) in enumerate(scn.phases()):
            phases.append(await _phase(scn, stream, systems, opts, index, mode, value, overloaded))
        return phases
    finally:
        for system in opened:
            await system.close()


async def _warm_up(scn: Scenario, stream: KeyStream, systems: list[System], opts: LoadOptions) -> None:
    if scn.warmup_s <= 0:
        return
    batches = stream.batches(10_000, batch_count("closed", 1, scn.warmup_s, POOL_CAP_KEYS, scn.batch_keys))
    no_writes = np.zeros(len(batches), dtype=np.bool_)
    for system in systems:
        rec = Recorder()
        await closed_loop(
            Requester(system, system.data, rec, opts), batches, no_writes, 1, scn.warmup_s, itertools.count()
        )
        log.info("warmed up system=%s requests=%d errors=%s", system.name, rec.sent, dict(rec.errors))


async def _phase(
    scn: Scenario,
    stream: KeyStream,
    systems: list[System],
    opts: LoadOptions,
    index: int,
    mode: str,
    value: float,
    overloaded: dict[str, float],
) -> dict[str, Any]:
    count = batch_count(mode, value, scn.duration_s, POOL_CAP_KEYS, scn.batch_keys)
    batches, writes = stream.batches(index, count), stream.writes(index, count)
    active = [s for s in systems if not (mode == "open" and scn.stop_when_overloaded and s.name in overloaded)]
    recs = {s.name: Recorder() for s in active}
    wrecs = {s.name: Recorder(trace=[]) for s in active if scn.write_stream_rate and isinstance(s, KvstoreSystem)}
    wcount = batch_count("open", scn.write_stream_rate, scn.duration_s, POOL_CAP_KEYS, scn.write_stream_keys)
    wbatches = stream.batches(WRITE_STREAM_PHASES + index, wcount, scn.write_stream_keys) if wrecs else batches[:0]
    all_writes = np.ones(len(wbatches), dtype=np.bool_)
    before = {s.name: await _snapshot(s) for s in active}
    cursors = {s.name: itertools.count() for s in active}
    slices = scn.slices()
    slice_s = scn.duration_s / slices
    log.info("phase mode=%s value=%g systems=%s slices=%d", mode, value, [s.name for s in active], slices)
    events: list[dict[str, Any]] = []
    cut: set[str] = set()
    for j in range(slices):
        for system in active:
            req = Requester(system, system.data, recs[system.name], opts)
            lo, hi = j * count // slices, (j + 1) * count // slices
            start_at = time.perf_counter() + 0.005
            if mode == "open":
                load = open_loop(req, batches[lo:hi], writes[lo:hi], value, t_offset=j * slice_s, index_offset=lo,
                                 start_at=start_at)  # fmt: skip
            else:
                load = closed_loop(req, batches, writes, int(value), slice_s, cursors[system.name],
                                   t_offset=j * slice_s, start_at=start_at)  # fmt: skip
            if system.name in cut:
                load.close()
                continue
            recs[system.name].current_slice = j
            cpu = _CpuMeter(system)
            side: list[Any] = []
            if system.name in wrecs:
                wreq = Requester(system, system.data, wrecs[system.name], opts)
                wlo, whi = j * wcount // slices, (j + 1) * wcount // slices
                side.append(open_loop(wreq, wbatches[wlo:whi], all_writes[wlo:whi], scn.write_stream_rate,
                                      t_offset=j * slice_s, index_offset=wlo, start_at=start_at))  # fmt: skip
            if scn.actions and isinstance(system, KvstoreSystem):
                events, *_ = await asyncio.gather(run_timeline(scn.actions, system, start_at), load, *side)
            else:
                await asyncio.gather(load, *side)
            await system.quiesce()
            cpu.add_to(recs[system.name])
            if mode == "open":
                _cut_if_overloaded(recs[system.name], system.name, j, slices, value, cut)
    out: dict[str, Any] = {
        "mode": mode,
        "offered_per_s": value if mode == "open" else None,
        "concurrency": int(value) if mode == "closed" else None,
        "duration_s": scn.duration_s,
        "slices": slices,
        "batch_keys": scn.batch_keys,
        "unique_key_fraction": round(unique_fraction(batches), 4),
        "events": events,
        "systems": {},
    }
    out["quiet_slices"] = _quiet_slices(recs, slices)
    for system in active:
        out["systems"][system.name] = await _system_result(scn, system, recs[system.name], before[system.name], mode,
                                                           value, overloaded, set(out["quiet_slices"]))  # fmt: skip
        if system.name in wrecs:
            out["systems"][system.name]["write_stream"] = _write_stream(scn, wrecs[system.name], wbatches, events)
    for name, rate in overloaded.items():
        if name not in out["systems"] and mode == "open":
            out["systems"][name] = {"skipped": f"overloaded at {rate:g} batches/s"}
    return out


def _write_stream(scn: Scenario, rec: Recorder, batches: U64, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the write stream's figures, and for each kill its failover time and write stall."""
    summary = rec.summary()
    summary["rate_per_s"] = scn.write_stream_rate
    summary["batch_keys"] = scn.write_stream_keys
    summary.pop("hdr", None)
    summary.pop("cdf_us", None)
    summary["failover"] = []
    for event in events:
        if event["action"] != "kill" or event.get("error"):
            continue
        led = set(event.get("led_partitions") or [])
        touched = [set(partitions_of(TABLE, row, scn.partitions).tolist()) for row in batches] if led else []

        def affected(i: int, led: set[int] = led, touched: list[set[int]] = touched) -> bool:
            return not led or bool(led & touched[i])  # a plain node kill: every write counts

        figures = write_failover(rec.trace or [], event["done_s"], affected)
        summary["failover"].append({"node": event["node"], **figures})
    return summary


def _quiet_slices(recs: dict[str, Recorder], slices: int) -> list[int]:
    """Return the slice indices during which other processes used < QUIET_OTHER_CORES for every system.

    Slice j of every system replays the same batches within seconds of each other, so the
    p99 over the quiet slices compares the systems on the same keys with the machine to
    themselves; both figures (all slices, quiet slices) are reported.
    """
    quiet = []
    for j in range(slices):
        ran = [r.slice_other_cores[j] for r in recs.values() if j in r.slice_other_cores]  # a cut system did not
        if ran and max(ran) < QUIET_OTHER_CORES:
            quiet.append(j)
    return quiet


def _cut_if_overloaded(rec: Recorder, name: str, j: int, slices: int, rate: float, cut: set[str]) -> None:
    """Stop rotating a system into an open-loop phase once it clearly cannot keep up.

    That is: it dropped or abandoned requests, and over its slices so far it completed less
    than 80 % of the offered rate (one noisy slice does not cut a system that keeps up).
    An overloaded system's backlog only grows; further slices would cost minutes of drain
    time and tell nothing new.
    """
    overloaded = rec.errors.get("dropped_inflight_limit", 0) + rec.errors.get("unfinished_at_end", 0)
    behind = rec.completed < 0.8 * rate * rec.measured_s
    if overloaded and behind and j + 1 < slices:
        rec.cut_short = f"overloaded: stopped after slice {j + 1} of {slices}"
        cut.add(name)
        log.warning("system overloaded, skipping its remaining slices system=%s slice=%d", name, j + 1)


async def _system_result(
    scn: Scenario,
    system: System,
    rec: Recorder,
    before: dict[str, Any],
    mode: str,
    value: float,
    overloaded: dict[str, float],
    quiet: set[int],
) -> dict[str, Any]:
    summary = rec.summary()
    summary["quiet_latency_us"] = hist_summary(merged([h for j, h in rec.per_slice.items() if j in quiet]))
    after = await _snapshot(system)
    for key in ("retries", "hedges"):
        a, b = after["counters"].get(key), before["counters"].get(key)
        summary[key] = None if a is None or b is None else a - b
    if "node_stats" in after:
        stats = {k: v - before.get("node_stats", {}).get(k, 0) for k, v in after["node_stats"].items()}
        stats["nodes_answered"] = after["node_stats"]["nodes_answered"]
        summary["node_stats"] = stats
    if mode == "open":
        p99 = summary["latency_us"]["p99"]
        held = (
            summary["achieved_per_s"] >= SUSTAINED_ACHIEVED * value
            and not summary["errors"]
            and p99 is not None
            and p99 <= scn.slo_p99_ms * 1000
        )
        summary["sustained"] = held
        if not held:
            overloaded.setdefault(system.name, value)
    return summary


async def _snapshot(system: System) -> dict[str, Any]:
    snap: dict[str, Any] = {"counters": system.counters()}
    if isinstance(system, KvstoreSystem):
        try:
            snap["node_stats"] = await system.node_stats()
        except Exception as exc:  # stats are a nice-to-have; a down node must not end the run
            log.debug("node stats unavailable: %s", exc)
    return snap


class _CpuMeter:
    """CPU seconds over one slice: this process (all threads), the system's servers, and the
    rest of the machine (other work competing for the 2 cores: a noise indicator)."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.machine0 = machine_busy_s()
        self.client0 = time.process_time()
        self.server0 = {pid: proc_cpu_s(pid) for pid in system.server_pids()}
        self.wall0 = time.perf_counter()

    def add_to(self, rec: Recorder) -> None:
        client = time.process_time() - self.client0
        pids = set(self.server0) | set(self.system.server_pids())
        server = sum(max(0.0, proc_cpu_s(pid) - self.server0.get(pid, 0.0)) for pid in pids)
        other = max(0.0, machine_busy_s() - self.machine0 - client - server)
        rec.client_cpu_s += client
        rec.server_cpu_s += server
        rec.other_cpu_s += other
        rec.slice_other_cores[rec.current_slice] = other / max(1e-6, time.perf_counter() - self.wall0)
