"""The agent's configuration, read once at the entry point: flags > env (GPULEASE_AGENT_*) > TOML file.

Everything below the entry point receives an AgentConfig and never looks at argv or os.environ.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gpulease.agent.address import parse_coordinators
from gpulease.agent.firewall import METADATA_CIDR, parse_cidrs
from gpulease.agent.runtime import (
    AGENT_NETWORK,
    DEFAULT_LOG_MAX_SIZE,
    DEFAULT_PIDS_LIMIT,
    LOG_MAX_FILES,
    PROFILES,
    ContainerProfile,
    Hardening,
    network_problem,
)
from gpulease.common import container_policy, settings
from gpulease.common.container_policy import ContainerPolicy
from gpulease.common.httpserve import check_listen
from gpulease.common.settings import ConfigError, split_host_port
from gpulease.common.transport import check_clear_text
from gpulease.common.units import parse_size
from gpulease.errors import InvalidRequest

ENV_PREFIX = "GPULEASE_AGENT_"
# Loopback by default: an agent runs containers as root, so it is reachable from the network only
# when the operator says where (a management address) and gives TLS files, or says --insecure.
DEFAULT_LISTEN = "127.0.0.1:50052"
TLS_FLAGS = "--tls-ca, --tls-cert and --tls-key"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
DEFAULT_GPU_MODEL = "Simulated GPU 80GB"
# A simulated node is a demo/test device; this bound only catches typos like 8000 for 8.
MAX_SIMULATED_GPUS = 1024
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,251}[A-Za-z0-9])?$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The agent's own bridge, made with inter-container traffic off (agent/runtime: AGENT_NETWORK).
DEFAULT_CONTAINER_NETWORK = AGENT_NETWORK
# StopContainer's default grace (SIGTERM, then SIGKILL), as the API documents.
DEFAULT_STOP_GRACE_S = 10.0
# Enforcement: how often containers are checked against the node's live allocations, and the
# grace of the stops it makes. The two bound how long a container outlives its allocation:
#   release:   <= interval (2 s) + ListAllocations (~0.1 s) + grace (1 s) + docker stop (~0.5 s) ~= 3.6 s
#   expiry:    etcd deletes the keys <= ~0.5 s after the TTL, then as above: TTL + ~4.1 s < TTL + 5 s
DEFAULT_ENFORCE_INTERVAL_S = 2.0
DEFAULT_ENFORCE_GRACE_S = 1.0
MAX_GRACE_S = 300.0
# Exited containers whose allocation has ended are removed this long after they finished: long
# enough to read their logs and exit code, short enough that a busy GPU server's disk does not
# fill with writable layers and logs.
DEFAULT_CONTAINER_RETENTION_S = 3600.0
MAX_CONTAINER_RETENTION_S = 30 * 86400.0
MAX_ENFORCE_INTERVAL_S = 60.0
_NETWORK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
# Run-time limits (issue 14, part B): what one tenant may hold of this agent at once.
DEFAULT_PULL_TIMEOUT_S = 600.0  # a pull's hard wall-clock deadline (the coordinator waits 900 s for a start)
MAX_PULL_TIMEOUT_S = 3600.0
DEFAULT_MAX_CONCURRENT_PULLS = 2  # per node, queued first come first served
DEFAULT_MAX_LOG_STREAMS_PER_ALLOCATION = 4
DEFAULT_MAX_WAITS_PER_ALLOCATION = 8
MAX_PIDS_LIMIT = 4_194_304  # the kernel's pid_max ceiling
MIN_PIDS_LIMIT = 16
MIN_LOG_MAX_SIZE = 2**20
# Unused images (agent/enforcer.py): removed once unused this long, and while images take more than this.
DEFAULT_IMAGE_RETENTION_S = 86400.0
MAX_IMAGE_RETENTION_S = 365 * 86400.0
DEFAULT_IMAGE_DISK_LIMIT = 200 * 2**30


# The agent's HTTP side (/metrics), and how long an allocated GPU must idle to count as idle but held.
DEFAULT_HTTP_LISTEN = "127.0.0.1:9102"
DEFAULT_IDLE_WINDOW_S = 600.0


@dataclass(frozen=True)
class AgentConfig:
    # The first of `coordinators`: what code that names one coordinator uses (the firewall's rules,
    # gpulease.agent.security's clear-text check; config.py checks that rule for every address).
    coordinator: str
    node_id: str
    # Every coordinator replica's HOST:PORT, in the order the agent tries them (agent/channel.py:
    # one that does not answer sends the next call to the next). () = just `coordinator`.
    coordinators: tuple[str, ...] = ()
    listen: str = DEFAULT_LISTEN
    # host:port the coordinator should dial; None = derived from `listen` (see agent.address).
    advertise: str | None = None
    # None = no simulation: the node reports real GPUs (0 until NVML support lands).
    simulate_gpus: int | None = None
    gpu_model: str = DEFAULT_GPU_MODEL
    # None = detected from the host.
    cpus: int | None = None
    memory_bytes: int | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    log_level: str = "INFO"
    log_format: str = "text"
    config_file: str | None = None
    # Docker daemon URL (unix:///var/run/docker.sock, tcp://...); None = the Docker SDK's default.
    docker_host: str | None = None
    container_network: str = DEFAULT_CONTAINER_NETWORK
    # The agent's firewall around its own bridge (agent/firewall.py): containers reach neither this
    # server (its ports, the agent's included), nor the coordinator, nor the cloud metadata address,
    # nor these IPv4 CIDRs. None: on, except for a development agent (simulated GPUs, or no TLS: the
    # tests' and `gpuctl dev`'s agents, which must leave the firewall of the machine they run on alone).
    container_firewall: bool | None = None
    container_egress_deny: tuple[str, ...] = ()
    stop_grace_seconds: float = DEFAULT_STOP_GRACE_S
    enforce_interval_seconds: float = DEFAULT_ENFORCE_INTERVAL_S
    enforce_grace_seconds: float = DEFAULT_ENFORCE_GRACE_S
    container_retention_seconds: float = DEFAULT_CONTAINER_RETENTION_S
    # Mutual TLS, both directions (all three or none): the CA that signs coordinators and agents,
    # and this agent's certificate (naming spiffe://gpulease/agent/<node_id>) and key.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # Clear text off loopback (serving, and talking to the coordinator): refused unless this is set.
    insecure: bool = False
    # The container policy (gpulease/common/container_policy.py): this agent's own copy, enforced
    # whatever the coordinator's says. Host directories containers may bind-mount (read-only; none
    # by default), admin-made volumes they may mount (read-only), registries images may come from.
    bind_allowlist: tuple[str, ...] = ()
    volume_allowlist: tuple[str, ...] = ()
    registry_allowlist: tuple[str, ...] = container_policy.DEFAULT_REGISTRIES
    # How every container runs (agent/runtime: Hardening): "baseline" (Docker's default capabilities
    # minus NET_RAW) or "restricted" (no capabilities, user nobody); its PID limit; the size of each
    # of its LOG_MAX_FILES json-file log files.
    container_profile: ContainerProfile = "baseline"
    pids_limit: int = DEFAULT_PIDS_LIMIT
    log_max_size: int = DEFAULT_LOG_MAX_SIZE
    # What one tenant may hold of this agent at once (agent/containers.py: Limits).
    pull_timeout_seconds: float = DEFAULT_PULL_TIMEOUT_S
    max_concurrent_pulls: int = DEFAULT_MAX_CONCURRENT_PULLS
    max_log_streams_per_allocation: int = DEFAULT_MAX_LOG_STREAMS_PER_ALLOCATION
    max_waits_per_allocation: int = DEFAULT_MAX_WAITS_PER_ALLOCATION
    # Unused images: removed once unused this long (0: never by age), and least recently used
    # first while all images take more than this many bytes (0: no limit).
    image_retention_seconds: float = DEFAULT_IMAGE_RETENTION_S
    image_disk_limit: int = DEFAULT_IMAGE_DISK_LIMIT
    # The HTTP side (/metrics, /healthz; gpulease/common/httpserve.py): "" turns it off. Off loopback,
    # /metrics needs a bearer token from metrics_token_file (the agent refuses to start without one).
    http_listen: str = DEFAULT_HTTP_LISTEN
    metrics_token_file: str = ""
    # An allocated GPU under 5 % utilization this long is exported as idle but held.
    idle_window_seconds: float = DEFAULT_IDLE_WINDOW_S

    def __post_init__(self) -> None:
        if not self.coordinators:
            object.__setattr__(self, "coordinators", (self.coordinator,))
        elif self.coordinators[0] != self.coordinator:
            raise ValueError(f"coordinator {self.coordinator!r} must be the first of {self.coordinators!r}")

    @property
    def hardening(self) -> Hardening:
        return Hardening(profile=self.container_profile, pids_limit=self.pids_limit, log_max_size=self.log_max_size)

    @property
    def firewall_enabled(self) -> bool:
        """container_firewall as set; unset, on unless this is a development agent (simulated GPUs, or no TLS)."""
        if self.container_firewall is not None:
            return self.container_firewall
        return self.simulate_gpus is None and self.tls_enabled

    @property
    def tls_enabled(self) -> bool:
        return self.tls_ca is not None

    @property
    def container_policy(self) -> ContainerPolicy:
        """The policy, with this agent's own Docker socket never mounted, wherever it is."""
        socket = docker_socket_path(self.docker_host)
        return ContainerPolicy(
            bind_allowlist=self.bind_allowlist,
            volume_allowlist=self.volume_allowlist,
            registry_allowlist=self.registry_allowlist,
            also_forbidden=(socket,) if socket else (),
        )


