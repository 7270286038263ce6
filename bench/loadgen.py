"""Open-loop and closed-loop load on one asyncio event loop, recorded in HDR histograms.

Open loop: request i of a slice is due at `t0 + i / rate`. It is started at that time
whether or not earlier requests have answered, and its latency is measured from that
intended time, so a stall shows up in every request it delays (no coordinated omission).
When `max_inflight` requests are outstanding, a due request is not sent and counts as the
error `dropped_inflight_limit` (the generator never blocks on the system).

Pacing: asyncio's timers wake up to 1 ms late (epoll rounds its timeout up to whole
milliseconds), which would add ~0.5 ms to every latency; spinning on the loop instead
holds the GIL and starves the client threads (gRPC's poller, redis-py's workers) for up
to the 5 ms switch interval. So a pacer thread sleeps to each due time (`time.sleep` is
precise to tens of µs) and hands the request to the loop with `call_soon_threadsafe`.
The hand-off itself takes ~0.1-0.3 ms on a busy 2-core VM, so the pacer posts each
request early by a running estimate of the hand-off (`Pacing.lead_s`, at most 0.5 ms)
and the loop waits out the rest, if any, in a short spin. How late the loop started each
request is recorded as `dispatch_lag_us`: tens of µs when the generator keeps up, large
when the loop itself was busy.

Closed loop: `concurrency` callers, each sending its next request when the last answered;
latency from the actual send. Both loops stop by count and by time.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from hdrh.histogram import HdrHistogram

from bench.system import System
from bench.workload import U64, Dataset

MAX_LATENCY_US = 60_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CDF_PERCENTILES = (
    *np.round(np.linspace(0, 90, 19), 3).tolist(),
    *(91, 92, 93, 94, 95, 96, 97, 98, 99, 99.5, 99.9, 99.95, 99.99, 100),
)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


def _us(seconds: float) -> int:
    return min(MAX_LATENCY_US, max(1, int(seconds * 1e6)))


@dataclass(frozen=True)
class LoadOptions:
    """How the generator behaves (from the scenario)."""

    max_inflight: int = 64
    check_every: int = 10
    drain_s: float = 3.0
    max_requests: int = 2_000_000


@dataclass
class Recorder:
    """Everything one system's phase records; `summary()` is what goes into the JSON."""

    hist: HdrHistogram = field(default_factory=new_histogram)
    lag: HdrHistogram = field(default_factory=new_histogram)
    per_second: dict[int, HdrHistogram] = field(default_factory=dict)
    per_slice: dict[int, HdrHistogram] = field(default_factory=dict)
    slice_other_cores: dict[int, float] = field(default_factory=dict)
    current_slice: int = 0
    errors_per_second: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    sent: int = 0
    completed: int = 0
    writes: int = 0
    keys_ok: int = 0
    keys_failed: int = 0
    checked: int = 0
    check_failed: int = 0
    measured_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    cut_short: str = ""
    trace: list[tuple[int, float, float | None]] | None = None
    """When a list: one (request index, due second, latency s or None on error) per request."""

    def done(self, t_rel: float, latency_s: float, keys: int) -> None:
        us = _us(latency_s)
        self.hist.record_value(us)
        second = self.per_second.get(int(t_rel))
        if second is None:
            second = self.per_second[int(t_rel)] = new_histogram()
        second.record_value(us)
        piece = self.per_slice.get(self.current_slice)
        if piece is None:
            piece = self.per_slice[self.current_slice] = new_histogram()
        piece.record_value(us)
        self.completed += 1
        self.keys_ok += keys

    def error(self, cls: str, t_rel: float, keys: int = 0) -> None:
        self.errors[cls] += 1
        self.errors_per_second[int(t_rel)] += 1
        self.keys_failed += keys

    def summary(self) -> dict[str, Any]:
        """Return the phase's figures: latency in µs, rates per second of measured time."""
        seconds = max(self.measured_s, 1e-9)
        out: dict[str, Any] = {
            "sent": self.sent,
            "completed": self.completed,
            "writes": self.writes,
            "measured_s": round(self.measured_s, 3),
            "achieved_per_s": round(self.completed / seconds, 1),
            "keys_per_s": round(self.keys_ok / seconds, 1),
            "keys_failed": self.keys_failed,
            "errors": dict(sorted(self.errors.items())),
            "checked": self.checked,
            "check_failed": self.check_failed,
            "latency_us": hist_summary(self.hist),
            "dispatch_lag_us": hist_summary(self.lag),
            "cdf_us": [[q, int(self.hist.get_value_at_percentile(q))] for q in CDF_PERCENTILES]
            if self.hist.get_total_count()
            else [],
            "hdr": self.hist.encode().decode() if self.hist.get_total_count() else "",
            "client_cpu_us_per_request": round(self.client_cpu_s / max(1, self.sent) * 1e6, 1),
            "server_cpu_us_per_request": round(self.server_cpu_s / max(1, self.sent) * 1e6, 1),
            "client_cpu_cores": round(self.client_cpu_s / seconds, 3),
            "server_cpu_cores": round(self.server_cpu_s / seconds, 3),
            "other_cpu_cores": round(self.other_cpu_s / seconds, 3),
        }
        if self.cut_short:
            out["cut_short"] = self.cut_short
        out["per_second"] = self.per_second_series()
        out["slice_p99_median_us"] = self.slice_p99_median_us()
        return out

    def slice_p99_median_us(self) -> int | None:
        """Return the median over slices of each slice's p99: robust to a few noisy slices."""
        p99s = [h.get_value_at_percentile(99) for h in self.per_slice.values() if h.get_total_count()]
        return int(np.median(p99s)) if p99s else None

    def per_second_series(self) -> list[dict[str, Any]]:
        seconds = sorted(set(self.per_second) | set(self.errors_per_second))
        rows = []
        for s in seconds:
            hist = self.per_second.get(s)
            count = hist.get_total_count() if hist else 0
            rows.append(
                {
                    "second": s,
                    "completed": count,
                    "errors": self.errors_per_second.get(s, 0),
                    "p50_us": int(hist.get_value_at_percentile(50)) if hist and count else None,
                    "p99_us": int(hist.get_value_at_percentile(99)) if hist and count else None,
                    "max_us": int(hist.get_max_value()) if hist and count else None,
                }
            )
        return rows


