"""A whole cluster on one machine: a real etcd, coordinators and agents, as child processes.

One LocalCluster serves `gpuctl dev` (gpulease/dev/ui.py), the tests (tests/support/harness.py)
and the bench (bench/cluster.py). Launching lives here once: loopback ports, command lines and
environments, log files, waiting until each child is ready, stopping in order. So does what a
caller needs to talk to the cluster: channel(), client_config() and client(). The children's
command lines are built in _coordinator_argv and _agent_argv, their environment in child_env,
and the client side's settings in channel and client_config: what the cluster's security (TLS,
tokens) adds goes into those few places and reaches every process and every caller.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc

from gpulease.client import MAX_RECEIVE_BYTES, Client, ClientConfig, TLSConfig
from gpulease.common import pki
from gpulease.common.identity import Kind, Role
from gpulease.dev import procs
from gpulease.dev.procs import ManagedProcess, StartupError
from gpulease.errors import GpuLeaseError

STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
RPC_TIMEOUT_S = 5.0
# Inherited variables no child sees: a developer's GPULEASE_COORDINATOR_* or GPULEASE_AGENT_* must
# not reconfigure the cluster's processes behind its back.
CHILD_ENV_DROP = ("GPULEASE_",)
T = TypeVar("T")
# Answers can be cluster-wide and over gRPC's default 4 MiB: read as much as the client library does.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]


@dataclass(frozen=True)
class Child:
    """A coordinator or an agent: its name (its log is logs/<name>.log), gRPC address and process.
    A secure cluster's coordinator also has a mutual-TLS port (agents, certificate users)."""

    name: str
    address: str
    process: ManagedProcess
    mtls_address: str = ""
    # Its HTTP side (/metrics, /healthz; the coordinator's /readyz too), on a port of its own.
    http_address: str = ""

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}" if self.http_address else ""


