"""Scenarios of ``python -m simulations run``: what to simulate, read from TOML and command-line overrides.

A scenario is a TOML file (``simulations/scenarios/*.toml``) whose top-level keys and sections match the
dataclasses below; anything left out keeps its default, anything unknown is an error naming the key.  Flags and
``--set section.key=value`` override the file.  Times are in seconds (``_s``), latencies in milliseconds (``_ms``).

Distributions are inline tables with a ``kind``:

* latencies (one way, per datagram): ``{kind = "constant", ms = 20}``, ``{kind = "uniform", low_ms = 10,
  high_ms = 60}``, ``{kind = "lognormal", median_ms = 60, sigma = 0.5, cap_ms = 2000}``;
* durations (sessions, offline periods): ``{kind = "constant", s = 600}``, ``{kind = "uniform", low_s = 600,
  high_s = 3600}``, ``{kind = "exponential", mean_s = 1800, min_s = 60}``, ``{kind = "lognormal", median_s = 1800,
  sigma = 1.0, cap_s = 86400}``.

A latency *matrix* replaces the distribution with ``[network.regions]``: region ``names``, the ``shares`` of hosts
in each, the median round trip ``rtt_ms`` between each pair of regions, and a log-normal ``sigma`` of per-datagram
jitter around half of it.
"""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from p2pchat.errors import UserError
from p2pchat.net.sim import Constant, LatencyModel, LogNormal, Uniform
from simulations._simkit import Duration, Exponential

__all__ = [
    "ChurnSpec",
    "HostileSpec",
    "LookupSpec",
    "MessagingSpec",
    "NetworkSpec",
    "RegionsSpec",
    "Scenario",
    "ScenarioError",
    "Target",
    "apply_overrides",
    "duration_model",
    "latency_model",
    "load_scenario",
    "mean_of",
    "parse_value",
    "scenario_from_dict",
    "with_seed",
]

MIN_DHT_NODES = 2
"""DHT nodes a scenario needs besides its messaging Nodes (a lookup always asks another node)."""

LIE_KINDS = ("far", "fake", "mixed")
"""How lying nodes answer find_node: the contacts they know farthest from the target, fabricated ids right next to
it at addresses where nobody listens, or each liar one of the two (drawn from the seed)."""


