"""A benchmark scenario: one small TOML file in `bench/scenarios/`, loaded into a frozen dataclass.

Every field has a default, so a scenario file names only what it changes. `--set key=value`
on the command line overrides a field (the value is parsed as TOML, so `rates=[100,200]`
and `partial=true` work). `validate()` raises `ScenarioError` naming the field, the value
and the limit.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

SCENARIO_DIR = os.path.join(os.path.dirname(__file__), "scenarios")

SYSTEMS = ("kvstore", "redis", "redis_asyncio", "redis_cluster", "floor_rocksdict", "floor_numpy")
"""Every system the harness knows, in report order (kvstore first, floors last). Besides these,
`kvstore_r<N>` is kvstore with N copies of each partition, so one run can hold a single-copy
and a replicated cluster side by side (`kvstore` itself has the scenario's `replicas`)."""
KVSTORE_REPLICAS = re.compile(r"kvstore_r([0-9]+)")
LEADER = "leader"
"""An action's node that means: the node leading the most partitions when the action runs
(kill), or the node an earlier `leader` kill stopped (restart)."""

DISTRIBUTIONS = ("uniform", "zipf")
DTYPES = ("float32", "float16")
ACTIONS = ("kill", "restart", "add_node")
REDIS_CLIENTS = ("thread", "asyncio")
MAX_PLANNED_S = 1800.0  # one run, all systems and phases: well above the ~10 min a full run should take


class ScenarioError(ValueError):
    """A scenario file or override is invalid; the message names the field and the limit."""


@dataclass(frozen=True)
class Action:
    """One step of a run's timeline: at `at_s` seconds into the measurement, do `action` to `node`."""

    at_s: float
    action: str
    node: str = ""

    def validate(self) -> None:
        if self.action not in ACTIONS:
            raise ScenarioError(f"actions: action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if self.at_s < 0:
            raise ScenarioError(f"actions: at_s {self.at_s} must be >= 0")
        if self.action in ("kill", "restart") and not self.node:
            raise ScenarioError(f"actions: {self.action!r} at {self.at_s} s needs a node (e.g. 'n2')")


@dataclass(frozen=True)
class Scenario:
    """What one benchmark run measures; see `docs/benchmarks.md` for each field's meaning."""

    name: str
    description: str = ""
    # data
    keys: int = 1_000_000
    dim: int = 64
    dtype: str = "float32"
    seed: int = 7
    # requests
    batch_keys: int = 1000
    distribution: str = "uniform"
    zipf_alpha: float = 1.1
    unique_batches: bool = False
    write_fraction: float = 0.0
    write_stream_rate: float = 0.0
    write_stream_keys: int = 100
    # load: open loop at each rate (batches/s), then closed loop at each concurrency
    rates: tuple[float, ...] = (200.0,)
    concurrency: tuple[int, ...] = ()
    duration_s: float = 20.0
    slice_s: float = 2.0
    warmup_s: float = 1.0
    max_inflight: int = 64
    deadline_s: float = 1.0
    partial: bool = False
    check_every: int = 10
    stop_when_overloaded: bool = True
    slo_p99_ms: float = 50.0
    # systems
    systems: tuple[str, ...] = SYSTEMS
    nodes: int = 3
    partitions: int = 64
    replicas: int = 1
    cache_bytes: str = "256MiB"
    redis_client: str = "thread"
    actions: tuple[Action, ...] = field(default=())

    def validate(self) -> Scenario:
        """Raise `ScenarioError` for the first invalid field; return self."""
        self._check_data()
        self._check_load()
        self._check_systems()
        return self

    def _check_data(self) -> None:
        _at_least("keys", self.keys, 1)
        _at_least("dim", self.dim, 1)
        _at_least("batch_keys", self.batch_keys, 1)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("distribution", self.distribution, DISTRIBUTIONS)
        if self.unique_batches and (self.distribution != "uniform" or self.batch_keys > self.keys):
            raise ScenarioError(
                f"unique_batches: needs distribution = 'uniform' and batch_keys <= keys "
                f"(got {self.distribution}, {self.batch_keys} > {self.keys}?)"
            )
        if self.zipf_alpha <= 0:
            raise ScenarioError(f"zipf_alpha: {self.zipf_alpha} must be > 0")
        if not 0.0 <= self.write_fraction <= 1.0:
            raise ScenarioError(f"write_fraction: {self.write_fraction} must be within [0, 1]")
        if not 0.0 <= self.write_stream_rate <= 1000.0:
            raise ScenarioError(f"write_stream_rate: {self.write_stream_rate} batches/s must be within [0, 1000]")
        _at_least("write_stream_keys", self.write_stream_keys, 1)

    def _check_load(self) -> None:
        if not self.rates and not self.concurrency:
            raise ScenarioError("rates/concurrency: give at least one open-loop rate or closed-loop concurrency")
        for rate in self.rates:
            if not 0 < rate <= 100_000:
                raise ScenarioError(f"rates: {rate} batches/s must be within (0, 100000]")
        for conc in self.concurrency:
            if not 1 <= conc <= 256:
                raise ScenarioError(f"concurrency: {conc} must be within [1, 256]")
        _at_least("duration_s", self.duration_s, 0.1)
        _at_least("slice_s", self.slice_s, 0.1)
        _at_least("max_inflight", self.max_inflight, 1)
        _at_least("check_every", self.check_every, 1)
        if self.deadline_s <= 0:
            raise ScenarioError(f"deadline_s: {self.deadline_s} must be > 0")
        if self.planned_s() > MAX_PLANNED_S:
            raise ScenarioError(
                f"duration_s: the run would measure for {self.planned_s():.0f} s, "
                f"over the limit of {MAX_PLANNED_S:.0f} s"
            )

    def _check_systems(self) -> None:
        if not self.systems:
            raise ScenarioError("systems: give at least one of " + ", ".join(SYSTEMS))
        _at_least("nodes", self.nodes, 1)
        _at_least("partitions", self.partitions, 1)
        if not 1 <= self.replicas <= self.nodes:
            raise ScenarioError(f"replicas: {self.replicas} must be within [1, nodes = {self.nodes}]")
        for name in self.systems:
            if KVSTORE_REPLICAS.fullmatch(name):
                copies = int(name.removeprefix("kvstore_r"))
                if not 1 <= copies <= self.nodes:
                    raise ScenarioError(
                        f"systems: {name!r} asks for {copies} copies, must be within [1, nodes = {self.nodes}]"
                    )
            else:
                _one_of("systems", name, (*SYSTEMS, "kvstore_r<N>"))
        if len(set(self.systems)) != len(self.systems):
            raise ScenarioError(f"systems: {list(self.systems)} names a system twice")
        _one_of("redis_client", self.redis_client, REDIS_CLIENTS)
        for action in self.actions:
            action.validate()
        if self.actions and (len(self.systems) != 1 or self.kvstore_replicas(self.systems[0]) is None
                             or len(self.phases()) != 1):  # fmt: skip
            raise ScenarioError(
                "actions: a timeline needs one kvstore system (e.g. systems = ['kvstore']) and exactly one rate "
                "or concurrency"
            )
        if self.write_stream_rate and not all(self.kvstore_replicas(n) is not None for n in self.systems):
            raise ScenarioError("write_stream_rate: the concurrent write stream runs on kvstore systems only")

    def kvstore_replicas(self, name: str) -> int | None:
        """Return the copies per partition of kvstore system `name` (None: not a kvstore system)."""
        if name == "kvstore":
            return self.replicas
        match = KVSTORE_REPLICAS.fullmatch(name)
        return int(match.group(1)) if match else None

    def phases(self) -> list[tuple[str, float]]:
        """Return the load phases in run order: ("open", rate) ..., then ("closed", concurrency) ..."""
        return [("open", float(r)) for r in self.rates] + [("closed", float(c)) for c in self.concurrency]

    def slices(self) -> int:
        """Return how many rotation slices each phase is cut into (1 when a timeline needs one piece)."""
        if self.actions or len(self.systems) == 1:
            return 1
        return max(1, round(self.duration_s / self.slice_s))

    def planned_s(self) -> float:
        """Return the measured seconds of the whole run (all systems, all phases), warm-up included."""
        return len(self.systems) * (len(self.phases()) * self.duration_s + self.warmup_s)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ScenarioError(f"{name}: {value} must be >= {low}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ScenarioError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def scenario_path(name_or_path: str) -> str:
    """Resolve a scenario name (`k1000_uniform`) or a file path; raise `ScenarioError` if missing."""
    if os.path.sep in name_or_path or name_or_path.endswith((".toml", ".json")):
        path = name_or_path
    else:
        path = os.path.join(SCENARIO_DIR, f"{name_or_path}.toml")
    if not os.path.isfile(path):
        raise ScenarioError(f"scenario {name_or_path!r}: no file {path}; 'kvstore bench list' shows the scenarios")
    return path


def list_scenarios() -> list[tuple[str, str]]:
    """Return (name, description) of every scenario file in `bench/scenarios/`."""
    out = []
    for fname in sorted(os.listdir(SCENARIO_DIR)):
        if fname.endswith(".toml"):
            scn = load_scenario(fname[: -len(".toml")])
            out.append((scn.name, scn.description))
    return out


def load_scenario(name_or_path: str, overrides: dict[str, Any] | None = None) -> Scenario:
    """Load, override and validate a scenario; raise `ScenarioError` on any problem."""
    path = scenario_path(name_or_path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario {path}: {exc}") from None
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    data.update(overrides or {})
    return from_dict(data).validate()


def from_dict(data: dict[str, Any]) -> Scenario:
    """Build a `Scenario` from plain data (a parsed file or a result JSON's `scenario`)."""
    known = {f.name: f for f in dataclasses.fields(Scenario)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ScenarioError(f"scenario: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = dict(data)
    for name in ("rates", "concurrency", "systems"):
        if name in kwargs:
            value = kwargs[name]
            kwargs[name] = tuple(value) if isinstance(value, list | tuple) else (value,)
    if "actions" in kwargs:
        kwargs["actions"] = tuple(_action(a) for a in kwargs["actions"])
    try:
        return Scenario(**kwargs)
    except TypeError as exc:
        raise ScenarioError(f"scenario: {exc}") from None


def _action(raw: Any) -> Action:
    if isinstance(raw, Action):
        return raw
    if not isinstance(raw, dict):
        raise ScenarioError(f"actions: {raw!r} is not a table like {{at_s = 5, action = 'kill', node = 'n2'}}")
    try:
        return Action(at_s=float(raw["at_s"]), action=str(raw["action"]), node=str(raw.get("node", "")))
    except KeyError as exc:
        raise ScenarioError(f"actions: {raw!r} lacks {exc}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings (value as TOML, else a plain string) into a dict."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ScenarioError(f"--set {item!r}: expected key=value, e.g. duration_s=5")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out