class LocalCluster:
    """etcd + coordinators + agents as child processes, all stopped by stop() (or leaving `with`).

    Layout under data_dir: etcd/ (etcd's data/ and etcd.log) and logs/<child>.log.

    With etcd_url, the cluster uses that etcd (another LocalCluster's, say) and neither starts nor
    stops one: the tests run one etcd per session and one cluster per test, on its own prefix.

    secure=True: mutual TLS on every hop and token auth, as `gpuctl dev --auth` runs it. A
    development CA in data_dir/pki issues each coordinator's and agent's certificate; each
    coordinator also serves a mutual-TLS port (agents report there); the first one writes the admin
    token to data_dir/admin.token (its bootstrap file), which client_config() uses.
    prefix, node_ttl and heartbeat_interval are every coordinator's defaults (None: the
    coordinator's own); coordinator_args are added to every coordinator's command line.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        etcd_url: str | None = None,
        tmpfs: bool = False,
        temp_prefix: str = "gpulease-dev-",
        coordinator_port: int | None = None,
        prefix: str | None = None,
        node_ttl: int | None = None,
        heartbeat_interval: int | None = None,
        coordinator_args: Sequence[str] = (),
        coordinator_module: str = "gpulease.coordinator.main",
        agent_module: str = "gpulease.agent.main",
        startup_timeout: float = STARTUP_TIMEOUT_S,
        grace: float = STOP_GRACE_S,
        secure: bool = False,
        http: bool = True,
        coordinator_http_port: int | None = None,
    ) -> None:
        # Only a directory this cluster made is removed by stop(): a given one may hold a user's state.
        self.made_data_dir = data_dir is None
        if data_dir is None:
            # tmpfs when asked and there is one: the bench measures the software, not the disk's fsync.
            base = "/dev/shm" if tmpfs and Path("/dev/shm").is_dir() else None
            data_dir = tempfile.mkdtemp(prefix=temp_prefix, dir=base)
        self.data_dir = Path(data_dir)
        self.logs_dir = self.data_dir / "logs"
        self._coordinator_port = coordinator_port
        self.prefix = prefix
        self.node_ttl = node_ttl
        self.heartbeat_interval = heartbeat_interval
        self.coordinator_args = list(coordinator_args)
        self._coordinator_module = coordinator_module
        self._agent_module = agent_module
        self.startup_timeout = startup_timeout
        self.grace = grace
        self._ports_taken: set[int] = set()
        self.owns_etcd = etcd_url is None
        self.etcd: ManagedProcess | None = None
        self.etcd_url = etcd_url or ""
        # By address, in the order started: the first is coordinator_address.
        self.coordinators: dict[str, Child] = {}
        self.agents: dict[str, Child] = {}
        self._started_coordinators = 0
        self._started = False
        self._stopped = False
        self.secure = secure
        # Each coordinator and agent serves HTTP on a free loopback port (False: HTTP off, '').
        self.http = http
        self._coordinator_http_port = coordinator_http_port
        self.pki_dir = self.data_dir / "pki"
        self.token_file = self.data_dir / "admin.token"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, coordinators: int = 1) -> LocalCluster:
        """Start etcd (unless given one) and `coordinators` coordinators, each waited for until healthy."""
        self._started = True
        try:
            if self.owns_etcd:
                self.start_etcd()
            for i in range(coordinators):
                self.add_coordinator(port=self._coordinator_port if i == 0 else None)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalCluster:
        """Starts the cluster as start() does, unless it was started already."""
        return self if self._started else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self, *, keep_data_dir: bool = False) -> None:
        """Agents first (they would only log errors without a coordinator), then coordinators, then etcd.

        Removes data_dir if this cluster made it, unless keep_data_dir. Safe to call twice.
        """
        procs.stop_all([a.process for a in self.agents.values()], self.grace)
        procs.stop_all([c.process for c in self.coordinators.values()], self.grace)
        if self.etcd is not None:
            self.etcd.stop(self.grace)
        if self.made_data_dir and not keep_data_dir and not self._stopped:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self._stopped = True

    # -- what runs ---------------------------------------------------------------------------

    @property
    def coordinator_addresses(self) -> list[str]:
        return list(self.coordinators)

    @property
    def coordinator_address(self) -> str:
        if not self.coordinators:
            raise RuntimeError("no coordinator started")
        return next(iter(self.coordinators))

    def coordinator(self, address: str) -> Child:
        return self.coordinators[address]

    @property
    def processes(self) -> list[ManagedProcess]:
        etcd = [self.etcd] if self.etcd is not None else []
        return [*etcd, *(c.process for c in self.coordinators.values()), *(a.process for a in self.agents.values())]

    def first_dead(self) -> ManagedProcess | None:
        return next((p for p in self.processes if not p.alive()), None)

    def etcd_version(self) -> str:
        out = subprocess.run([procs.find_etcd(), "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].split(":", 1)[-1].strip() if out else "unknown"

    # -- etcd --------------------------------------------------------------------------------

    def start_etcd(self) -> ManagedProcess:
        client_port, peer_port = self._port(), self._port()
        self.etcd = procs.start_etcd(self.data_dir / "etcd", client_port, peer_port)
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        procs.wait_etcd_healthy(self.etcd_url, self.startup_timeout, self.etcd)
        return self.etcd

    # -- coordinators ------------------------------------------------------------------------

    def add_coordinator(
        self,
        port: int | None = None,
        *,
        prefix: str | None = None,
        node_ttl: int | None = None,
        heartbeat_interval: int | None = None,
        extra_args: Sequence[str] = (),
        wait: bool = True,
        timeout: float | None = None,
    ) -> Child:
        """A coordinator on 127.0.0.1:port (a free port if None; the address of a dead one restarts it
        in place). prefix, node_ttl and heartbeat_interval default to the cluster's. wait=True returns
        once it reports SERVING."""
        if not self.etcd_url:
            raise RuntimeError("start etcd before coordinators")
        address = f"127.0.0.1:{self._port(port)}"
        before = self.coordinators.get(address)
        self._check_not_running(before, address)
        # A coordinator restarted in place keeps its mutual-TLS port too.
        mtls = (before.mtls_address if before else f"127.0.0.1:{self._port()}") if self.secure else ""
        if before is not None or not self.http:
            http = before.http_address if before is not None else ""
        else:  # the first coordinator on the port asked for, if any
            http = f"127.0.0.1:{self._port(None if self.coordinators else self._coordinator_http_port)}"
        argv = self._coordinator_argv(address, prefix, node_ttl, heartbeat_interval, extra_args, mtls)
        argv = ["--http-listen", http, *argv]
        name = f"coordinator-{self._started_coordinators}"
        self._started_coordinators += 1
        return self._launch(self.coordinators, address, name, address, self._coordinator_module, argv,
                            self.child_env(), wait, timeout, mtls, http)  # fmt: skip

    def stop_coordinator(self, address: str) -> None:
        self.coordinators.pop(address).process.stop(self.grace)

    def _coordinator_argv(
        self,
        address: str,
        prefix: str | None,
        node_ttl: int | None,
        heartbeat_interval: int | None,
        extra_args: Sequence[str],
        mtls_address: str = "",
    ) -> list[str]:
        return [
            "--etcd", self.etcd_url,
            "--listen", address,
            *self._tls_flags(Kind.COORDINATOR, f"c-{address.rsplit(':', 1)[1]}"),
            *_flags(("--mtls-listen", mtls_address or None),
                    ("--bootstrap-token-file", self.token_file if self.secure else None)),
            *_flags(
                ("--prefix", _or(prefix, self.prefix)),
                ("--node-ttl", _or(node_ttl, self.node_ttl)),
                ("--heartbeat-interval", _or(heartbeat_interval, self.heartbeat_interval)),
            ),
            *self.coordinator_args,
            *extra_args,
        ]  # fmt: skip

    # -- agents ------------------------------------------------------------------------------

    def add_agent(
        self,
        name: str,
        gpus: int | None,
        *,
        cpus: int | None = None,
        memory: str | None = None,
        labels: Mapping[str, str] | None = None,
        gpu_model: str | None = None,
        coordinator: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Child:
        """An agent named `name` (its node's name) with `gpus` simulated GPUs, or with the host's
        inventory if gpus is None, listening on 127.0.0.1:port (a free port if None). It reports to
        `coordinator` (one address, or several comma-separated), by default to every coordinator
        of the cluster, failing over between them. A name whose agent has exited starts again, with the
        same log. env replaces child_env() as the whole environment. wait=True returns once it
        reports SERVING, which it does once registered."""
        self._check_not_running(self.agents.get(name), f"agent {name!r}")
        address = f"127.0.0.1:{self._port(port)}"
        if coordinator:
            targets = [t.strip() for t in coordinator.split(",")]
        else:
            targets = self.coordinator_addresses or [self.coordinator_address]  # the latter raises: none
        if self.secure:  # agents report on the coordinator's mutual-TLS port
            targets = [self.coordinators[t].mtls_address if t in self.coordinators else t for t in targets]
        target = ",".join(targets)
        before = self.agents.get(name)
        http = (before.http_address if before else f"127.0.0.1:{self._port()}") if self.http else ""
        argv = self._agent_argv(name, address, target, gpus, cpus, memory, labels, gpu_model)
        argv = ["--http-listen", http, *argv] if http else argv
        return self._launch(self.agents, name, f"agent-{name}", address, self._agent_module, [*argv, *extra_args],
                            env if env is not None else self.child_env(), wait, timeout, http_address=http)  # fmt: skip

    def stop_agent(self, name: str) -> None:
        self.agents.pop(name).process.stop(self.grace)

    def _agent_argv(
        self,
        name: str,
        address: str,
        coordinator: str,
        gpus: int | None,
        cpus: int | None,
        memory: str | None,
        labels: Mapping[str, str] | None,
        gpu_model: str | None,
    ) -> list[str]:
        return [
            "--coordinator", coordinator,
            "--node-id", name,
            "--listen", address,
            *self._tls_flags(Kind.AGENT, name),
            *_flags(("--simulate-gpus", gpus), ("--cpus", cpus), ("--memory", memory), ("--gpu-model", gpu_model)),
            *_flags(*(("--label", f"{key}={value}") for key, value in (labels or {}).items())),
        ]  # fmt: skip

    def wait_agent(self, name: str, timeout: float | None = None) -> None:
        """Until the agent reports SERVING, which it does once registered with the coordinator."""
        self.wait_serving(self.agents[name], timeout)

    def _launch(
        self,
        registry: dict[str, Child],
        key: str,
        name: str,
        address: str,
        module: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        wait: bool,
        timeout: float | None,
        mtls_address: str = "",
        http_address: str = "",
    ) -> Child:
        """Start `python -m module argv` (its log logs/<name>.log) and track it in registry under key
        before waiting, so that one which never gets healthy is stopped too."""
        process = procs.start_python_module(name, module, argv, self.logs_dir / f"{name}.log", env=env)
        child = registry[key] = Child(name, address, process, mtls_address, http_address)
        if wait:
            self.wait_serving(child, timeout)
        return child

    # -- waiting -----------------------------------------------------------------------------

    def wait_serving(self, child: Child, timeout: float | None = None) -> None:
        """Until the child's gRPC health says SERVING (StartupError if it dies or the time runs out)."""
        timeout = self.startup_timeout if timeout is None else timeout
        procs.wait_grpc_health(child.address, timeout, child.process, connect=self.channel)

    def wait_nodes_up(self, names: Iterable[str], timeout: float | None = None) -> None:
        """Until the first coordinator lists every named node as UP (StartupError if any of the
        cluster's processes dies first or the time runs out)."""
        wanted = set(names)
        # One attempt per poll (retry_deadline 0): wait_ready is the retry, and it watches the processes.
        with self.client(targets=[self.coordinator_address], retry_deadline=0) as client:

            def probe() -> str | None:
                dead = self.first_dead()
                if dead is not None:
                    raise StartupError(death_message(dead))
                try:
                    missing = wanted - {n.name for n in client.list_nodes() if n.state == "up"}
                except GpuLeaseError as e:
                    return e.message
                return f"not up: {', '.join(sorted(missing))}" if missing else None

            what = f"node(s) {', '.join(sorted(wanted))} (logs in {self.logs_dir})"
            procs.wait_ready(what, probe, self.startup_timeout if timeout is None else timeout)

    # -- talking to it -----------------------------------------------------------------------

    def child_env(self, *, drop: Sequence[str] = ()) -> dict[str, str]:
        """A coordinator's or an agent's environment: this process's, less CHILD_ENV_DROP and `drop`."""
        return procs.python_child_env(drop_prefixes=(*CHILD_ENV_DROP, *drop))

    def channel(self, address: str) -> grpc.Channel:
        """A channel to one of the cluster's processes. Answers can be cluster-wide and over gRPC's
        default 4 MiB: it reads as much as the client library does. In a secure cluster it verifies
        the server with the cluster's CA and carries the admin token once there is one (health
        checks need no credential)."""
        if not self.secure:
            return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        return grpc.secure_channel(address, self._credentials(), options=_CHANNEL_OPTIONS)

    def aio_channel(self, address: str, cert: pki.Issued | None = None) -> grpc.aio.Channel:
        """channel() for asyncio; in a secure cluster presenting ``cert`` if given (an agent's, to
        speak for its node on a coordinator's mutual-TLS port)."""
        if not self.secure:
            return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(address, self._credentials(cert), options=_CHANNEL_OPTIONS)

    def _credentials(self, cert: pki.Issued | None = None) -> grpc.ChannelCredentials:
        # A certificate always: agents require one at the handshake (their health service takes any
        # the CA signed; their RPCs only a coordinator's). Coordinators' token ports do not ask for it.
        me = cert or self.issue(Kind.USER, "dev-admin", role=Role.ADMIN)
        creds = grpc.ssl_channel_credentials(self.ca_file.read_bytes(), me.key.read_bytes(), me.cert.read_bytes())
        if cert is None and self.token_file.exists():
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.admin_token()))
        return creds

    # -- security (secure=True) ----------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        return self.pki_dir / pki.CA_CERT

    def _ensure_ca(self) -> None:
        if not self.ca_file.exists():
            pki.init_ca(self.pki_dir, name="gpulease dev cluster CA")

    def issue(self, kind: Kind, name: str, *, role: Role | None = None, tenant: str = "") -> pki.Issued:
        """A certificate of the cluster's CA (reused if already issued under that name)."""
        self._ensure_ca()
        base = f"{kind.value}-{name}"
        if (self.pki_dir / f"{base}.pem").exists():
            return pki.Issued(self.pki_dir / f"{base}.pem", self.pki_dir / f"{base}.key")
        return pki.issue(self.pki_dir, kind, name, role=role, tenant=tenant)

    def _tls_flags(self, kind: Kind, name: str) -> list[str]:
        if not self.secure:
            return []
        issued = self.issue(kind, name)
        return ["--tls-ca", str(self.ca_file), "--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]

    def admin_token(self, timeout: float = 10.0) -> str:
        """The bootstrap admin token the first coordinator wrote (waits for it to appear)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.token_file.read_text().strip()
                if text:
                    return text
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise StartupError(f"no admin token in {self.token_file} after {timeout}s (logs in {self.logs_dir})")
            time.sleep(0.05)

    def client_config(
        self,
        *,
        targets: Sequence[str] | None = None,
        timeout: float = RPC_TIMEOUT_S,
        retry_deadline: float | None = None,
    ) -> ClientConfig:
        """The client library's settings for this cluster: every coordinator unless targets says
        otherwise. A secure cluster's: TLS verified with the cluster's CA, and the admin token
        (waits for the first coordinator to write it)."""
        return ClientConfig.of(
            list(targets) if targets is not None else self.coordinator_addresses,
            timeout=timeout,
            retry_deadline=retry_deadline,
            tls=TLSConfig(str(self.ca_file)) if self.secure else None,
            token=self.admin_token() if self.secure else None,
        )

    def client(
        self,
        *,
        targets: Sequence[str] | None = None,
        timeout: float = RPC_TIMEOUT_S,
        retry_deadline: float | None = None,
    ) -> Client:
        """A Client of this cluster (close it, or use it in `with`). It leaves SIGTERM to the caller."""
        config = self.client_config(targets=targets, timeout=timeout, retry_deadline=retry_deadline)
        return Client(config=config, handle_sigterm=False)

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _check_not_running(child: Child | None, what: str) -> None:
        if child is not None and child.process.alive():
            raise ValueError(f"{what} is already running (pid {child.process.pid})")

    def _port(self, wanted: int | None = None) -> int:
        # free_port() may hand out the same port twice in a row; remember what we gave out.
        if wanted is not None:
            self._ports_taken.add(wanted)
            return wanted
        for _ in range(100):
            port = procs.free_port()
            if port not in self._ports_taken:
                self._ports_taken.add(port)
                return port
        raise RuntimeError("no free TCP port found")


def _or(value: T | None, default: T | None) -> T | None:
    return value if value is not None else default


def _flags(*pairs: tuple[str, object]) -> list[str]:
    """["--flag", "value", ...] for each pair whose value is not None."""
    return [arg for flag, value in pairs if value is not None for arg in (flag, str(value))]


def death_message(proc: ManagedProcess) -> str:
    return (
        f"{proc.name} (pid {proc.pid}) exited unexpectedly with status {proc.returncode}; "
        f"last lines of {proc.log_path}:\n{proc.log_tail()}"
    )