def docker_socket_path(docker_host: str | None) -> str | None:
    """'unix:///srv/docker.sock' -> '/srv/docker.sock' (normalised); None for TCP or the default."""
    if not docker_host or not docker_host.startswith("unix://"):
        return None
    path = os.path.normpath(docker_host[len("unix://") :])
    if not path.startswith("/"):
        return None
    path = "/" + path.lstrip("/")  # normpath keeps a leading '//'
    return path if path != "/" else None


# Setting name -> env var suffix. TOML keys are the setting names (dashes also accepted).
_SCALAR_SETTINGS = (
    "coordinator",
    "node_id",
    "listen",
    "advertise",
    "simulate_gpus",
    "gpu_model",
    "cpus",
    "memory",
    "log_level",
    "log_format",
    "docker_host",
    "container_network",
    "container_firewall",
    "container_egress_deny",
    "stop_grace_seconds",
    "enforce_interval_seconds",
    "enforce_grace_seconds",
    "container_retention_seconds",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "insecure",
    "bind_allowlist",
    "volume_allowlist",
    "registry_allowlist",
    "container_profile",
    "pids_limit",
    "log_max_size",
    "pull_timeout_seconds",
    "max_concurrent_pulls",
    "max_log_streams_per_allocation",
    "max_waits_per_allocation",
    "image_retention_seconds",
    "image_disk_limit",
    "http_listen",
    "metrics_token_file",
    "idle_window_seconds",
)