def merged(hists: list[HdrHistogram]) -> HdrHistogram:
    """Return one histogram holding the values of all of `hists`."""
    out = new_histogram()
    for hist in hists:
        out.add(hist)
    return out


def hist_summary(hist: HdrHistogram) -> dict[str, int | float | None]:
    """Return count, p50/p90/p99/p99.9, max and mean of a histogram (None when empty)."""
    if not hist.get_total_count():
        return {"count": 0, "p50": None, "p90": None, "p99": None, "p99.9": None, "max": None, "mean": None}
    out: dict[str, int | float | None] = {"count": int(hist.get_total_count())}
    for q in PERCENTILES:
        out[f"p{q:g}"] = int(hist.get_value_at_percentile(q))
    out["max"] = int(hist.get_max_value())
    out["mean"] = round(float(hist.get_mean_value()), 1)
    return out


class Requester:
    """Sends one request to a system and records its outcome (shared by both loops)."""

    def __init__(self, system: System, dataset: Dataset, rec: Recorder, opts: LoadOptions) -> None:
        self.system = system
        self.dataset = dataset
        self.rec = rec
        self.opts = opts

    async def __call__(self, ids: U64, write: bool, start: float, t_rel: float, index: int) -> None:
        keys = len(ids)
        try:
            if write:
                await self.system.put(ids)
                missing = 0
                values = None
            else:
                values, missing = await self.system.get(ids)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is counted by its class, never fatal to the run
            self.rec.error(type(exc).__name__, t_rel, keys)
            if self.rec.trace is not None:
                self.rec.trace.append((index, t_rel, None))
            return
        latency = time.perf_counter() - start
        self.rec.done(t_rel, latency, keys - missing)
        if self.rec.trace is not None:
            self.rec.trace.append((index, t_rel, latency))
        if missing:
            self.rec.error("partial_result", t_rel, missing)
        elif values is not None and index % self.opts.check_every == 0:
            self.rec.checked += 1
            if not self.dataset.matches(ids, values):
                self.rec.check_failed += 1
                self.rec.error("wrong_answer", t_rel)