class ScenarioError(UserError):
    """A scenario file or override that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class RegionsSpec:
    """A latency matrix: hosts spread over regions, median RTT per pair of regions."""

    names: list[str] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    rtt_ms: list[list[float]] = field(default_factory=list)
    sigma: float = 0.2


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """Links between every two hosts."""

    latency: dict[str, Any] = field(default_factory=lambda: {"kind": "uniform", "low_ms": 10.0, "high_ms": 60.0})
    regions: RegionsSpec | None = None
    loss: float = 0.0
    duplicate: float = 0.0
    time_resolution_ms: float = 1.0


@dataclass(frozen=True, slots=True)
class LookupSpec:
    """``find_node`` lookups of random keys from random honest nodes, started at random moments of the run."""

    count: int = 1000
    targeted: int = 0
    """More lookups, of the keys the Sybil clusters aim at (reported separately)."""


@dataclass(frozen=True, slots=True)
class ChurnSpec:
    """Plain DHT nodes going offline and coming back; contacts that vanish for good."""

    rate_per_hour: float = 0.0
    """Share of the plain DHT nodes going offline per hour (sessions are then exponential)."""
    offline: dict[str, Any] = field(default_factory=lambda: {"kind": "exponential", "mean_s": 1800.0, "min_s": 60.0})
    session: dict[str, Any] | None = None
    """Online-session distribution; when given it replaces the one ``rate_per_hour`` implies."""
    dead_fraction: float = 0.0
    """Share of the plain DHT nodes that vanish without leaving when the workload starts (never come back)."""


@dataclass(frozen=True, slots=True)
class HostileSpec:
    """Nodes that run the real code but answer falsely or not at all (they join like everyone else)."""

    silent_fraction: float = 0.0
    """Share of all nodes that answer pings (so they stay in routing tables) and nothing else."""
    lying_fraction: float = 0.0
    """Share of all nodes that answer lookups with wrong contacts, claim to hold nothing, and acknowledge stores
    they throw away."""
    lie: str = "mixed"
    targeted_keys: int = 0
    """Mailbox keys of messaging recipients that Sybil clusters aim at (the first recipients')."""
    sybils: int = 0
    """Sybil nodes per targeted key, their ids ground to share a prefix with it; they lie as one (naming each
    other), claim to hold nothing and throw stores away."""
    sybil_prefix_bits: int = 0
    """Bits each Sybil id shares with its key (0: enough to be closer than any honest node is likely to be)."""


@dataclass(frozen=True, slots=True)
class MessagingSpec:
    """Pairs of full Nodes: the sender sends messages at random moments; some recipients are away for a while."""

    pairs: int = 0
    messages_per_pair: int = 5
    offline_share: float = 0.0
    """Share of recipients that go offline once during the run (those whose mailbox is targeted always do)."""
    offline: dict[str, Any] = field(default_factory=lambda: {"kind": "uniform", "low_s": 600.0, "high_s": 3600.0})
    settle_s: float = 3600.0
    """Virtual seconds after the run the messages may still take to arrive (the run ends earlier when all did)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A figure the scenario should reach: ``metric`` is a dotted path into the results (``lookups.success``)."""

    metric: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ScenarioError(f"target {self.metric}: op must be '<=' or '>=', not {self.op!r}")


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything a run needs; the same scenario and seed give the same results."""

    name: str = "custom"
    description: str = ""
    seed: int = 1
    nodes: int = 1000
    """All nodes: plain DHT nodes (honest, hostile, Sybils) plus two full Nodes per messaging pair."""
    join_batch: int = 100
    duration_s: float = 120.0
    """Virtual seconds of workload after everyone joined: lookups and messages start within it."""
    sample_interval_s: float = 60.0
    """Virtual seconds between samples of replicas and storage."""
    network: NetworkSpec = field(default_factory=NetworkSpec)
    lookups: LookupSpec = field(default_factory=LookupSpec)
    churn: ChurnSpec = field(default_factory=ChurnSpec)
    hostile: HostileSpec = field(default_factory=HostileSpec)
    messaging: MessagingSpec = field(default_factory=MessagingSpec)
    targets: list[Target] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self)

    @property
    def dht_nodes(self) -> int:
        """Plain DHT nodes (the rest are the messaging pairs' Nodes)."""
        return self.nodes - 2 * self.messaging.pairs

    @property
    def sybil_count(self) -> int:
        """Sybil nodes in all."""
        return self.hostile.sybils * self.hostile.targeted_keys

    def to_dict(self) -> dict[str, Any]:
        """The scenario as plain data (the results echo it)."""
        return asdict(self)


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ScenarioError(f"{name} must be between 0 and 1, got {value}")


def _check(s: Scenario) -> None:
    if s.nodes < 1 or s.join_batch < 1:
        raise ScenarioError("nodes and join_batch must be at least 1")
    if s.duration_s <= 0 or s.sample_interval_s <= 0:
        raise ScenarioError("duration_s and sample_interval_s must be positive")
    if s.dht_nodes < MIN_DHT_NODES:
        raise ScenarioError(f"{s.nodes} nodes leave fewer than {MIN_DHT_NODES} plain DHT nodes beside the pairs")
    for name in ("loss", "duplicate"):
        _fraction(f"network.{name}", getattr(s.network, name))
    if s.network.time_resolution_ms < 0:
        raise ScenarioError("network.time_resolution_ms cannot be negative")
    latency_model(s.network.latency)
    if s.network.regions is not None:
        _check_regions(s.network.regions)
    if s.lookups.count < 0 or s.lookups.targeted < 0:
        raise ScenarioError("lookups.count and lookups.targeted cannot be negative")
    if s.lookups.targeted and not s.hostile.targeted_keys:
        raise ScenarioError("lookups.targeted needs hostile.targeted_keys (the keys it looks up)")
    _fraction("churn.dead_fraction", s.churn.dead_fraction)
    if s.churn.rate_per_hour < 0:
        raise ScenarioError("churn.rate_per_hour cannot be negative")
    duration_model(s.churn.offline, "churn.offline")
    if s.churn.session is not None:
        duration_model(s.churn.session, "churn.session")
    elif s.churn.rate_per_hour > 0:
        cycle = 3600.0 / s.churn.rate_per_hour
        offline = duration_model(s.churn.offline, "churn.offline")
        if not isinstance(offline, Exponential) or offline.mean >= cycle:
            raise ScenarioError(
                "churn.rate_per_hour needs an exponential churn.offline shorter on average than 1 / rate "
                "(or give churn.session)"
            )
    h = s.hostile
    _fraction("hostile.silent_fraction", h.silent_fraction)
    _fraction("hostile.lying_fraction", h.lying_fraction)
    if h.lie not in LIE_KINDS:
        raise ScenarioError(f"hostile.lie must be one of {', '.join(LIE_KINDS)}, not {h.lie!r}")
    if h.targeted_keys < 0 or h.sybils < 0 or not 0 <= h.sybil_prefix_bits <= 32:
        raise ScenarioError("hostile.targeted_keys and sybils cannot be negative; sybil_prefix_bits is 0..32")
    if h.targeted_keys > s.messaging.pairs:
        raise ScenarioError("hostile.targeted_keys names recipients' mailboxes: it cannot exceed messaging.pairs")
    honest_plain = s.dht_nodes - s.sybil_count - round((h.silent_fraction + h.lying_fraction) * s.nodes)
    if honest_plain < 1:
        raise ScenarioError("hostile nodes leave no honest plain DHT node")
    m = s.messaging
    if m.pairs < 0 or m.messages_per_pair < 0 or m.settle_s < 0:
        raise ScenarioError("messaging.pairs, messages_per_pair and settle_s cannot be negative")
    _fraction("messaging.offline_share", m.offline_share)
    duration_model(m.offline, "messaging.offline")


def _check_regions(r: RegionsSpec) -> None:
    n = len(r.names)
    if n == 0 or len(r.shares) != n or len(r.rtt_ms) != n or any(len(row) != n for row in r.rtt_ms):
        raise ScenarioError("network.regions needs names, shares and an n-by-n rtt_ms for the same n regions")
    if any(x < 0 for x in r.shares) or sum(r.shares) <= 0:
        raise ScenarioError("network.regions.shares must be non-negative and not all zero")
    if any(x <= 0 for row in r.rtt_ms for x in row) or r.sigma < 0:
        raise ScenarioError("network.regions.rtt_ms must be positive and sigma non-negative")


# --- distributions ---------------------------------------------------------------------------------------------


def _dist(spec: dict[str, Any], where: str, unit: str, scale: float) -> LatencyModel:
    kind = spec.get("kind")
    params = {k: v for k, v in spec.items() if k != "kind"}
    expected: dict[str, tuple[str, ...]] = {
        "constant": (unit,),
        "uniform": (f"low_{unit}", f"high_{unit}"),
        "lognormal": (f"median_{unit}", "sigma", f"cap_{unit}"),
        "exponential": (f"mean_{unit}", f"min_{unit}"),
    }
    if unit == "ms":
        expected.pop("exponential")
    if kind not in expected:
        raise ScenarioError(f"{where}: kind must be one of {', '.join(expected)}, not {kind!r}")
    unknown = set(params) - set(expected[kind])
    if unknown:
        raise ScenarioError(f"{where}: unknown parameter(s) {', '.join(sorted(unknown))} for kind {kind!r}")
    try:
        values = {k: float(v) for k, v in params.items()}
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{where}: parameters must be numbers") from exc
    if any(v < 0 for v in values.values()):
        raise ScenarioError(f"{where}: parameters cannot be negative")
    try:
        if kind == "constant":
            return Constant(values[unit] * scale)
        if kind == "uniform":
            low, high = values[f"low_{unit}"] * scale, values[f"high_{unit}"] * scale
            if high < low:
                raise ScenarioError(f"{where}: high_{unit} is below low_{unit}")
            return Uniform(low, high)
        if kind == "lognormal":
            cap = values.get(f"cap_{unit}")
            median = values[f"median_{unit}"] * scale
            return LogNormal(median, values.get("sigma", 0.5), cap * scale if cap is not None else median * 100)
        mean = values[f"mean_{unit}"] * scale
        if mean <= 0:
            raise ScenarioError(f"{where}: mean_{unit} must be positive")
        return Exponential(mean, values.get(f"min_{unit}", 0.0) * scale)
    except KeyError as exc:
        raise ScenarioError(f"{where}: missing parameter {exc.args[0]}") from exc


def latency_model(spec: dict[str, Any], where: str = "network.latency") -> LatencyModel:
    """The one-way latency model (seconds) a ``_ms`` distribution table describes."""
    return _dist(spec, where, "ms", 0.001)


def duration_model(spec: dict[str, Any], where: str) -> Duration:
    """The duration model (seconds) an ``_s`` distribution table describes."""
    return _dist(spec, where, "s", 1.0)


def mean_of(model: Duration, seed: int = 0, draws: int = 20_000) -> float:
    """The mean of a duration model, estimated from a fixed number of draws (deterministic for a seed)."""
    rng = random.Random(seed)
    return math.fsum(model.sample(rng) for _ in range(draws)) / draws


# --- loading -----------------------------------------------------------------------------------------------------


def _build(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where or 'scenario'} must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ScenarioError(f"unknown scenario key(s): {', '.join(prefix + u for u in unknown)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        sub = _SECTIONS.get((cls, name))
        if sub is not None:
            values[name] = _build(sub, value, path) if value is not None else None
        elif (cls, name) == (Scenario, "targets"):
            if not isinstance(value, list):
                raise ScenarioError("targets must be a list of tables")
            values[name] = [_build(Target, t, f"targets[{i}]") for i, t in enumerate(value)]
        else:
            values[name] = _coerce(known[name], value, path)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ScenarioError(f"{where or 'scenario'}: {exc}") from exc


def _coerce(f: Any, value: Any, path: str) -> Any:
    annotation = str(f.type)
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{path} must be an integer, got {value!r}")
    elif annotation == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{path} must be a number, got {value!r}")
        value = float(value)
    elif annotation == "str" and not isinstance(value, str):
        raise ScenarioError(f"{path} must be a string, got {value!r}")
    elif annotation.startswith("dict") and not isinstance(value, dict):
        raise ScenarioError(f"{path} must be an inline table, got {value!r}")
    return value


_SECTIONS: dict[tuple[type, str], type] = {
    (Scenario, "network"): NetworkSpec,
    (Scenario, "lookups"): LookupSpec,
    (Scenario, "churn"): ChurnSpec,
    (Scenario, "hostile"): HostileSpec,
    (Scenario, "messaging"): MessagingSpec,
    (NetworkSpec, "regions"): RegionsSpec,
}


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    """Build and check a scenario from plain data (a parsed TOML file with overrides applied)."""
    scenario = _build(Scenario, data, "")
    assert isinstance(scenario, Scenario)
    return scenario


def load_scenario(path: Path | None, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read a scenario file (None: all defaults) and apply ``overrides`` (dotted key -> value)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ScenarioError(f"cannot read scenario {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"scenario {path} is not valid TOML: {exc}") from exc
    return scenario_from_dict(apply_overrides(data, overrides or {}))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each ``section.key`` set (sections are created as needed)."""
    out: dict[str, Any] = _deep_copy(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        table = out
        for part in parts[:-1]:
            nxt = table.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ScenarioError(f"cannot set {dotted}: {part} is not a table")
            table = nxt
        table[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (``0.3``, ``true``, ``{kind = "constant", s = 60}``), or the text
    itself when it is no TOML value (a bare word)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def with_seed(scenario: Scenario, seed: int) -> Scenario:
    """The same scenario with another seed."""
    return replace(scenario, seed=seed)
