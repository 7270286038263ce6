"""PNG plots of a run (matplotlib, Agg backend): latency CDF, p99 against offered load, timeline.

Each function takes the result dict and a path, writes one PNG, and returns the path, or
None when the run has nothing to show for that plot.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from hdrh.histogram import HdrHistogram

from bench.report import label, order_key, ordered

COLORS = {
    "kvstore": "tab:blue",
    "redis": "tab:red",
    "redis_asyncio": "tab:purple",
    "redis_cluster": "tab:orange",
    "floor_rocksdict": "tab:green",
    "floor_numpy": "tab:gray",
    "kvstore_r1": "tab:blue",
    "kvstore_r3": "tab:cyan",
}


def _points(s: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Return (latency ms, cumulative fraction) from the phase's HDR histogram (or its percentiles)."""
    if s.get("hdr"):
        hist = HdrHistogram.decode(s["hdr"].encode())
        pts = [(it.value_iterated_to, it.percentile / 100) for it in hist.get_recorded_iterator()]
    else:
        pts = [(v, q / 100) for q, v in s.get("cdf_us", [])]
    if not pts:
        return np.array([]), np.array([])
    arr = np.array(pts, dtype=np.float64)
    return arr[:, 0] / 1000, arr[:, 1]


def cdf_plot(result: dict[str, Any], path: str, phase_index: int = 0) -> str | None:
    """Plot the latency CDF of every system in one phase: full CDF and the tail by percentile."""
    phases = result.get("phases", [])
    if phase_index >= len(phases):
        return None
    phase = phases[phase_index]
    fig, (ax_cdf, ax_tail) = plt.subplots(1, 2, figsize=(12, 4.6))
    most = 10
    for name, s in ordered(phase["systems"]):
        most = max(most, int(s.get("latency_us", {}).get("count") or 0))
        lat_ms, frac = _points(s)
        if not len(lat_ms):
            continue
        color = COLORS.get(name)
        ax_cdf.step(lat_ms, frac, where="post", label=label(name), color=color)
        tail = np.minimum(frac, 1 - 1e-5)
        ax_tail.step(1 / (1 - tail), lat_ms, where="post", label=label(name), color=color)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("latency (ms, log)")
    ax_cdf.set_ylabel("fraction of requests ≤ latency")
    ax_cdf.grid(True, which="both", alpha=0.3)
    ax_tail.set_xscale("log")
    ax_tail.set_yscale("log")
    right = 10 ** max(2, int(np.ceil(np.log10(most))))  # beyond 1/count the percentiles are the max
    ticks = [t for t in (2, 10, 100, 1000, 10000, 100000) if t <= right]
    ax_tail.set_xticks(ticks, ["50%", "90%", "99%", "99.9%", "99.99%", "99.999%"][: len(ticks)])
    ax_tail.set_xlim(1, right)
    ax_tail.set_xlabel("percentile")
    ax_tail.set_ylabel("latency (ms, log)")
    ax_tail.grid(True, which="both", alpha=0.3)
    ax_tail.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{result['scenario']['name']}: latency CDF, {_phase_name(phase)}", fontsize=11)
    return _save(fig, path)


def _phase_name(phase: dict[str, Any]) -> str:
    load = (
        f"open loop {phase['offered_per_s']:g} batches/s"
        if phase["mode"] == "open"
        else f"closed loop concurrency {phase['concurrency']}"
    )
    return f"K={phase['batch_keys']}, {load}"


def p99_vs_load_plot(result: dict[str, Any], path: str) -> str | None:
    """Plot p99 against offered rate per system; hollow markers where the rate was not held."""
    opens = [p for p in result.get("phases", []) if p["mode"] == "open"]
    if len(opens) < 2:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    seen = {n for p in opens for n, s in p["systems"].items() if "skipped" not in s}
    for name in sorted(seen, key=order_key):
        xs, ys, held = [], [], []
        for p in opens:
            s = p["systems"].get(name)
            if s and "skipped" not in s and s["latency_us"]["p99"] is not None:
                xs.append(p["offered_per_s"])
                ys.append(s["latency_us"]["p99"] / 1000)
                held.append(bool(s.get("sustained")))
        (line,) = ax.plot(xs, ys, "-", color=COLORS.get(name), label=label(name))
        color = line.get_color()
        for x, y, h in zip(xs, ys, held, strict=True):
            ax.plot([x], [y], "o", color=color, markerfacecolor=color if h else "white")
    k = result["scenario"]["batch_keys"]
    ax.set_yscale("log")
    ax.set_xlabel(f"offered load (batches/s of K={k})")
    ax.set_ylabel("p99 latency (ms, log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result['scenario']['name']}: p99 against offered load (hollow: not held)", fontsize=11)
    return _save(fig, path)


def timeline_plot(result: dict[str, Any], path: str) -> str | None:
    """Plot kvstore's per-second read p50/p99 (and write p99), errors, with the timeline's actions marked."""
    phase = next((p for p in result.get("phases", []) if p.get("events")), None)
    name = next((n for n in (phase or {}).get("systems", {}) if n.startswith("kvstore")), None)
    if phase is None or name is None or "per_second" not in phase["systems"][name]:
        return None
    s = phase["systems"][name]
    rows = s["per_second"]
    writes = s.get("write_stream", {}).get("per_second", [])
    secs = np.array([r["second"] for r in rows])
    fig, ax = plt.subplots(figsize=(10, 4.6))
    series = [(rows, "p50_us", ":", "tab:blue", "read p50"), (rows, "p99_us", "-", "tab:blue", "read p99"),
              (writes, "p99_us", "-", "tab:green", "write p99")]  # fmt: skip
    for data, key, style, color, what in series:
        if not data:
            continue
        xs = np.array([r["second"] for r in data])
        ys = np.array([np.nan if r[key] is None else r[key] / 1000 for r in data], dtype=np.float64)
        ax.plot(xs, ys, style, marker="o", ms=3, color=color, label=f"{label(name)} {what}")
    ax.set_yscale("log")
    ax.set_xlabel("second of the run")
    ax.set_ylabel("latency (ms, log)")
    errs = ax.twinx()
    errs.bar(secs - 0.15, [r["errors"] for r in rows], width=0.3, alpha=0.3, color="tab:red", label="read errors")
    if writes:
        errs.bar([r["second"] + 0.15 for r in writes], [r["errors"] for r in writes], width=0.3, alpha=0.3,
                 color="tab:orange", label="write errors")  # fmt: skip
    errs.set_ylabel("errors per second")
    errs.set_ylim(bottom=0)
    for e in phase["events"]:
        ax.axvline(e["started_s"], color="black", alpha=0.6, linestyle="--")
        ax.annotate(f"{e['action']} {e['node']}", (e["started_s"], 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    errs.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{result['scenario']['name']}: per-second latency around the timeline", fontsize=11)
    return _save(fig, path)


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def all_plots(result: dict[str, Any], base: str) -> list[str]:
    """Write every plot that applies to `base`-cdf.png, -p99-vs-load.png, -timeline.png; return paths."""
    index = next(
        (i for i, p in enumerate(result.get("phases", [])) if p.get("offered_per_s") == 200.0),
        0,
    )
    made = [
        cdf_plot(result, f"{base}-cdf.png", index),
        p99_vs_load_plot(result, f"{base}-p99-vs-load.png"),
        timeline_plot(result, f"{base}-timeline.png"),
    ]
    return [m for m in made if m]
