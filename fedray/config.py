"""A federation's config as typed, frozen dataclasses: the vocabulary every part reads.

Everything an actor needs travels as one of these objects. Reading a YAML file (or a
mapping, with ``--set`` overrides) into them, with every check and one-line errors that
name the field, is ``fedray.deploy.config_file``: a typo stops `fedray run` before
anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import unquote

from fedray.text import redact


@dataclass(frozen=True)
class RayConfig:
    # "local": start a private Ray (or join the cluster of a `ray job submit` driver);
    # "auto": join the running cluster on this machine; "HOST:PORT": join that one.
    address: str = "local"
    num_cpus: int | None = None
    include_dashboard: bool = False
    # A Ray that fedray starts itself listens on "loopback" only (its GCS, raylet,
    # dashboard and metrics ports: one node needs nothing else), or on "all" interfaces.
    listen: str = "loopback"


@dataclass(frozen=True)
class ControllerConfig:
    host: str = "0.0.0.0"
    port: int = 12080


@dataclass(frozen=True)
class CombinersConfig:
    count: int = 2
    # Where they run: "spread" over the Ray cluster's nodes, or "pack" onto as few as fit;
    # resources: what each takes of a node, e.g. {"fedray_combiner": 1} (only nodes that
    # offer them are eligible; fedray.actors.placement).
    placement: str = "spread"
    resources: dict = field(default_factory=dict)
    # The elastic tier's bounds and target load (fedray.actors.scaling, carried out by the
    # controller's scaler: fedray.actors.controller.scaler). count is the fixed-size
    # shorthand: count N alone means min = max = N; with min and max and no count, the tier
    # starts at min. The scaler looks every scale_interval_s and, after a change, holds for
    # scale_cooldown_s (except to get back within min..max).
    min: int | None = None
    max: int | None = None
    clients_per_combiner: int = 2000
    scale_interval_s: float = 2.0
    scale_cooldown_s: float = 30.0
    host: str = "0.0.0.0"
    base_port: int = 12081  # combiner i listens on base_port + i; 0 picks free ports
    advertise: str = "auto"  # the host clients are told to dial; auto = this node's IP
    max_clients: int = 10_000
    max_inflight_uploads: int = 4
    max_update_mb: float = 2048.0
    chunk_kib: int = 1024
    heartbeat_interval_s: float = 2.0
    offline_after_s: float = 10.0
    max_rpcs_per_s: float = 50.0  # per client: its token's name, else connection + claimed name
    upload_idle_s: float = 30.0  # an upload with no chunk for this long gives its slot back
    max_clients_per_connection: int = 256  # client ids one connection may act for (shared token)
    max_client_events_per_min: float = 20.0  # PushEvents a client may have recorded
    max_event_bytes: int = 2048  # of a client event's message and data, once recorded
    max_connection_age_s: float = 3600.0  # then gRPC closes a connection (after 10 min grace)
    max_connection_idle_s: float = 300.0  # a connection without calls is closed after this
    # Even load: clients move from the most to the least loaded combiner while the spread
    # is over rebalance_tolerance; at most rebalance_max_moves_per_s a second (0: never),
    # only clients that hold no task and joined at least rebalance_settle_s ago.
    rebalance_max_moves_per_s: float = 20.0
    rebalance_tolerance: int = 1
    rebalance_settle_s: float = 5.0


@dataclass(frozen=True)
class SelectConfig:
    """Which online clients a round may ask (all of them when nothing is set)."""

    ids: list = field(default_factory=list)  # only these client ids
    attrs: dict = field(default_factory=dict)  # {key: value or [values]} from --attr KEY=VALUE
    policy: str = ""  # package.module:callable(clients, ctx) -> client ids, over a snapshot


@dataclass(frozen=True)
class SessionConfig:
    rounds: int = 5  # rounds; for an asynchronous strategy (fedbuff), model versions
    aggregator: str = "fedavg"
    aggregator_kwargs: dict = field(default_factory=dict)
    # aggregator: secagg's options (clip, quantization_bits, threshold, ...) as their own
    # block (added to aggregator_kwargs: strategy_options)
    secagg: dict = field(default_factory=dict)
    clients_per_round: float = 1.0  # a fraction (<= 1.0) or a count (> 1)
    min_clients: int = 2
    # a round commits with this many updates at least (0: min_clients): rounds wait for
    # min_clients online and ask them all, and clients that drop out do not fail the round
    min_updates: int = 0
    round_timeout_s: float = 120.0
    round_attempts: int = 3  # a round with too few updates runs again, up to this many times
    wait_for_clients_s: float = 600.0
    validate: bool = True
    round_config: dict = field(default_factory=dict)  # sent to clients with every task
    seed: int = 0
    buffer_size: int = 0  # close a round on its first K updates (fedbuff: a version every K;
    # 0: K is half the clients taking part)
    over_select: float = 0.0  # ask this fraction more clients than wanted (stragglers)
    select: SelectConfig = field(default_factory=SelectConfig)
    max_examples_per_update: int = 1_000_000  # a larger self-reported num_examples is refused
    max_update_norm: float | None = None  # L2 norm of (update - round model); larger: refused
    # ...and, by default, ||update - w|| over max_update_norm_ratio x (||w|| + sqrt(n)), n the
    # model's floating parameters: one client cannot push the model out of float range
    max_update_norm_ratio: float | None = 100.0
    max_kept_updates: int = 1000  # robust strategies keep a round's updates (object store)
    codec: str = "none"  # how clients send updates: none | fp16 | int8 | topk (their delta)
    codec_kwargs: dict = field(default_factory=dict)  # int8: block; topk: fraction
    codec_downlink: bool = True  # with a codec, clients fetch each new model as its delta
    time_budget_s: float | None = None  # asynchronous sessions also end after this long
    continue_from: str = ""  # a session id: start from its last model and strategy state

    @property
    def strategy_options(self) -> dict:
        """What the strategy is built with: ``aggregator_kwargs``, and for ``secagg`` its
        own block over them (the config check refuses the two disagreeing)."""
        if self.aggregator == "secagg" and self.secagg:
            return {**self.aggregator_kwargs, **self.secagg}
        return self.aggregator_kwargs


def recorded_settings(raw: object, default: SessionConfig) -> SessionConfig:
    """A session's settings as tracking recorded them (``asdict``), over ``default`` for
    what the record lacks or has in a form that does not fit (a resume after a restart
    runs a queued session's own settings, not the service's config)."""
    if not isinstance(raw, dict):
        return default
    names = {f.name: f for f in fields(SessionConfig)}
    values = {k: v for k, v in raw.items() if k in names and k != "select"}
    select = raw.get("select")
    if isinstance(select, dict):
        allowed = {f.name for f in fields(SelectConfig)}
        values["select"] = SelectConfig(**{k: v for k, v in select.items() if k in allowed})
    try:
        return replace(default, **values)
    except TypeError:
        return default


DEFAULT_DATABASE = "fedray"
DATA_DIR_ENV = "FEDRAY_DATA_DIR"


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = "embedded"  # or mongodb://host:27017/
    database: str | None = None  # set at load: the URI's database, else "fedray"
    events_ttl_days: float = 30.0  # events older than this are deleted; 0 keeps them forever

    @property
    def events_ttl_s(self) -> int | None:
        """``events_ttl_days`` in whole seconds; None keeps events forever."""
        return int(self.events_ttl_days * 86400) or None

    def __repr__(self) -> str:  # the URI may hold a password: configs end up in logs
        return (f"TrackingConfig(uri={redact(self.uri)!r}, database={self.database!r}, "
                f"events_ttl_days={self.events_ttl_days!r})")


@dataclass(frozen=True)
class StorageConfig:
    uri: str = "file"  # or file:///abs/path, or s3://BUCKET?...&secret_key=...

    def __repr__(self) -> str:
        return f"StorageConfig(uri={redact(self.uri)!r})"


@dataclass(frozen=True)
class AuthConfig:
    token_env: str = "FEDRAY_TOKEN"  # the shared federation token is read from this variable


@dataclass(frozen=True)
class TlsConfig:
    cert: str | None = None  # PEM certificate (chain) of the gateway and combiners
    key: str | None = None  # its PEM private key
    ca: str | None = None  # PEM CA that signs client certificates: mutual TLS
    client_auth: bool | None = None  # require a client certificate; default: when ca is set


@dataclass(frozen=True)
class ApiConfig:
    """The HTTP API and web view a running federation serves (fedray.service)."""

    host: str = "127.0.0.1"  # beyond loopback, every endpoint needs the API token
    port: int = 12070  # 0 picks a free port; a port in use falls back to a free one
    enabled: bool = True


@dataclass(frozen=True)
class FederationConfig:
    federation: str
    seed_model: str  # a .safetensors or .npz path, module:function returning arrays, or model:ID|latest
    package: str | None = None
    data_dir: str | None = None
    ray: RayConfig = field(default_factory=RayConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    combiners: CombinersConfig = field(default_factory=CombinersConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    source: str = "<dict>"  # where the config came from, for error messages

    @property
    def namespace(self) -> str:
        return f"fedray-{self.federation}"

    def resolved_data_dir(self) -> Path:
        """``data_dir`` as loaded (``--data-dir``, else $FEDRAY_DATA_DIR, else the config's),
        else ``~/.fedray/<federation>``; actors on other nodes get the same answer."""
        base = Path(self.data_dir) if self.data_dir else Path.home() / ".fedray" / self.federation
        return base.expanduser().resolve()


def uri_database(uri: str) -> str | None:
    """The database a ``mongodb://`` URI names (``/NAME`` after its hosts), if any; read as
    pymongo reads it, whose hosts end at the first '/'."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("mongodb", "mongodb+srv"):
        return None
    return unquote(rest.partition("/")[2].partition("?")[0]) or None
