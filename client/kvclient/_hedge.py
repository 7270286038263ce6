"""When to hedge a read sub-request, and how many hedges to allow: pure, no clocks or I/O.

A hedge sends a node's share of a read to other replicas when the node has not answered
after a delay; the first full answer wins. The delay adapts to each node: a smoothed
latency plus four mean deviations (the TCP retransmit-timer rule), clamped to
[`min_ms`, `after_ms`], so a node that usually answers in 0.5 ms is hedged after ~1 ms and
a slow-but-steady one only after the cap. A token bucket bounds the extra load: each
sub-request earns `ratio` of a token, each hedge spends one, so at most about
`ratio` x sub-requests (+ `burst`) are hedged however slow the cluster gets.

Not thread-safe: one `Hedging` belongs to one client event loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvclient._errors import ClientError

_GAIN = 1 / 8  # weight of a new sample in the smoothed latency (RFC 6298's alpha)
_DEV_GAIN = 1 / 4  # weight of a new sample in the mean deviation (RFC 6298's beta)
_DEV_FACTOR = 4.0  # delay = smoothed + 4 x deviation


@dataclass(frozen=True)
class HedgePolicy:
    """Hedged-read settings; `after_ms=None` (or 0) turns hedging off."""

    after_ms: float | None = 5.0  # cap of the adaptive delay
    min_ms: float = 1.0  # floor of the adaptive delay (below it, a hedge mostly duplicates work)
    ratio: float = 0.1  # hedges per sub-request, in the long run
    burst: float = 10.0  # hedges allowed at once after a quiet period

    @property
    def enabled(self) -> bool:
        return bool(self.after_ms)

    def validate(self) -> None:
        """Raise `ClientError` naming the first setting out of range."""
        if self.after_ms is not None and not (_is_number(self.after_ms) and 0 <= self.after_ms <= 60_000):
            message = f"hedge_after_ms: {self.after_ms!r} must be None or in [0, 60000]"
            raise ClientError(message, field="hedge_after_ms")
        if not (_is_number(self.min_ms) and 0 <= self.min_ms <= (self.after_ms or math.inf)):
            raise ClientError(f"hedge_min_ms: {self.min_ms!r} must be in [0, hedge_after_ms]", field="hedge_min_ms")
        if not (_is_number(self.ratio) and 0 <= self.ratio <= 1):
            raise ClientError(f"hedge_ratio: {self.ratio!r} must be in [0, 1]", field="hedge_ratio")
        if not (_is_number(self.burst) and 1 <= self.burst <= 1000):
            raise ClientError(f"hedge_burst: {self.burst!r} must be in [1, 1000]", field="hedge_burst")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class LatencyEstimate:
    """Smoothed latency and mean deviation of one node's read sub-requests, in seconds."""

    def __init__(self) -> None:
        self.samples = 0
        self.smoothed_s = 0.0
        self.deviation_s = 0.0

    def record(self, latency_s: float) -> None:
        """Fold in one observed latency (negative values count as 0)."""
        latency_s = max(0.0, latency_s)
        if self.samples == 0:
            self.smoothed_s, self.deviation_s = latency_s, latency_s / 2
        else:
            self.deviation_s += _DEV_GAIN * (abs(latency_s - self.smoothed_s) - self.deviation_s)
            self.smoothed_s += _GAIN * (latency_s - self.smoothed_s)
        self.samples += 1

    def delay_s(self, min_s: float, cap_s: float) -> float:
        """Return how long to wait before hedging: the estimate clamped to [min_s, cap_s]."""
        if self.samples == 0:
            return cap_s
        return min(cap_s, max(min_s, self.smoothed_s + _DEV_FACTOR * self.deviation_s))


class HedgeBudget:
    """Token bucket: `earn()` per sub-request adds `ratio` tokens (up to `burst`); a hedge costs one."""

    def __init__(self, ratio: float, burst: float) -> None:
        self.ratio = ratio
        self.burst = burst
        self.tokens = burst

    def earn(self, requests: int = 1) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio * requests)

    def take(self) -> bool:
        """Spend one token if there is one; return whether a hedge may be sent."""
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Hedging:
    """Per-node latency estimates plus the shared budget of one client."""

    def __init__(self, policy: HedgePolicy) -> None:
        policy.validate()
        self.policy = policy
        self.budget = HedgeBudget(policy.ratio, policy.burst)
        self._latency: dict[str, LatencyEstimate] = {}

    def delay_s(self, node_id: str) -> float:
        """Return how long a read sub-request to `node_id` may run before it is hedged."""
        cap_s = (self.policy.after_ms or 0.0) / 1000
        estimate = self._latency.get(node_id)
        if estimate is None:
            return cap_s
        return estimate.delay_s(min(self.policy.min_ms / 1000, cap_s), cap_s)

    def record(self, node_id: str, latency_s: float) -> None:
        """Fold one answered sub-request's latency into the node's estimate."""
        estimate = self._latency.get(node_id)
        if estimate is None:
            estimate = self._latency[node_id] = LatencyEstimate()
        estimate.record(latency_s)
