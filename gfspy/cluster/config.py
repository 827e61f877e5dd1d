"""`cluster.toml`: the one description of a cluster that every node daemon reads.

Every node must read the same file, because ids, votes and fence methods decide who may
act; a node with a different idea of the expected votes could think itself quorate when
it is not. Parsing is strict for the same reason: an unknown key is more likely a typo
that silently disables a safety option than a harmless extra, so it is an error.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DLM_PORT = 21064
DEFAULT_HEARTBEAT_PORT = 21065
DEFAULT_NBD_PORT = 10809

FENCE_METHODS = ("storage", "agent", "manual")


class ConfigError(ValueError):
    """A cluster.toml that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class FenceMethod:
    """One fence level of a node; levels are tried in order until one succeeds."""

    method: str  # storage | agent | manual
    command: str = ""  # agent only: the fence_* program
    options: tuple[tuple[str, str], ...] = ()  # agent only: key=value lines on stdin
    timeout: float | None = None  # agent only: overrides timeouts.fence_timeout


@dataclass(frozen=True)
class NodeConfig:
    """One [[node]] entry."""

    node_id: int
    name: str
    address: str  # DLM listener "host:port"
    heartbeat: str  # heartbeat endpoint "host:port" (UDP), separate from DLM traffic
    votes: int = 1
    fence: tuple[FenceMethod, ...] = ()


@dataclass(frozen=True)
class StorageServer:
    """One [[storage]] entry: a gfspy-blockd export and its control channel."""

    name: str
    nbd: str  # NBD URI of the export
    control: str  # "host:port" of the gfspy-blockd control channel


@dataclass(frozen=True)
class QuorumConfig:
    """[quorum]: votequorum's options."""

    expected_votes: int | None = None  # None: sum of node votes (+ witness votes)
    two_node: bool = False
    wait_for_all: bool = False
    last_man_standing: bool = False
    last_man_standing_window: float = 10.0
    witness: bool = False  # each reachable storage server's control port is one vote


@dataclass(frozen=True)
class Timeouts:
    """[timeouts], in seconds."""

    heartbeat_interval: float = 0.5
    failure_timeout: float = 5.0
    fence_retry: float = 1.0  # first retry delay; doubles after each failed round
    fence_retry_max: float = 30.0
    fence_timeout: float = 60.0  # one attempt of one method
    fence_delay: float = 0.0  # two_node: non-lowest nodes wait this long before fencing
    proposal_timeout: float = 2.0  # coordinator re-proposes when acks are missing
    #: Nodes absent from a new cluster's first view are fenced after this long unless they
    #: join cleanly first (like dlm_controld's startup fencing and post_join_delay).
    startup_fence_delay: float = 30.0


