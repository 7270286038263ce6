"""Carry out a scenario's timeline (kill, restart, add a node) while the load keeps running.

Each action starts at its second of the measurement (measured from the same origin as
the per-second latency series) in its own task, so a slow restart never holds the load
generator. What happened and when goes into the run's `events` (with what the action
reports, e.g. which node `kill leader` chose and the partitions it led); an action that
fails or is not supported yet is recorded with its error and the run goes on. A kill is
the last step of its action, so a kill event's `done_s` is the moment of the SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from bench.scenario import Action

log = logging.getLogger(__name__)


class ClusterOps(Protocol):
    async def kill(self, node_id: str) -> dict[str, Any]: ...
    async def restart(self, node_id: str) -> dict[str, Any]: ...
    async def add_node(self, node_id: str) -> None: ...


async def run_timeline(actions: tuple[Action, ...], ops: ClusterOps, t0: float) -> list[dict[str, Any]]:
    """Run every action at `t0 + at_s` (perf_counter time); return one event dict per action."""
    return list(await asyncio.gather(*(_one(a, ops, t0) for a in sorted(actions, key=lambda a: a.at_s))))


async def _one(action: Action, ops: ClusterOps, t0: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + action.at_s - time.perf_counter()))
    event: dict[str, Any] = {"at_s": action.at_s, "action": action.action, "node": action.node}
    event["started_s"] = round(time.perf_counter() - t0, 3)
    log.info("action start action=%s node=%s at_s=%.1f", action.action, action.node, event["started_s"])
    try:
        event.update(await getattr(ops, action.action)(action.node) or {})
        event["error"] = None
    except Exception as exc:  # recorded, not fatal: the rest of the timeline still runs
        event["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("action failed action=%s node=%s error=%s", action.action, action.node, exc)
    event["done_s"] = round(time.perf_counter() - t0, 3)
    return event