async def open_loop(
    req: Requester,
    batches: U64,
    writes: npt.NDArray[np.bool_],
    rate: float,
    *,
    t_offset: float = 0.0,
    index_offset: int = 0,
    start_at: float | None = None,
) -> None:
    """Send every batch of `batches` at `rate` per second from `start_at` (perf_counter time,
    default now); then wait, bounded by `drain_s`, for the answers."""
    rec, opts = req.rec, req.opts
    loop = asyncio.get_running_loop()
    inflight: set[asyncio.Task[None]] = set()
    count = min(len(batches), opts.max_requests)
    if count == 0:
        return
    t0 = time.perf_counter() + 0.002 if start_at is None else start_at
    all_sent: asyncio.Future[None] = loop.create_future()

    pacing = Pacing()

    def dispatch(i: int, posted_for: float) -> None:  # on the loop
        due = t0 + i / rate
        t_rel = t_offset + (due - t0)
        pacing.arrived(time.perf_counter() - posted_for)
        while time.perf_counter() < due:  # early by less than lead_s: wait it out
            pass
        rec.lag.record_value(_us(time.perf_counter() - due))
        if len(inflight) >= opts.max_inflight:
            rec.error("dropped_inflight_limit", t_rel, len(batches[i]))
        else:
            rec.sent += 1
            rec.writes += int(writes[i])
            task = loop.create_task(req(batches[i], bool(writes[i]), due, t_rel, index_offset + i))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if i == count - 1 and not all_sent.done():
            all_sent.set_result(None)

    stop = threading.Event()
    pacer = threading.Thread(target=_pace, args=(loop, dispatch, t0, rate, count, stop, pacing), name="bench-pacer")
    pacer.start()
    try:
        await asyncio.wait_for(all_sent, timeout=count / rate + 60.0)
    finally:
        stop.set()
        await asyncio.to_thread(pacer.join)
    sent_by = time.perf_counter()
    await _drain(inflight, opts.drain_s, rec, t_offset + (sent_by - t0))
    # the slice lasts until its last answer (or the drain timeout), and at least its schedule
    rec.measured_s += max(count / rate, time.perf_counter() - t0)


class Pacing:
    """How early the pacer posts a request: a running estimate of the thread-to-loop hand-off."""

    MAX_LEAD_S = 0.0005

    def __init__(self) -> None:
        self.lead_s = 0.0001

    def arrived(self, handoff_s: float) -> None:
        # an exponential moving average, clamped: a busy loop's long hand-offs must not pull
        # the posts so early that the loop spins for long
        sample = min(max(handoff_s, 0.0), self.MAX_LEAD_S)
        self.lead_s = 0.9 * self.lead_s + 0.1 * sample


def _pace(
    loop: asyncio.AbstractEventLoop,
    dispatch: Callable[[int, float], None],
    t0: float,
    rate: float,
    count: int,
    stop: threading.Event,
    pacing: Pacing,
) -> None:
    """Pacer thread: post request i to the loop `lead_s` before it is due; stop early when told."""
    for i in range(count):
        post_at = t0 + i / rate - pacing.lead_s
        delay = post_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if stop.is_set():
            return
        loop.call_soon_threadsafe(dispatch, i, max(post_at, time.perf_counter()))


async def _drain(inflight: set[asyncio.Task[None]], timeout_s: float, rec: Recorder, t_rel: float) -> None:
    if not inflight:
        return
    _, pending = await asyncio.wait(set(inflight), timeout=timeout_s)
    for task in pending:
        task.cancel()
        rec.error("unfinished_at_end", t_rel)
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def closed_loop(
    req: Requester,
    batches: U64,
    writes: npt.NDArray[np.bool_],
    concurrency: int,
    duration_s: float,
    cursor: Iterator[int],
    *,
    t_offset: float = 0.0,
    start_at: float | None = None,
) -> None:
    """Run `concurrency` back-to-back callers for `duration_s` from `start_at` (default now), taking
    batches from `cursor` in turn."""
    rec, opts = req.rec, req.opts
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    t0 = time.perf_counter()
    end = t0 + duration_s
    budget = itertools.count()

    async def caller() -> None:
        while time.perf_counter() < end and next(budget) < opts.max_requests:
            i = next(cursor)
            row = i % len(batches)
            start = time.perf_counter()
            rec.sent += 1
            rec.writes += int(writes[row])
            await req(batches[row], bool(writes[row]), start, t_offset + (start - t0), i)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    rec.measured_s += time.perf_counter() - t0