def build_parser() -> argparse.ArgumentParser:
    # Every default is None so that "not given" is distinguishable from "given the default".
    p = argparse.ArgumentParser(
        prog="gpulease-agent",
        description="gpulease node agent: registers this node's GPUs with the coordinator.",
        epilog="Every flag can also be set as GPULEASE_AGENT_<FLAG> (e.g. GPULEASE_AGENT_NODE_ID) "
        "or in the TOML file given by --config (keys like node_id, labels = {k = 'v'}). "
        "Precedence: flags > environment > file.",
    )
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="coordinator gRPC address; several replicas comma-separated (TOML: also a list), tried in turn "
        "when one does not answer",
    )
    p.add_argument("--node-id", metavar="NAME", help="this node's name in the cluster")
    p.add_argument("--listen", metavar="HOST:PORT", help=f"agent gRPC address (default {DEFAULT_LISTEN})")
    p.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="address the coordinator should use to reach this agent (default: derived from --listen)",
    )
    p.add_argument("--simulate-gpus", metavar="N", type=int, help="report N made-up GPUs instead of real ones")
    p.add_argument("--gpu-model", metavar="NAME", help=f"simulated GPU model (default {DEFAULT_GPU_MODEL!r})")
    p.add_argument("--cpus", metavar="N", type=int, help="CPUs to offer (default: usable CPUs of this host)")
    p.add_argument("--memory", metavar="SIZE", help="memory to offer, e.g. 256GiB (default: host MemTotal)")
    p.add_argument("--label", metavar="KEY=VALUE", action="append", help="node label; repeatable", dest="labels")
    p.add_argument("--http-listen", metavar="HOST:PORT",
                   help=f"HOST:PORT of /metrics and /healthz; '' = off (default {DEFAULT_HTTP_LISTEN})")  # fmt: skip
    p.add_argument("--metrics-token-file", metavar="FILE", help="bearer token /metrics requires (needed off loopback)")
    p.add_argument("--idle-window-seconds", metavar="S",
                   help="an allocated GPU under 5%% utilization this long is idle but held (default 600)")  # fmt: skip
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--log-format", metavar="FORMAT", help="text or json: one JSON object per line (default text)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML configuration file")
    p.add_argument(
        "--docker-host", metavar="URL", help="Docker daemon URL (default: $DOCKER_HOST, else the local socket)"
    )
    p.add_argument(
        "--container-network",
        metavar="NAME",
        help=f"Docker network for containers: 'none', or a bridge with inter-container traffic off (default "
        f"{DEFAULT_CONTAINER_NETWORK}, which the agent creates so); never host",
    )
    p.add_argument(
        "--container-firewall",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"on the agent's own network, install iptables rules so that containers reach neither this server "
        f"(the agent's port included), nor the coordinator, nor {METADATA_CIDR.removesuffix('/32')}, nor "
        "--container-egress-deny (default: on, but off with simulated GPUs or without TLS files); off: the "
        "host's firewall does it",
    )
    p.add_argument(
        "--container-egress-deny",
        metavar="CIDRS",
        help="IPv4 addresses or networks containers may not reach besides the coordinator and the metadata "
        "address, e.g. etcd's or the management subnet (comma-separated; default: none)",
    )
    p.add_argument(
        "--stop-grace-seconds",
        metavar="S",
        type=float,
        help=f"StopContainer's default SIGTERM-to-SIGKILL grace (default {DEFAULT_STOP_GRACE_S:g})",
    )
    p.add_argument(
        "--enforce-interval-seconds",
        metavar="S",
        type=float,
        help="how often containers are checked against the node's live allocations "
        f"(default {DEFAULT_ENFORCE_INTERVAL_S:g})",
    )
    p.add_argument(
        "--enforce-grace-seconds",
        metavar="S",
        type=float,
        help=f"SIGTERM-to-SIGKILL grace when a container's allocation has ended (default {DEFAULT_ENFORCE_GRACE_S:g})",
    )
    p.add_argument(
        "--container-retention-seconds",
        metavar="S",
        type=float,
        help="remove an exited container this long after it finished, once its allocation has ended "
        f"(default {DEFAULT_CONTAINER_RETENTION_S:g})",
    )
    tls = p.add_argument_group(
        "transport security",
        "Mutual TLS to and from the coordinator. Without TLS files the agent serves clear text on a loopback "
        "address only, unless --insecure is given.",
    )
    tls.add_argument("--tls-ca", metavar="FILE", help="CA bundle (PEM) that signs coordinator certificates")
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="this agent's certificate (PEM); must name spiffe://gpulease/agent/<node-id> and carry the node id "
        "as a DNS name",
    )
    tls.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    tls.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow clear text without authentication on a non-loopback address (logged as a warning every hour)",
    )
    policy = p.add_argument_group(
        "container policy",
        "What a container may ask of this server, enforced here whatever the coordinator says. Lists are "
        "comma-separated (TOML: arrays).",
    )
    policy.add_argument(
        "--bind-allowlist",
        metavar="DIRS",
        help="host directories whose contents containers may bind-mount, always read-only (default: none)",
    )
    policy.add_argument(
        "--volume-allowlist",
        metavar="NAMES",
        help="admin-made named volumes containers may mount, read-only (default: none; tenant volumes "
        "t-<tenant>-<name> are always allowed to their tenant)",
    )
    policy.add_argument(
        "--registry-allowlist",
        metavar="REGISTRIES",
        help="registries (or registry/path prefixes) images may come from "
        f"(default: {','.join(container_policy.DEFAULT_REGISTRIES)})",
    )
    run = p.add_argument_group(
        "container run time",
        "How every container runs and what one allocation may hold of this agent at once, whatever it asks.",
    )
    run.add_argument(
        "--container-profile",
        metavar="PROFILE",
        choices=PROFILES,
        help="baseline: Docker's default capabilities minus NET_RAW; restricted: no capabilities and user "
        "nobody (65534). Both: not privileged, no-new-privileges, a PID limit (default baseline)",
    )
    run.add_argument(
        "--pids-limit", metavar="N", type=int, help=f"processes per container (default {DEFAULT_PIDS_LIMIT})"
    )
    run.add_argument(
        "--log-max-size",
        metavar="SIZE",
        help=f"size of each of a container's {LOG_MAX_FILES} log files (default {DEFAULT_LOG_MAX_SIZE // 2**20}MiB)",
    )
    run.add_argument(
        "--pull-timeout-seconds",
        metavar="S",
        type=float,
        help=f"hard wall-clock deadline of an image pull (default {DEFAULT_PULL_TIMEOUT_S:g})",
    )
    run.add_argument(
        "--max-concurrent-pulls",
        metavar="N",
        type=int,
        help=f"image pulls in flight on this node; more wait in turn (default {DEFAULT_MAX_CONCURRENT_PULLS})",
    )
    run.add_argument(
        "--max-log-streams-per-allocation",
        metavar="N",
        type=int,
        help=f"open log streams per allocation (default {DEFAULT_MAX_LOG_STREAMS_PER_ALLOCATION})",
    )
    run.add_argument(
        "--max-waits-per-allocation",
        metavar="N",
        type=int,
        help=f"WaitContainer calls in flight per allocation (default {DEFAULT_MAX_WAITS_PER_ALLOCATION})",
    )
    images = p.add_argument_group(
        "images", "Unused images (no container refers to them) are removed by age and by disk use."
    )
    images.add_argument(
        "--image-retention-seconds",
        metavar="S",
        type=float,
        help=f"remove an image unused this long; 0: never by age (default {DEFAULT_IMAGE_RETENTION_S:g})",
    )
    images.add_argument(
        "--image-disk-limit",
        metavar="SIZE",
        help="while images take more than this, remove unused ones, least recently used first; 0: no limit "
        f"(default {DEFAULT_IMAGE_DISK_LIMIT // 2**30}GiB)",
    )
    return p


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> AgentConfig:
    """Merge flags, environment and the TOML file into one validated AgentConfig."""
    args = build_parser().parse_args(argv)
    layered = settings.layer(_SCALAR_SETTINGS, args, environ, ENV_PREFIX, extra_file_keys=("labels",))
    merged = dict(layered.values)
    if "docker_host" not in merged and environ.get("DOCKER_HOST"):
        # Docker's own variable is the default, below every gpulease setting.
        merged["docker_host"] = environ["DOCKER_HOST"]
    file_labels = _file_labels(layered.extra["labels"], layered.config_file) if "labels" in layered.extra else {}
    env_labels_text = environ.get(ENV_PREFIX + "LABELS", "")
    env_labels = _parse_label_list([item for item in env_labels_text.split(",") if item.strip()], ENV_PREFIX + "LABELS")
    flag_labels = _parse_label_list(args.labels or [], "--label")
    # Labels merge key by key, so a flag can override one label of the file without dropping the rest.
    labels = {**file_labels, **env_labels, **flag_labels}
    return _validate(merged, labels, layered.config_file)


