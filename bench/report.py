"""Render a run's result dict as Markdown: tables per phase, ratios against each peer, targets.

Pure: takes the dict `bench.runner.run_scenario` returns (or its JSON) and returns text.
Ratios are peer ÷ kvstore, so a ratio above 1 means kvstore is faster.
"""

from __future__ import annotations

from typing import Any

from bench.scenario import KVSTORE_REPLICAS, SYSTEMS

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
TARGET_REPLICATED_WRITES_PER_S = 100_000  # issue #4: 64-dim vectors/s with batched puts, 3 replicas


def ms(us: float | None) -> str:
    return "–" if us is None else f"{us / 1000:.2f}"


def label(name: str) -> str:
    match = KVSTORE_REPLICAS.fullmatch(name)
    if match:
        copies = int(match.group(1))
        return "kvstore, 1 copy" if copies == 1 else f"kvstore, {copies} replicas"
    return LABELS.get(name, name)


def copies(scn: dict[str, Any], name: str) -> int | None:
    """Return the copies per partition of kvstore system `name` in this run (None: not kvstore)."""
    if name == "kvstore":
        return int(scn.get("replicas", 1))
    match = KVSTORE_REPLICAS.fullmatch(name)
    return int(match.group(1)) if match else None


def render(result: dict[str, Any]) -> str:
    """Return the whole Markdown summary of one run."""
    parts = [_header(result), _skipped(result)]
    for phase in result.get("phases", []):
        parts.append(_phase(phase, result["scenario"]))
    parts.append(_sweep(result))
    parts.append(_targets(result))
    parts.append(_replication_targets(result))
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
        f"- kvstore: {scn['nodes']} nodes, {scn['partitions']} partitions, {_copies_text(scn)}, "
        f"cache {scn['cache_bytes']} per node; deadline {scn['deadline_s']} s"
        + (", partial results" if scn["partial"] else ""),
        *_write_stream_text(scn),
        f"- versions: {_versions(env.get('versions', {}))}",
        "",
    ]
    return "\n".join(lines)


def _copies_text(scn: dict[str, Any]) -> str:
    kinds = sorted({c for n in scn["systems"] if (c := copies(scn, n)) is not None})
    return " / ".join("1 copy" if c == 1 else f"{c} replicas" for c in kinds) + " per partition"


def _write_stream_text(scn: dict[str, Any]) -> list[str]:
    if not scn.get("write_stream_rate"):
        return []
    return [
        f"- write stream: {scn['write_stream_rate']:g} puts/s of {scn['write_stream_keys']} keys alongside the "
        "reads (open loop, recorded apart from them)"
    ]


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


def order_key(name: str) -> tuple[int, int]:
    """Report order: SYSTEMS' order, with `kvstore_r<N>` after `kvstore` by N."""
    match = KVSTORE_REPLICAS.fullmatch(name)
    if match:
        return 0, int(match.group(1))
    return (SYSTEMS.index(name) if name in SYSTEMS else 99), 0


