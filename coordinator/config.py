"""Coordinator configuration: parsed once at the entry point (flags > env > TOML file)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from gpulease.common import container_policy, eventloop, logs, settings, transport
from gpulease.common.container_policy import ContainerPolicy
from gpulease.common.httpserve import check_listen
from gpulease.common.settings import ConfigError
from gpulease.common.units import parse_duration, parse_size
from gpulease.coordinator import liveness
from gpulease.errors import InvalidRequest

ENV_PREFIX = "GPULEASE_COORDINATOR_"


@dataclass(frozen=True)
class CoordinatorConfig:
    etcd: tuple[str, ...] = ("http://127.0.0.1:2379",)
    listen: str = "127.0.0.1:50051"
    prefix: str = "/gpulease/"
    default_ttl: int = 60
    # A small cluster's node TTL and heartbeat interval; past max_heartbeats_per_second x interval
    # nodes the interval grows to keep the cluster at that cap, and the TTL with it (coordinator/liveness.py).
    node_ttl: int = 15
    heartbeat_interval: int = 5
    max_heartbeats_per_second: int = 250
    # "session" (node keys on one etcd lease per replica) or "node-lease" (one per node, renewed by
    # every heartbeat: the design before issue 18, kept to be measured against).
    node_liveness: str = "session"
    default_cpus_per_gpu: int = 1
    default_memory_per_gpu: int = 4 * 2**30
    etcd_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_timeout: float = 5.0
    # etcd's own auth: a user and a file holding its password (the password never on a command line).
    etcd_user: str = ""
    etcd_password_file: str = ""
    # Must not exceed etcd's own --max-txn-ops (default 128): it caps how many allocations
    # one batched transaction may carry.
    etcd_max_txn_ops: int = 128
    # "auto": uvloop when installed (lower latency per RPC, see docs/performance.md).
    event_loop: str = "auto"
    log_level: str = "INFO"
    log_format: str = "text"
    # TLS for clients and agents (all three, or none: clear text, loopback only unless insecure).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # A second port that requires client certificates: agents, and users with certificates.
    mtls_listen: str = ""
    insecure: bool = False
    # Written (0600) with the first admin token when the prefix has none yet; empty: no bootstrap.
    bootstrap_token_file: str = ""
    # Requests a second per caller (a token bucket with twice this burst); 0: no limit.
    rate_limit: float = 200.0
    audit_max_age: int = 90 * 86400
    audit_max_entries: int = 100_000
    # How long who-owns-what is kept for an ended allocation's containers (the agents' retention).
    container_retention: int = 3600
    # The container policy (gpulease/common/container_policy.py), checked on RunContainer before
    # anything is forwarded; each agent enforces its own copy too.
    bind_allowlist: tuple[str, ...] = ()
    volume_allowlist: tuple[str, ...] = ()
    registry_allowlist: tuple[str, ...] = container_policy.DEFAULT_REGISTRIES
    # The waiting queue: how long a pending request outlives its client's last call, the longest
    # wait a request may ask for, strict FIFO per pool (no backfill), and the priority classes.
    queue_ttl: int = 10
    max_wait: int = 86400
    strict_fifo: bool = False
    priority_classes: tuple[tuple[str, int], ...] = (("low", -100), ("default", 0), ("high", 100))
    default_priority_class: str = "default"
    # Fair share: the half-life of the decayed GPU usage that orders tenants in the queue.
    fair_share_half_life: int = 86400
    # The HTTP side (/metrics, /healthz, /readyz): "" turns it off. Off loopback, /metrics needs a
    # bearer token from metrics_token_file (the coordinator refuses to start without one).
    http_listen: str = "127.0.0.1:8080"
    metrics_token_file: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def container_policy(self) -> ContainerPolicy:
        return ContainerPolicy(self.bind_allowlist, self.volume_allowlist, self.registry_allowlist)


# How each setting is written in flags, env and TOML, and how its text is parsed.
_PARSERS: dict[str, Any] = {
    "etcd": lambda v: tuple(u.strip() for u in (v.split(",") if isinstance(v, str) else v) if u.strip()),
    "default_ttl": lambda v: parse_duration(str(v)),
    "node_ttl": lambda v: parse_duration(str(v)),
    "heartbeat_interval": lambda v: parse_duration(str(v)),
    "max_heartbeats_per_second": int,
    "default_cpus_per_gpu": int,
    "default_memory_per_gpu": lambda v: parse_size(str(v)),
    "etcd_timeout": float,
    "etcd_max_txn_ops": int,
    "insecure": lambda v: settings.parse_bool(v),
    "rate_limit": float,
    "audit_max_age": lambda v: parse_duration(str(v)),
    "audit_max_entries": int,
    "container_retention": lambda v: parse_duration(str(v)),
    "bind_allowlist": container_policy.parse_bind_allowlist,
    "volume_allowlist": container_policy.parse_volume_allowlist,
    "registry_allowlist": container_policy.parse_registry_allowlist,
    "queue_ttl": lambda v: parse_duration(str(v)),
    "max_wait": lambda v: parse_duration(str(v)),
    "strict_fifo": lambda v: settings.parse_bool(v),
    "fair_share_half_life": lambda v: parse_duration(str(v)),
    "priority_classes": lambda v: _priority_classes(v),
}


def _priority_classes(value: Any) -> tuple[tuple[str, int], ...]:
    """'low=-100,default=0,high=100' (or a TOML table) -> ((name, value), ...)."""
    pairs = value.items() if isinstance(value, dict) else (p.partition("=")[::2] for p in str(value).split(","))
    out = []
    for name, number in pairs:
        name = str(name).strip()
        try:
            out.append((name, int(str(number).strip())))
        except ValueError:
            raise ConfigError(f"--priority-classes: {name}={number!r} is not NAME=INTEGER") from None
        if not name:
            raise ConfigError("--priority-classes: a class has no name")
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpulease-coordinator",
        description="gpulease coordinator: allocates GPUs with etcd transactions and leases.",
        epilog=f"Every flag can also come from env {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}ETCD) or the "
        "TOML file given by --config; flags win over env, env over the file.",
    )
    p.add_argument("--config", help="TOML file with the same settings (keys use underscores)")
    p.add_argument("--etcd", help="etcd endpoint URL(s), comma-separated (default http://127.0.0.1:2379)")
    p.add_argument("--listen", help="gRPC listen address HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--prefix", help="etcd key prefix for all state (default /gpulease/)")
    p.add_argument("--default-ttl", help="allocation lease TTL when a request names none (default 60s)")
    p.add_argument("--node-ttl", help="a node missing heartbeats this long is down, in a small cluster (15s)")
    p.add_argument("--heartbeat-interval", help="how often agents heartbeat in a small cluster (default 5s)")
    p.add_argument("--max-heartbeats-per-second",
                   help="cap on the cluster's heartbeats: past it, the interval and node TTL grow with the nodes; "
                        "0 = none (250)")  # fmt: skip
    p.add_argument("--node-liveness", help="session (node keys on one etcd lease per replica) or node-lease "
                                           "(one renewed per heartbeat) (default session)")  # fmt: skip
    p.add_argument("--default-cpus-per-gpu", help="CPUs reserved per GPU when a request names none (1)")
    p.add_argument("--default-memory-per-gpu", help="memory reserved per GPU when a request names none (4GiB)")
    p.add_argument("--etcd-ca", help="CA file for TLS to etcd (enables TLS)")
    p.add_argument("--etcd-cert", help="client certificate for mutual TLS to etcd")
    p.add_argument("--etcd-key", help="client key for mutual TLS to etcd")
    p.add_argument("--etcd-timeout", help="seconds per etcd call (default 5)")
    p.add_argument("--etcd-user", help="etcd username (etcd auth); needs --etcd-password-file")
    p.add_argument("--etcd-password-file", help="file holding the etcd user's password")
    p.add_argument("--etcd-max-txn-ops", help="etcd's --max-txn-ops; caps the size of a batched commit (128)")
    p.add_argument("--event-loop", help="auto, uvloop or asyncio (default auto: uvloop when installed)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--log-format", help="text or json: one JSON object per line (default text)")
    p.add_argument("--tls-ca", help="CA bundle that client and agent certificates must chain to")
    p.add_argument("--tls-cert", help="this coordinator's certificate (enables TLS on every port)")
    p.add_argument("--tls-key", help="this coordinator's private key")
    p.add_argument("--mtls-listen", help="HOST:PORT of a port that requires client certificates (agents, "
                                         "certificate users); needs TLS")  # fmt: skip
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow clear text on a non-loopback address (no authentication; warned hourly)")  # fmt: skip
    p.add_argument("--bootstrap-token-file", help="where to write the first admin token (mode 0600) when the "
                                                  "cluster has none yet")  # fmt: skip
    p.add_argument("--rate-limit", help="requests per second per caller; 0 = no limit (default 200)")
    p.add_argument("--audit-max-age", help="audit entries older than this are removed (default 90d)")
    p.add_argument("--audit-max-entries", help="at most this many audit entries are kept (default 100000)")
    p.add_argument("--container-retention", help="how long an ended allocation's container owner is kept (1h)")
    p.add_argument("--bind-allowlist", help="host directories containers may bind-mount, read-only, comma-separated "
                                            "(default: none)")  # fmt: skip
    p.add_argument("--volume-allowlist", help="admin-made volumes containers may mount, read-only (default: none)")
    p.add_argument("--registry-allowlist", help="registries (or registry/path prefixes) images may come from "
                                                "(default docker.io)")  # fmt: skip
    p.add_argument("--queue-ttl", help="how long a pending request outlives its client's last call (10s)")
    p.add_argument("--max-wait", help="the longest wait in the queue a request may ask for (24h)")
    p.add_argument("--strict-fifo", action="store_true", default=None,
                   help="no backfill: a pool's requests start strictly in queue order")  # fmt: skip
    p.add_argument("--priority-classes", help="NAME=VALUE,... (default low=-100,default=0,high=100)")
    p.add_argument("--fair-share-half-life", help="half-life of the decayed GPU usage that orders tenants (24h)")
    p.add_argument("--http-listen", help="HOST:PORT of /metrics, /healthz and /readyz; '' = off "
                                         "(default 127.0.0.1:8080)")  # fmt: skip
    p.add_argument("--metrics-token-file", help="file holding the bearer token /metrics requires (needed off "
                                                "loopback)")  # fmt: skip
    p.add_argument("--default-priority-class", help="the class of a request that names none (default)")
    return p


def load(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> CoordinatorConfig:
    args = build_parser().parse_args(argv)
    layered = settings.layer((f.name for f in fields(CoordinatorConfig)), args,
                             os.environ if env is None else env, ENV_PREFIX)  # fmt: skip
    cfg = CoordinatorConfig(**settings.parse_values(layered.values, _PARSERS))
    if not cfg.prefix.startswith("/") or not cfg.prefix.endswith("/"):
        raise ConfigError(f"--prefix must start and end with '/', got {cfg.prefix!r}")
    if cfg.default_priority_class not in dict(cfg.priority_classes):
        raise ConfigError(f"--default-priority-class {cfg.default_priority_class!r} is not one of --priority-classes")
    if cfg.fair_share_half_life < 1:
        raise ConfigError("--fair-share-half-life must be at least 1s")
    if cfg.log_format not in logs.FORMATS:
        raise ConfigError(f"--log-format must be one of {', '.join(logs.FORMATS)}, got {cfg.log_format!r}")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {cfg.log_level!r}")
    if cfg.queue_ttl < 3:
        raise ConfigError("--queue-ttl must be at least 3s")
    if cfg.etcd_max_txn_ops < 16:
        raise ConfigError("--etcd-max-txn-ops must be at least 16")
    try:
        eventloop.resolve(cfg.event_loop)  # an unknown or missing loop is a config error, said now
    except InvalidRequest as exc:
        raise ConfigError(exc.message) from exc
    if not 1 <= cfg.heartbeat_interval < cfg.node_ttl:
        raise ConfigError("--heartbeat-interval must be at least 1s and shorter than --node-ttl")
    if cfg.max_heartbeats_per_second < 0:
        raise ConfigError("--max-heartbeats-per-second must be 0 (no cap) or more")
    if cfg.node_liveness not in liveness.MODES:
        raise ConfigError(f"--node-liveness must be one of {', '.join(liveness.MODES)}, got {cfg.node_liveness!r}")
    if bool(cfg.tls_cert) != bool(cfg.tls_key) or (cfg.tls_cert and not cfg.tls_ca):
        raise ConfigError("TLS needs --tls-ca, --tls-cert and --tls-key together")
    if cfg.mtls_listen and not cfg.tls:
        raise ConfigError("--mtls-listen needs TLS (--tls-ca, --tls-cert, --tls-key)")
    for address in (cfg.listen, *((cfg.mtls_listen,) if cfg.mtls_listen else ())):
        try:
            settings.split_host_port(address)
        except ValueError as exc:
            raise ConfigError(f"bad listen address: {exc}") from None
    transport.check_clear_text(cfg.listen, tls=cfg.tls, insecure=cfg.insecure,
                               flag_hint="--tls-ca, --tls-cert, --tls-key")  # fmt: skip
    check_listen(cfg.http_listen, cfg.metrics_token_file)
    if bool(cfg.etcd_user) != bool(cfg.etcd_password_file):
        raise ConfigError("etcd auth needs --etcd-user and --etcd-password-file together")
    if cfg.rate_limit < 0 or cfg.audit_max_entries < 100 or cfg.audit_max_age < 3600:
        raise ConfigError("--rate-limit must be >= 0, --audit-max-entries >= 100, --audit-max-age >= 1h")
    return cfg


def etcd_password(cfg: CoordinatorConfig) -> str:
    """The etcd user's password, read from its file at start (trailing newline dropped)."""
    if not cfg.etcd_password_file:
        return ""
    try:
        with open(cfg.etcd_password_file, encoding="utf-8") as fh:
            return fh.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read --etcd-password-file {cfg.etcd_password_file}: {exc.strerror or exc}") from exc