def _file_labels(value: object, path: str | None) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: labels must be a table, e.g. labels = {{ zone = 'a' }}")
    return {str(k): _label_value(v, str(path)) for k, v in value.items()}


def _label_value(value: object, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ConfigError(f"{path}: label values must be strings, got {value!r}")


def _parse_label_list(items: Sequence[str], source: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise ConfigError(f"{source}: label {item!r} must look like key=value")
        labels[key.strip()] = value.strip()
    return labels


def _validate(values: Mapping[str, Any], labels: Mapping[str, str], config_file: str | None) -> AgentConfig:
    coordinators = _coordinators(values)
    node_id = _require_str(values, "node_id")
    if not _NODE_ID_RE.match(node_id):
        raise ConfigError(
            f"node id {node_id!r} is invalid: use 1-63 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    for key in labels:
        if not _LABEL_KEY_RE.match(key):
            raise ConfigError(f"label key {key!r} is invalid")

    simulate_gpus = _optional_int(values, "simulate_gpus", minimum=0)
    if simulate_gpus is not None and simulate_gpus > MAX_SIMULATED_GPUS:
        raise ConfigError(f"simulate_gpus must be at most {MAX_SIMULATED_GPUS}, got {simulate_gpus}")

    memory_bytes: int | None = None
    if "memory" in values:
        raw = values["memory"]
        try:
            memory_bytes = raw if isinstance(raw, int) and not isinstance(raw, bool) else parse_size(str(raw))
        except InvalidRequest as e:
            raise ConfigError(f"memory: {e.message}") from e
        if memory_bytes <= 0:
            raise ConfigError(f"memory must be positive, got {raw!r}")

    http_listen = str(values.get("http_listen", DEFAULT_HTTP_LISTEN))
    metrics_token_file = str(values.get("metrics_token_file", ""))
    check_listen(http_listen, metrics_token_file)

    log_level = str(values.get("log_level", "INFO")).upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")
    log_format = str(values.get("log_format", "text"))
    if log_format not in ("text", "json"):
        raise ConfigError(f"log_format must be text or json, got {log_format!r}")

    listen = str(values.get("listen", DEFAULT_LISTEN))
    advertise = values.get("advertise")
    for name, addr in (("listen", listen), ("advertise", advertise)):
        if addr is None:
            continue
        try:
            split_host_port(str(addr))
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from e

    tls_ca, tls_cert, tls_key = _tls_files(values)
    insecure = _bool(values, "insecure")
    # Anyone who reaches a clear-text agent can run containers as root on it. (The channel to the
    # coordinator is checked when the agent starts: gpulease.agent.security.load_tls.)
    check_clear_text(listen, tls=tls_ca is not None, insecure=insecure, flag_hint=TLS_FLAGS)

    docker_host = str(values["docker_host"]).strip() if values.get("docker_host") is not None else None
    network = str(values.get("container_network", DEFAULT_CONTAINER_NETWORK)).strip()
    if not _NETWORK_RE.match(network):
        raise ConfigError(f"container_network {network!r} is not a valid Docker network name")
    problem = network_problem(network)
    if problem is not None:
        raise ConfigError(f"container_network: {problem}, which no container of gpulease may join")
    container_firewall = _bool(values, "container_firewall") if "container_firewall" in values else None
    try:
        egress_deny = parse_cidrs(_list(values.get("container_egress_deny", ())))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    profile = str(values.get("container_profile", "baseline")).strip().lower()
    if profile not in PROFILES:
        raise ConfigError(f"container_profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    log_max_size = DEFAULT_LOG_MAX_SIZE
    if "log_max_size" in values:
        raw = values["log_max_size"]
        try:
            log_max_size = raw if isinstance(raw, int) and not isinstance(raw, bool) else parse_size(str(raw))
        except InvalidRequest as e:
            raise ConfigError(f"log_max_size: {e.message}") from e
        if log_max_size < MIN_LOG_MAX_SIZE:
            raise ConfigError(f"log_max_size must be at least 1MiB, got {raw!r}")
    image_disk_limit = DEFAULT_IMAGE_DISK_LIMIT
    if "image_disk_limit" in values:
        raw = values["image_disk_limit"]
        try:
            image_disk_limit = (
                raw
                if isinstance(raw, int) and not isinstance(raw, bool)
                else (0 if str(raw).strip() == "0" else parse_size(str(raw)))
            )
        except InvalidRequest as e:
            raise ConfigError(f"image_disk_limit: {e.message}") from e
        if image_disk_limit < 0:
            raise ConfigError(f"image_disk_limit must be 0 (no limit) or a size, got {raw!r}")

    lists: dict[str, tuple[str, ...]] = {}
    for name, parse in (
        ("bind_allowlist", container_policy.parse_bind_allowlist),
        ("volume_allowlist", container_policy.parse_volume_allowlist),
        ("registry_allowlist", container_policy.parse_registry_allowlist),
    ):
        if name in values:
            try:
                lists[name] = parse(values[name])
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None

    return AgentConfig(
        **lists,
        coordinator=coordinators[0],
        coordinators=coordinators,
        node_id=node_id,
        listen=listen,
        advertise=str(advertise) if advertise is not None else None,
        simulate_gpus=simulate_gpus,
        gpu_model=str(values.get("gpu_model", DEFAULT_GPU_MODEL)),
        cpus=_optional_int(values, "cpus", minimum=1),
        memory_bytes=memory_bytes,
        labels=MappingProxyType(dict(labels)),
        log_level=log_level,
        log_format=log_format,
        config_file=config_file,
        docker_host=docker_host or None,
        container_network=network,
        container_firewall=container_firewall,
        container_egress_deny=egress_deny,
        stop_grace_seconds=_seconds(values, "stop_grace_seconds", DEFAULT_STOP_GRACE_S, 0.0, MAX_GRACE_S),
        enforce_interval_seconds=_seconds(
            values, "enforce_interval_seconds", DEFAULT_ENFORCE_INTERVAL_S, 0.1, MAX_ENFORCE_INTERVAL_S
        ),
        enforce_grace_seconds=_seconds(values, "enforce_grace_seconds", DEFAULT_ENFORCE_GRACE_S, 0.0, MAX_GRACE_S),
        container_retention_seconds=_seconds(
            values, "container_retention_seconds", DEFAULT_CONTAINER_RETENTION_S, 0.0, MAX_CONTAINER_RETENTION_S
        ),
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        insecure=insecure,
        container_profile="restricted" if profile == "restricted" else "baseline",
        pids_limit=_bounded_int(values, "pids_limit", DEFAULT_PIDS_LIMIT, MIN_PIDS_LIMIT, MAX_PIDS_LIMIT),
        log_max_size=log_max_size,
        pull_timeout_seconds=_seconds(values, "pull_timeout_seconds", DEFAULT_PULL_TIMEOUT_S, 1.0, MAX_PULL_TIMEOUT_S),
        max_concurrent_pulls=_bounded_int(values, "max_concurrent_pulls", DEFAULT_MAX_CONCURRENT_PULLS, 1, 64),
        max_log_streams_per_allocation=_bounded_int(
            values, "max_log_streams_per_allocation", DEFAULT_MAX_LOG_STREAMS_PER_ALLOCATION, 1, 128
        ),
        max_waits_per_allocation=_bounded_int(
            values, "max_waits_per_allocation", DEFAULT_MAX_WAITS_PER_ALLOCATION, 1, 1024
        ),
        image_retention_seconds=_seconds(
            values, "image_retention_seconds", DEFAULT_IMAGE_RETENTION_S, 0.0, MAX_IMAGE_RETENTION_S
        ),
        image_disk_limit=image_disk_limit,
        http_listen=http_listen,
        metrics_token_file=metrics_token_file,
        idle_window_seconds=_seconds(values, "idle_window_seconds", DEFAULT_IDLE_WINDOW_S, 1.0, 7 * 86400.0),
    )


def _coordinators(values: Mapping[str, Any]) -> tuple[str, ...]:
    """The coordinator setting: one HOST:PORT, several comma-separated, or (TOML) a list of them."""
    raw = values.get("coordinator")
    if isinstance(raw, list | tuple):
        if not all(isinstance(item, str) for item in raw):
            raise ConfigError(f"coordinator must be a list of 'HOST:PORT' strings, got {raw!r}")
        # An empty list is as good as none: the setting is required.
        text: str | list[str] = list(raw) or _require_str({}, "coordinator")
    else:
        text = _require_str(values, "coordinator")
    try:
        return parse_coordinators(text)
    except ValueError as e:
        raise ConfigError(f"coordinator: {e}") from None


def _bounded_int(values: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = _optional_int(values, name, minimum=low)
    if value is None:
        return default
    if value > high:
        raise ConfigError(f"{name} must be at most {high}, got {value}")
    return value


def _tls_files(values: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """The three TLS paths, all or none."""
    names = ("tls_ca", "tls_cert", "tls_key")
    paths = {name: str(values[name]).strip() for name in names if name in values and str(values[name]).strip()}
    if not paths:
        return None, None, None
    if len(paths) < len(names):
        missing = [n for n in names if n not in paths]
        raise ConfigError(
            f"TLS needs all three of tls_ca, tls_cert and tls_key ({TLS_FLAGS}); {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing"
        )
    return paths["tls_ca"], paths["tls_cert"], paths["tls_key"]


def _list(value: object) -> list[str]:
    """A TOML array, or a comma-separated string (flags, environment)."""
    if isinstance(value, list | tuple):
        return [str(item) for item in value]
    return str(value).split(",")


def _bool(values: Mapping[str, Any], name: str) -> bool:
    raw = values.get(name, False)
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _seconds(values: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    if name not in values:
        return default
    raw = values[name]
    if isinstance(raw, bool):
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from e
    if not low <= value <= high:  # also rejects NaN
        raise ConfigError(f"{name} must be between {low:g} and {high:.0f} seconds, got {raw!r}")
    return value


def _require_str(values: Mapping[str, Any], name: str) -> str:
    value = str(values.get(name, "")).strip()
    if not value:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{name} is required: pass {flag}, set {ENV_PREFIX}{name.upper()} or put it in --config")
    return value


def _optional_int(values: Mapping[str, Any], name: str, *, minimum: int) -> int | None:
    if name not in values:
        return None
    raw = values[name]
    if isinstance(raw, bool | float):
        raise ConfigError(f"{name} must be an integer, got {raw!r}")
    try:
        value = int(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from e
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value
