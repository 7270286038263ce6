"""Render a run's result dict as Markdown: tables per phase, ratios against each peer, targets.

Pure: takes the dict `bench.runner.run_scenario` returns (or its JSON) and returns text.
Ratios are peer ÷ kvstore, so a ratio above 1 means kvstore is faster.
"""

from __future__ import annotations

from typing import Any

from bench.scenario import SYSTEMS

LABELS = {
    "kvstore": "kvstore",
    "redis": "Redis (1 server, MGET, threads)",
    "redis_asyncio": "Redis (1 server, MGET, redis.asyncio)",
    "redis_cluster": "Redis Cluster (3 masters)",
    "floor_rocksdict": "floor: rocksdict in-process",
    "floor_numpy": "floor: numpy V[ids]",
}
PEERS = ("redis", "redis_asyncio", "redis_cluster", "floor_rocksdict", "floor_numpy")
TARGET_RATE = 200.0
TARGET_K = 1000
TARGET_KEYS_PER_S = 500_000


def ms(us: float | None) -> str:
    return "–" if us is None else f"{us / 1000:.2f}"


def label(name: str) -> str:
    return LABELS.get(name, name)


def render(result: dict[str, Any]) -> str:
    """Return the whole Markdown summary of one run."""
    parts = [_header(result), _skipped(result)]
    for phase in result.get("phases", []):
        parts.append(_phase(phase))
    parts.append(_sweep(result))
    parts.append(_targets(result))
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _header(result: dict[str, Any]) -> str:
    scn, env = result["scenario"], result["environment"]
    git = env.get("git", {})
    sha = (git.get("sha") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    dist = scn["distribution"] + (f" α={scn['zipf_alpha']}" if scn["distribution"] == "zipf" else "")
    load = env.get("loadavg_at_start", [0])[0], env.get("loadavg_at_end", [0])[0]
    lines = [
        f"## {scn['name']}: {scn.get('description', '')}".rstrip(": "),
        "",
        f"- command: `{result.get('command', '')}`",
        f"- when: {result.get('started_at', '')}; git {sha}",
        f"- machine: {env.get('cpus')} × {env.get('cpu_model', '')}; load average {load[0]:.2f} at start, "
        f"{load[1]:.2f} at end",
        f"- data: {scn['keys']:,} keys × {scn['dim']} {scn['dtype']}; K={scn['batch_keys']} keys per request, "
        f"{dist}; writes {scn['write_fraction']:.0%}",
        f"- kvstore: {scn['nodes']} nodes, {scn['partitions']} partitions, cache {scn['cache_bytes']} per node; "
        f"deadline {scn['deadline_s']} s{', partial results' if scn['partial'] else ''}",
        f"- versions: {_versions(env.get('versions', {}))}",
        "",
    ]
    return "\n".join(lines)


def _versions(v: dict[str, Any]) -> str:
    keys = ("redis-server", "redis", "hiredis", "grpcio", "rocksdict", "numpy")
    return ", ".join(f"{k} {v[k]}" for k in keys if v.get(k))


def _skipped(result: dict[str, Any]) -> str:
    lines = [
        f"- **{label(name)} {info['status']}**: {info.get('reason', '')}"
        for name, info in result.get("systems", {}).items()
        if info.get("status") != "ok"
    ]
    return "\n".join(lines) + "\n" if lines else ""


def _phase_title(phase: dict[str, Any]) -> str:
    per = f"{phase['duration_s']:g} s per system" + (
        f" in {phase['slices']} rotated slices" if phase["slices"] > 1 else ""
    )
    uniq = f"; distinct keys per batch {phase['unique_key_fraction']:.0%}" if phase["unique_key_fraction"] < 1 else ""
    if phase["mode"] == "open":
        return f"### Open loop, {phase['offered_per_s']:g} batches/s offered ({per}{uniq})"
    return f"### Closed loop, concurrency {phase['concurrency']} ({per}{uniq})"


def ordered(systems: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    order = {n: i for i, n in enumerate(SYSTEMS)}
    return sorted(systems.items(), key=lambda kv: order.get(kv[0], 99))


def _phase(phase: dict[str, Any]) -> str:
    head = (
        "| system | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | slice p99 median ms | achieved/s | keys/s "
        "| errors | checked | client CPU µs/req | server CPU µs/req |"
    )
    lines = [_phase_title(phase), "", head, "|" + "---|" * 13]
    for name, s in ordered(phase["systems"]):
        if "skipped" in s:
            lines.append(f"| {label(name)} | {s['skipped']} |" + " |" * 11)
            continue
        lat = s["latency_us"]
        checked = f"{s['checked'] - s['check_failed']}/{s['checked']}"
        lines.append(
            f"| {label(name)} | {ms(lat['p50'])} | {ms(lat['p90'])} | {ms(lat['p99'])} | {ms(lat['p99.9'])} "
            f"| {ms(lat['max'])} | {ms(s.get('slice_p99_median_us'))} | {s['achieved_per_s']:,.0f} "
            f"| {s['keys_per_s']:,.0f} | {_errors(s)} | {checked} "
            f"| {s['client_cpu_us_per_request']:,.0f} | {s['server_cpu_us_per_request']:,.0f} |"
        )
    lines += ["", *_ratios(phase), *_quiet(phase), *_notes(phase), *_timeline(phase)]
    return "\n".join(lines) + "\n"


def _quiet(phase: dict[str, Any]) -> list[str]:
    quiet, slices = phase.get("quiet_slices"), phase["slices"]
    if quiet is None or slices < 2:
        return []
    head = f"Quiet slices only: {len(quiet)} of {slices} slices, those in which other processes on the machine"
    lines = [head + " used < 0.25 cores while each system ran (same slices, same keys for every system):", ""]
    if not quiet:
        return [*lines[:-1], "none.", ""]
    lines += [
        "| system | p50 ms | p99 ms | p99.9 ms | max ms | requests | p99 ÷ kvstore p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    kv = _p(phase, "kvstore", "p99", "quiet_latency_us")
    for name, s in ordered(phase["systems"]):
        lat = s.get("quiet_latency_us")
        if not lat or not lat.get("count"):
            continue
        ratio = f"{lat['p99'] / kv:.2f}×" if kv else "–"
        lines.append(
            f"| {label(name)} | {ms(lat['p50'])} | {ms(lat['p99'])} | {ms(lat['p99.9'])} | {ms(lat['max'])} "
            f"| {lat['count']:,} | {ratio} |"
        )
    return [*lines, ""]


def _errors(s: dict[str, Any]) -> str:
    if not s["errors"]:
        return "0"
    return ", ".join(f"{k} {v}" for k, v in s["errors"].items())


def _p(phase: dict[str, Any], name: str, key: str, field: str = "latency_us") -> float | None:
    s = phase["systems"].get(name)
    if not s or "skipped" in s or not s.get(field):
        return None
    value = s[field].get(key)
    return None if value is None else float(value)


def _ratios(phase: dict[str, Any]) -> list[str]:
    if _p(phase, "kvstore", "p99") is None:
        return []
    rows = []
    for peer in PEERS:
        cells = []
        for key in ("p50", "p99", "p99.9"):
            kv, other = _p(phase, "kvstore", key), _p(phase, peer, key)
            cells.append("–" if not kv or other is None else f"{other / kv:.2f}×")
        if any(c != "–" for c in cells):
            rows.append(f"| {label(peer)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["Peer latency ÷ kvstore latency (above 1: kvstore is faster):", "", "| peer | p50 | p99 | p99.9 |",
            "|---|---|---|---|", *rows, ""]  # fmt: skip


def _notes(phase: dict[str, Any]) -> list[str]:
    notes = []
    for name, s in ordered(phase["systems"]):
        if "skipped" in s:
            continue
        if s.get("cut_short"):
            notes.append(f"- {label(name)}: {s['cut_short']} (figures are from the slices it ran).")
        if s.get("other_cpu_cores", 0) > 0.3:
            notes.append(
                f"- {label(name)}: other processes used {s['other_cpu_cores']:.1f} of the 2 cores during its slices"
                " (noisy machine)."
            )
        lag = s["dispatch_lag_us"]
        if lag.get("p99") and lag["p99"] > 1000:
            notes.append(f"- {label(name)}: the generator dispatched late (lag p99 {ms(lag['p99'])} ms): it was busy.")
        if s.get("retries"):
            notes.append(f"- {label(name)}: {s['retries']} client retry rounds.")
        stats = s.get("node_stats")
        if stats and stats.get("keys_read"):
            hit = stats["cache_hits"] / max(1, stats["cache_hits"] + stats["cache_misses"])
            notes.append(f"- kvstore cache hit rate {hit:.1%} over {stats['keys_read']:,} keys read by the nodes.")
    return [*notes, ""] if notes else []


def _timeline(phase: dict[str, Any]) -> list[str]:
    if not phase.get("events"):
        return []
    lines = ["Timeline:", ""]
    for e in phase["events"]:
        outcome = f"error: {e['error']}" if e["error"] else f"done at {e['done_s']:.1f} s"
        lines.append(f"- {e['at_s']:g} s: {e['action']} {e['node']} (started {e['started_s']:.1f} s, {outcome})")
    lines += ["", "| second | completed | errors | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for name, s in phase["systems"].items():
        if name != "kvstore" or "per_second" not in s:
            continue
        for row in s["per_second"]:
            lines.append(
                f"| {row['second']} | {row['completed']} | {row['errors']} | {ms(row['p50_us'])} "
                f"| {ms(row['p99_us'])} | {ms(row['max_us'])} |"
            )
    return [*lines, ""]


def _sweep(result: dict[str, Any]) -> str:
    opens = [p for p in result.get("phases", []) if p["mode"] == "open"]
    if len(opens) < 2:
        return ""
    names = [n for n in SYSTEMS if any(n in p["systems"] for p in opens)]
    lines = ["### p99 (ms) against offered load", "", "| offered/s | " + " | ".join(label(n) for n in names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for p in opens:
        cells = []
        for n in names:
            s = p["systems"].get(n)
            if s is None or "skipped" in s:
                cells.append("–")
            else:
                cells.append(ms(s["latency_us"]["p99"]) + ("" if s.get("sustained") else " ✗"))
        lines.append(f"| {p['offered_per_s']:g} | " + " | ".join(cells) + " |")
    lines += ["", "✗: not held (achieved < 95 % of offered, errors, or p99 over "
              f"{result['scenario']['slo_p99_ms']:g} ms).", "", "Highest offered rate held:", ""]  # fmt: skip
    k = result["scenario"]["batch_keys"]
    for n in names:
        rate = highest_held(result, n)
        lines.append(f"- {label(n)}: " + ("none" if rate is None else f"{rate:g} batches/s = {rate * k:,.0f} keys/s"))
    return "\n".join(lines) + "\n"


def highest_held(result: dict[str, Any], name: str) -> float | None:
    """Return the highest open-loop rate `name` held in this run (None if it held none)."""
    held = [
        p["offered_per_s"]
        for p in result.get("phases", [])
        if p["mode"] == "open" and p["systems"].get(name, {}).get("sustained")
    ]
    return max(held) if held else None


def max_keys_per_s(result: dict[str, Any], name: str) -> float | None:
    """Return the best keys/s of `name` over closed-loop phases and held open-loop rates."""
    values = []
    for p in result.get("phases", []):
        s = p["systems"].get(name)
        if not s or "skipped" in s or s.get("errors"):
            continue
        if p["mode"] == "closed" or s.get("sustained"):
            values.append(float(s["keys_per_s"]))
    return max(values) if values else None


def _targets(result: dict[str, Any]) -> str:
    """Return the issue's targets that this run can judge, each met or not and by how much."""
    if result["scenario"]["batch_keys"] != TARGET_K:
        return ""
    lines = []
    phase = next((p for p in result.get("phases", []) if p.get("offered_per_s") == TARGET_RATE), None)
    if phase:
        lines += _p99_targets(phase, "latency_us", "all slices")
        if phase.get("quiet_slices") and phase["slices"] > 1:
            lines += _p99_targets(phase, "quiet_latency_us", f"{len(phase['quiet_slices'])} quiet slices")
    sat = max_keys_per_s(result, "kvstore")
    loaded = any(p["mode"] == "closed" or (p.get("offered_per_s") or 0) > TARGET_RATE for p in result["phases"])
    if sat is not None and loaded:
        verdict = "met" if sat >= TARGET_KEYS_PER_S else "not met"
        lines.append(
            f"- saturation ≥ {TARGET_KEYS_PER_S:,} keys/s at K=1000: **{verdict}**"
            f" (best {sat:,.0f} keys/s, {sat / TARGET_KEYS_PER_S:.2f}× the target)"
        )
    return "### Targets (issue #3)\n\n" + "\n".join(lines) + "\n" if lines else ""


def _p99_targets(phase: dict[str, Any], field: str, what: str) -> list[str]:
    kv = _p(phase, "kvstore", "p99", field)
    if not kv:
        return []
    lines = []
    # the peer is the better of the two redis-py clients (threads or asyncio) in this run
    candidates = [(p, n) for n in ("redis", "redis_asyncio") if (p := _p(phase, n, "p99", field))]
    redis_p99, redis_name = min(candidates) if candidates else (None, "")
    if redis_p99:
        ok = kv <= redis_p99
        lines.append(
            f"- kvstore p99 ≤ Redis MGET p99 at 200/s ({what}, best client: {redis_name}): "
            f"**{'met' if ok else 'not met'}** "
            f"(kvstore {ms(kv)} ms vs Redis {ms(redis_p99)} ms: Redis/kvstore {redis_p99 / kv:.2f}×, "
            + ("margin" if ok else "over by")
            + f" {abs(redis_p99 - kv) / 1000:.2f} ms)"
        )
    cluster_p99 = _p(phase, "redis_cluster", "p99", field)
    if cluster_p99:
        ratio = cluster_p99 / kv
        s = phase["systems"]["redis_cluster"]
        held = (
            "" if s.get("sustained") else f"; Redis Cluster did not hold 200/s: {s['achieved_per_s']:,.0f}/s achieved"
        )
        lines.append(
            f"- ≥ 3× lower p99 than Redis Cluster at 200/s ({what}): **{'met' if ratio >= 3 else 'not met'}** "
            f"({ratio:.2f}× lower: kvstore {ms(kv)} ms vs Redis Cluster {ms(cluster_p99)} ms{held})"
        )
    return lines