@dataclass(frozen=True)
class ClusterConfig:
    """The whole of cluster.toml, validated."""

    name: str
    nodes: tuple[NodeConfig, ...]
    storage: tuple[StorageServer, ...] = ()
    quorum: QuorumConfig = field(default_factory=QuorumConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    path: str = ""
    #: Shared secret authenticating heartbeat and membership datagrams (HMAC-SHA256).
    key_file: str | None = None

    def node(self, node_id: int) -> NodeConfig:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise ConfigError(f"{self.path or 'cluster.toml'}: no node with id {node_id}")

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(n.node_id for n in self.nodes)

    def votes_of(self, node_id: int) -> int:
        return self.node(node_id).votes


def split_host_port(text: str, default_port: int, what: str) -> tuple[str, int]:
    """Parse "host:port", "host" or "[v6]:port"; raise ConfigError naming `what`."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f'{what}: expected "host:port", got {text!r}')
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{what}: unbalanced '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{what}: bad address {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ConfigError(f"{what}: missing host in {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{what}: bad port in {text!r}")
    return host, int(port_text)


def _take(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any):
    if key not in table:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: missing '{key}'")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # TOML booleans are ints in Python; never accept one for the other.
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{where}: '{key}' must be {_kind_name(kinds)}, not a boolean")
    if not isinstance(value, kinds):
        raise ConfigError(f"{where}: '{key}' must be {_kind_name(kinds)}, got {value!r}")
    return value


_REQUIRED = object()


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'")


def _positive(value: float, key: str, where: str) -> float:
    if value <= 0:
        raise ConfigError(f"{where}: '{key}' must be positive, got {value!r}")
    return float(value)


def _parse_fence(raw: Any, where: str) -> FenceMethod:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    _check_keys(raw, {"method", "command", "options", "timeout"}, where)
    method = _take(raw, "method", str, where, _REQUIRED)
    if method not in FENCE_METHODS:
        raise ConfigError(f"{where}: unknown fence method {method!r} (storage, agent or manual)")
    if method != "agent":
        extra = sorted(set(raw) - {"method"})
        if extra:
            raise ConfigError(f"{where}: '{extra[0]}' only applies to method \"agent\"")
        return FenceMethod(method)
    command = _take(raw, "command", str, where, _REQUIRED)
    if not command.strip():
        raise ConfigError(f"{where}: 'command' is empty")
    options_raw = _take(raw, "options", dict, where, {})
    options: list[tuple[str, str]] = []
    for key, value in options_raw.items():
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: option '{key}' must be a plain value")
        if isinstance(value, bool):
            value = "1" if value else "0"
        text = str(value)
        if "\n" in text or "\n" in key or "=" in key:
            raise ConfigError(f"{where}: option '{key}' cannot contain newlines or '='")
        options.append((key, text))
    timeout = _take(raw, "timeout", (int, float), where, None)
    if timeout is not None:
        timeout = _positive(timeout, "timeout", where)
    return FenceMethod("agent", command=command, options=tuple(options), timeout=timeout)


def _parse_node(raw: Any, index: int, has_storage: bool) -> NodeConfig:
    where = f"node #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table ([[node]])")
    _check_keys(raw, {"id", "name", "address", "heartbeat", "votes", "fence"}, where)
    node_id = _take(raw, "id", int, where, _REQUIRED)
    if not 0 < node_id < 2**31:
        raise ConfigError(f"{where}: 'id' must be a positive integer, got {node_id}")
    where = f"node {node_id}"
    name = _take(raw, "name", str, where, f"node{node_id}")
    address = _take(raw, "address", str, where, _REQUIRED)
    host, port = split_host_port(address, DEFAULT_DLM_PORT, f"{where}: address")
    heartbeat = _take(raw, "heartbeat", str, where, f"{host}:{DEFAULT_HEARTBEAT_PORT}")
    hb_host, hb_port = split_host_port(heartbeat, DEFAULT_HEARTBEAT_PORT, f"{where}: heartbeat")
    for h in (host, hb_host):
        try:
            ipaddress.ip_address(h)
        except ValueError:
            raise ConfigError(f"{where}: address {h!r} must be an IP address") from None
    votes = _take(raw, "votes", int, where, 1)
    if votes < 0:
        raise ConfigError(f"{where}: 'votes' must not be negative")
    fence_raw = _take(raw, "fence", list, where, [])
    fence = tuple(_parse_fence(f, f"{where}: fence #{i + 1}") for i, f in enumerate(fence_raw))
    if not fence:
        raise ConfigError(f"{where}: no fence method; add at least one [[node.fence]]")
    if any(f.method == "storage" for f in fence) and not has_storage:
        raise ConfigError(f'{where}: fence method "storage" needs at least one [[storage]]')
    return NodeConfig(
        node_id=node_id,
        name=name,
        address=f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
        heartbeat=f"{hb_host}:{hb_port}" if ":" not in hb_host else f"[{hb_host}]:{hb_port}",
        votes=votes,
        fence=fence,
    )


def _parse_storage(raw: Any, index: int) -> StorageServer:
    where = f"storage #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table ([[storage]])")
    _check_keys(raw, {"name", "nbd", "control"}, where)
    name = _take(raw, "name", str, where, f"storage{index + 1}")
    nbd = _take(raw, "nbd", str, where, _REQUIRED)
    if not nbd.startswith(("nbd://", "nbd+unix://", "nbds://")):
        raise ConfigError(f"{where}: 'nbd' must be an NBD URI (nbd://host:port/export)")
    control = _take(raw, "control", str, where, _REQUIRED)
    host, port = split_host_port(control, 0, f"{where}: control")
    if port == 0:
        raise ConfigError(f"{where}: 'control' needs an explicit port")
    return StorageServer(name=name, nbd=nbd, control=control)


def _parse_quorum(raw: Any, node_count: int) -> QuorumConfig:
    where = "[quorum]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    _check_keys(
        raw,
        {
            "expected_votes",
            "two_node",
            "wait_for_all",
            "last_man_standing",
            "last_man_standing_window",
            "witness",
        },
        where,
    )
    expected = _take(raw, "expected_votes", int, where, None)
    if expected is not None and expected <= 0:
        raise ConfigError(f"{where}: 'expected_votes' must be positive")
    two_node = _take(raw, "two_node", bool, where, False)
    if two_node and node_count != 2:
        raise ConfigError(f"{where}: two_node needs exactly 2 nodes, found {node_count}")
    # Like votequorum, two_node turns wait_for_all on unless explicitly turned off.
    wait_for_all = _take(raw, "wait_for_all", bool, where, two_node)
    lms = _take(raw, "last_man_standing", bool, where, False)
    window = _take(raw, "last_man_standing_window", (int, float), where, 10.0)
    _positive(window, "last_man_standing_window", where)
    if lms and not wait_for_all:
        raise ConfigError(f"{where}: last_man_standing needs wait_for_all = true")
    witness = _take(raw, "witness", bool, where, False)
    return QuorumConfig(expected, two_node, wait_for_all, lms, float(window), witness)


def _parse_timeouts(raw: Any) -> Timeouts:
    where = "[timeouts]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    defaults = Timeouts()
    names = list(Timeouts.__dataclass_fields__)
    _check_keys(raw, set(names), where)
    values: dict[str, float] = {}
    for key in names:
        value = _take(raw, key, (int, float), where, getattr(defaults, key))
        if key in ("fence_delay", "startup_fence_delay"):
            if value < 0:
                raise ConfigError(f"{where}: '{key}' must not be negative")
            values[key] = float(value)
        else:
            values[key] = _positive(value, key, where)
    t = Timeouts(**values)
    if t.failure_timeout < 2 * t.heartbeat_interval:
        raise ConfigError(
            f"{where}: failure_timeout ({t.failure_timeout}) must be at least twice "
            f"heartbeat_interval ({t.heartbeat_interval})"
        )
    if t.fence_retry_max < t.fence_retry:
        raise ConfigError(f"{where}: fence_retry_max must be >= fence_retry")
    return t


def parse_config(data: dict[str, Any], path: str = "") -> ClusterConfig:
    """Build a ClusterConfig from parsed TOML, raising ConfigError with one clear line."""
    prefix = f"{path}: " if path else ""
    try:
        _check_keys(data, {"cluster", "node", "storage", "quorum", "timeouts"}, "top level")
        cluster = _take(data, "cluster", dict, "top level", _REQUIRED)
        _check_keys(cluster, {"name", "key_file"}, "[cluster]")
        name = _take(cluster, "name", str, "[cluster]", _REQUIRED)
        key_file = _take(cluster, "key_file", str, "[cluster]", None)
        if key_file is not None and not key_file.startswith("/"):
            raise ConfigError("[cluster]: key_file must be an absolute path")
        if not name or len(name) > 32 or not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(
                f"[cluster]: name {name!r} must be 1-32 letters, digits, '-' or '_' "
                "(it becomes the GFS2 lock table prefix)"
            )
        storage_raw = _take(data, "storage", list, "top level", [])
        storage = tuple(_parse_storage(s, i) for i, s in enumerate(storage_raw))
        if len({s.name for s in storage}) != len(storage):
            raise ConfigError("[[storage]]: duplicate storage server name")
        nodes_raw = _take(data, "node", list, "top level", _REQUIRED)
        if not nodes_raw:
            raise ConfigError("no [[node]] entries")
        nodes = tuple(_parse_node(n, i, bool(storage)) for i, n in enumerate(nodes_raw))
        seen: dict[str, int] = {}
        for n in nodes:
            for label, value in (("id", str(n.node_id)), ("name", n.name)):
                if f"{label}={value}" in seen:
                    raise ConfigError(f"node {n.node_id}: duplicate {label} {value!r}")
                seen[f"{label}={value}"] = n.node_id
            for label, value in (("address", n.address), ("heartbeat", n.heartbeat)):
                if f"ep={value}" in seen:
                    raise ConfigError(
                        f"node {n.node_id}: {label} {value} is already used by node "
                        f"{seen[f'ep={value}']}"
                    )
                seen[f"ep={value}"] = n.node_id
        nodes = tuple(sorted(nodes, key=lambda n: n.node_id))
        quorum = _parse_quorum(data.get("quorum", {}), len(nodes))
        if quorum.witness and not storage:
            raise ConfigError("[quorum]: witness = true needs at least one [[storage]]")
        timeouts = _parse_timeouts(data.get("timeouts", {}))
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None
    return ClusterConfig(name, nodes, storage, quorum, timeouts, path, key_file)


MIN_KEY_LEN = 16


def load_key(config: ClusterConfig) -> bytes | None:
    """The cluster key named by key_file (None when not configured); ConfigError if unusable.

    Without a key anyone who can send UDP to a heartbeat port could forge a fence
    confirmation or expel a node, so production clusters should set one.
    """
    if config.key_file is None:
        return None
    try:
        with open(config.key_file, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"{config.key_file}: cannot read cluster key: {exc.strerror}") from None
    if len(key) < MIN_KEY_LEN:
        raise ConfigError(
            f"{config.key_file}: cluster key must be at least {MIN_KEY_LEN} bytes "
            "(e.g. head -c 32 /dev/urandom | base64 > FILE)"
        )
    return key


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate cluster.toml; every failure is a ConfigError with one line."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    return parse_config(data, path)