def ordered(systems: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return sorted(systems.items(), key=lambda kv: order_key(kv[0]))


def _phase(phase: dict[str, Any], scn: dict[str, Any]) -> str:
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
    lines += ["", *_replication_ratios(phase, scn), *_ratios(phase), *_quiet(phase), *_notes(phase),
              *_timeline(phase), *_failover(phase)]  # fmt: skip
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
        if s.get("hedges"):
            notes.append(f"- {label(name)}: {s['hedges']} hedged sub-requests.")
        stats = s.get("node_stats")
        if stats and stats.get("keys_read"):
            hit = stats["cache_hits"] / max(1, stats["cache_hits"] + stats["cache_misses"])
            notes.append(
                f"- {label(name)}: cache hit rate {hit:.1%} over {stats['keys_read']:,} keys read by the nodes."
            )
    return [*notes, ""] if notes else []


def _timeline(phase: dict[str, Any]) -> list[str]:
    if not phase.get("events"):
        return []
    lines = ["Timeline:", ""]
    for e in phase["events"]:
        outcome = f"error: {e['error']}" if e["error"] else f"done at {e['done_s']:.1f} s"
        lines.append(f"- {e['at_s']:g} s: {e['action']} {e['node']} (started {e['started_s']:.1f} s, {outcome})")
    for name, s in phase["systems"].items():
        if not name.startswith("kvstore") or "per_second" not in s:
            continue
        writes = {r["second"]: r for r in s.get("write_stream", {}).get("per_second", [])}
        head = "| second | reads done | read errors | read p50 ms | read p99 ms | read max ms |"
        if writes:
            head += " writes done | write errors | write p99 ms | write max ms |"
        lines += ["", head, "|---" * head.count(" |") + "|"]
        for row in s["per_second"]:
            line = (
                f"| {row['second']} | {row['completed']} | {row['errors']} | {ms(row['p50_us'])} "
                f"| {ms(row['p99_us'])} | {ms(row['max_us'])} |"
            )
            if writes:
                w = writes.get(row["second"], {})
                line += (
                    f" {w.get('completed', 0)} | {w.get('errors', 0)} | {ms(w.get('p99_us'))} | {ms(w.get('max_us'))} |"
                )
            lines.append(line)
    return [*lines, ""]


def _replication_ratios(phase: dict[str, Any], scn: dict[str, Any]) -> list[str]:
    """Replicated ÷ single-copy kvstore latency, both measured in this run on the same keys."""
    single = next((n for n in phase["systems"] if copies(scn, n) == 1 and "skipped" not in phase["systems"][n]), None)
    replicated = [n for n, _ in ordered(phase["systems"]) if (copies(scn, n) or 0) > 1]
    if single is None or not replicated:
        return []
    rows = []
    for name in replicated:
        cells = []
        for key, field in (("p50", "latency_us"), ("p99", "latency_us"), ("p99.9", "latency_us"),
                           ("p99", "quiet_latency_us")):  # fmt: skip
            one, many = _p(phase, single, key, field), _p(phase, name, key, field)
            cells.append("–" if not one or many is None else f"{ms(many)} ÷ {ms(one)} = {many / one:.2f}×")
        one_med = phase["systems"][single].get("slice_p99_median_us")
        many_med = phase["systems"].get(name, {}).get("slice_p99_median_us")
        cells.append("–" if not one_med or many_med is None else f"{many_med / one_med:.2f}×")
        rows.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    title = f"Replicated ÷ single-copy ({label(single)}) latency, same run, same keys (ms; below 1: replicated faster):"
    head = "| system | p50 | p99 | p99.9 | p99 quiet slices | slice p99 median |"
    return [title, "", head, "|---|---|---|---|---|---|", *rows, ""]


def _failover(phase: dict[str, Any]) -> list[str]:
    """Reads and writes around each kill: read errors, p99 before/after, write failover time and stall."""
    kills = [e for e in phase.get("events", []) if e["action"] == "kill" and not e.get("error")]
    out = []
    for s in phase["systems"].values():
        if not kills or "per_second" not in s:
            continue
        for kill in kills:
            out += _one_failover(s, kill, phase.get("events", []))
    return ["Around the kill:", "", *out, ""] if out else []


def _one_failover(s: dict[str, Any], kill: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    at = kill["done_s"]
    back = next((e["done_s"] for e in events if e["action"] == "restart" and e["node"] == kill["node"]
                 and e["done_s"] > at and not e.get("error")), None)  # fmt: skip
    rows = s["per_second"]
    before = [r["p99_us"] for r in rows if r["second"] < int(at) and r["p99_us"] is not None]
    window = [r for r in rows if int(at) <= r["second"] < int(at) + 5]
    down = [r for r in rows if r["second"] >= int(at) and (back is None or r["second"] <= back)]
    led = kill.get("led_partitions")
    who = f"{kill['node']}" + (f" (leader of {len(led)} partitions)" if led is not None else "")
    lines = [
        f"- kill -9 of {who} at {at:.2f} s" + (f", back at {back:.2f} s" if back is not None else "") + ".",
        f"- reads: {sum(r['errors'] for r in down)} failed while it was down "
        f"({sum(r['completed'] for r in down):,} answered); {sum(r['errors'] for r in rows)} failed in the whole run.",
    ]
    if before and window:
        worst = max((r["p99_us"] or 0) for r in window)
        lines.append(
            f"- read p99 per second: median {ms(sorted(before)[len(before) // 2])} ms before the kill, "
            f"worst {ms(worst)} ms in the 5 s from it."
        )
    ws: dict[str, Any] = s.get("write_stream") or {}
    for f in ws.get("failover", []):
        if f["node"] != kill["node"] or abs(f["kill_s"] - at) > 1e-3:
            continue
        fail = "no write to its partitions was acknowledged" if f["failover_s"] is None else f"{f['failover_s']:.2f} s"
        gap = "–" if f["longest_ack_gap_s"] is None else (
            f"{f['longest_ack_gap_s']:.2f} s from {f['longest_ack_gap_from_s']:.2f} s")  # fmt: skip
        lines += [
            f"- writes ({ws['rate_per_s']:g}/s of {ws['batch_keys']} keys): failover {fail} "
            "(kill to the first acknowledged write due after it on a partition it led); "
            f"longest time without any acknowledged write {gap}; "
            f"{f['errors_after_kill']} of {f['writes_after_kill']} writes due after the kill failed.",
        ]
    return lines


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


def _replication_targets(result: dict[str, Any]) -> str:
    """Issue #4's targets this run can judge: replicated write throughput, reads and writes around a kill."""
    scn = result["scenario"]
    lines = []
    replicated = [n for n in scn["systems"] if (copies(scn, n) or 0) >= 3]
    if scn.get("write_fraction") == 1.0 and scn["dim"] == 64:
        for name in replicated:
            best = max_keys_per_s(result, name)
            if best is None:
                continue
            verdict = "met" if best >= TARGET_REPLICATED_WRITES_PER_S else "not met"
            lines.append(
                f"- replicated write throughput ≥ {TARGET_REPLICATED_WRITES_PER_S:,} vectors/s ({label(name)}, "
                f"batches of {scn['batch_keys']:,}): **{verdict}** (best {best:,.0f} vectors/s, "
                f"{best / TARGET_REPLICATED_WRITES_PER_S:.2f}× the target)"
            )
    for phase in result.get("phases", []):
        kills = [e for e in phase.get("events", []) if e["action"] == "kill" and not e.get("error")]
        for name, s in phase["systems"].items():
            if not kills or (copies(scn, name) or 0) < 2 or "per_second" not in s:
                continue
            at = kills[0]["done_s"]
            errors = sum(r["errors"] for r in s["per_second"] if r["second"] >= int(at))
            lines.append(
                f"- zero read errors after a node kill while a replica lives ({label(name)}): "
                f"**{'met' if errors == 0 else 'not met'}** ({errors} read errors from the kill to the end)"
            )
    return "### Targets (issue #4)\n\n" + "\n".join(lines) + "\n" if lines else ""


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
