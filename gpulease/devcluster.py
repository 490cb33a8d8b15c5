"""A whole cluster on one machine: a real etcd, coordinator(s) and agents with SIMULATED GPUs.

LocalCluster is the reusable part (a context manager); run_dev_cluster is
`gpuctl dev`: start, print how to use it, optionally run a demo, stay up until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from gpulease import procs
from gpulease.client import Client
from gpulease.errors import GpuLeaseError
from gpulease.procs import ManagedProcess, StartupError

if TYPE_CHECKING:
    from gpulease.cli.devconfig import DevClusterConfig

STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
RPC_TIMEOUT_S = 5.0
SIMULATED_LABEL = "gpulease.dev/simulated"
# Simulated nodes offer this much besides their GPUs: plausible for a GPU server, independent of the host.
DEMO_NODE_CPUS = 32
DEMO_NODE_MEMORY = "256GiB"
_POLL_S = 0.2


class LocalCluster:
    """etcd + coordinators + agents as child processes, all stopped by stop() (or leaving `with`).

    Layout under data_dir: etcd/ (etcd's data/ and etcd.log) and logs/<process>.log.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        coordinator_port: int | None = None,
        node_ttl: int | None = None,
        heartbeat_interval: int | None = None,
        prefix: str | None = None,
        coordinator_module: str = "gpulease.coordinator.main",
        agent_module: str = "gpulease.agent.main",
        startup_timeout: float = STARTUP_TIMEOUT_S,
        grace: float = STOP_GRACE_S,
    ) -> None:
        # Only a directory this cluster made is removed by stop(): a given one may hold a user's state.
        self.made_data_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="gpulease-dev-") if data_dir is None else data_dir)
        self.logs_dir = self.data_dir / "logs"
        self._coordinator_port = coordinator_port
        self._node_ttl = node_ttl
        self._heartbeat_interval = heartbeat_interval
        self._prefix = prefix
        self._coordinator_module = coordinator_module
        self._agent_module = agent_module
        self.startup_timeout = startup_timeout
        self.grace = grace
        self._ports_taken: set[int] = set()
        self.etcd: ManagedProcess | None = None
        self.etcd_url = ""
        self.coordinators: list[ManagedProcess] = []
        self.coordinator_addresses: list[str] = []
        self.agents: dict[str, ManagedProcess] = {}
        self.agent_addresses: dict[str, str] = {}
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, coordinators: int = 1) -> LocalCluster:
        """Start etcd and `coordinators` coordinators and wait until each is healthy."""
        try:
            self.start_etcd()
            for i in range(coordinators):
                self.add_coordinator(port=self._coordinator_port if i == 0 else None)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self, *, keep_data_dir: bool = False) -> None:
        """Agents first (they would only log errors without a coordinator), then coordinators, then etcd.

        Removes data_dir if this cluster made it, unless keep_data_dir. Safe to call twice.
        """
        procs.stop_all(self.agents.values(), self.grace)
        procs.stop_all(self.coordinators, self.grace)
        if self.etcd is not None:
            self.etcd.stop(self.grace)
        if self.made_data_dir and not keep_data_dir and not self._stopped:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self._stopped = True

    # -- processes ---------------------------------------------------------------------------

    @property
    def coordinator_address(self) -> str:
        if not self.coordinator_addresses:
            raise RuntimeError("no coordinator started")
        return self.coordinator_addresses[0]

    @property
    def processes(self) -> list[ManagedProcess]:
        etcd = [self.etcd] if self.etcd is not None else []
        return [*etcd, *self.coordinators, *self.agents.values()]

    def first_dead(self) -> ManagedProcess | None:
        return next((p for p in self.processes if not p.alive()), None)

    def start_etcd(self) -> ManagedProcess:
        client_port, peer_port = self._port(), self._port()
        self.etcd = procs.start_etcd(self.data_dir / "etcd", client_port, peer_port)
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        procs.wait_etcd_healthy(self.etcd_url, self.startup_timeout, self.etcd)
        return self.etcd

    def add_coordinator(self, port: int | None = None, *, wait: bool = True) -> ManagedProcess:
        if not self.etcd_url:
            raise RuntimeError("start etcd before coordinators")
        port = self._port(port)
        address = f"127.0.0.1:{port}"
        args = ["--etcd", self.etcd_url, "--listen", address]
        for flag, value in (
            ("--prefix", self._prefix),
            ("--node-ttl", self._node_ttl),
            ("--heartbeat-interval", self._heartbeat_interval),
        ):
            if value is not None:
                args += [flag, str(value)]
        name = f"coordinator-{len(self.coordinators)}"
        proc = procs.start_python_module(name, self._coordinator_module, args, self.logs_dir / f"{name}.log")
        self.coordinators.append(proc)
        self.coordinator_addresses.append(address)
        if wait:
            procs.wait_grpc_health(address, self.startup_timeout, proc)
        return proc

    def add_agent(
        self,
        name: str,
        gpus: int,
        *,
        cpus: int = DEMO_NODE_CPUS,
        memory: str = DEMO_NODE_MEMORY,
        labels: Mapping[str, str] | None = None,
        gpu_model: str | None = None,
        coordinator: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        wait: bool = True,
    ) -> ManagedProcess:
        """An agent with `gpus` simulated GPUs. wait=True returns once it has registered."""
        if name in self.agents:
            raise ValueError(f"agent {name!r} already exists")
        address = f"127.0.0.1:{self._port(port)}"
        args = [
            "--coordinator", coordinator or self.coordinator_address,
            "--node-id", name,
            "--listen", address,
            "--simulate-gpus", str(gpus),
            "--cpus", str(cpus),
            "--memory", memory,
        ]  # fmt: skip
        if gpu_model is not None:
            args += ["--gpu-model", gpu_model]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        args += list(extra_args)
        # A developer's GPULEASE_AGENT_* must not reconfigure the cluster's agents behind our back.
        env = procs.python_child_env(drop_prefixes=("GPULEASE_AGENT_",))
        proc = procs.start_python_module(
            f"agent {name}", self._agent_module, args, self.logs_dir / f"agent-{name}.log", env=env
        )
        self.agents[name] = proc
        self.agent_addresses[name] = address
        if wait:
            self.wait_agent(name)
        return proc

    def wait_agent(self, name: str, timeout: float | None = None) -> None:
        """Until the agent reports SERVING, which it does once registered with the coordinator."""
        timeout = self.startup_timeout if timeout is None else timeout
        procs.wait_grpc_health(self.agent_addresses[name], timeout, self.agents[name])

    def wait_nodes_up(self, names: Iterable[str], timeout: float | None = None) -> None:
        """Until the coordinator lists every named node as UP."""
        wanted = set(names)
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        missing = wanted
        last_error = ""
        # One attempt per poll (retry_deadline 0): this loop is the retry, and it watches the processes.
        with Client(self.coordinator_address, timeout=RPC_TIMEOUT_S, retry_deadline=0, handle_sigterm=False) as client:
            while True:
                dead = self.first_dead()
                if dead is not None:
                    raise StartupError(_death_message(dead))
                try:
                    up = {n.name for n in client.list_nodes() if n.state == "up"}
                    missing = wanted - up
                    if not missing:
                        return
                except GpuLeaseError as e:
                    last_error = f"; last error: {e.message}"
                if time.monotonic() >= deadline:
                    raise StartupError(
                        f"coordinator does not list node(s) {', '.join(sorted(missing))} as up "
                        f"after {timeout:.0f}s{last_error}; logs in {self.logs_dir}"
                    )
                time.sleep(_POLL_S)

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


def _death_message(proc: ManagedProcess) -> str:
    return (
        f"{proc.name} (pid {proc.pid}) exited unexpectedly with status {proc.returncode}; "
        f"last lines of {proc.log_path}:\n{proc.log_tail()}"
    )


# -- gpuctl dev ------------------------------------------------------------------------------


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalStop:
    """While armed, SIGINT/SIGTERM raise _Stop (once); disarmed, they are ignored so cleanup completes."""

    def __init__(self) -> None:
        self.armed = True

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            raise _Stop(signum)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_SignalStop]:
    stopper = _SignalStop()
    previous = {sig: signal.signal(sig, stopper.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopper
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_dev_cluster(cfg: DevClusterConfig) -> int:
    """`gpuctl dev`: returns 0 after Ctrl-C/SIGTERM, 1 if the cluster failed to start or a child died."""
    if not procs.port_is_free(cfg.port):
        print(
            f"error: port {cfg.port} is in use (another dev cluster?); choose one with --port",
            file=sys.stderr,
        )
        return 1
    names = [f"node-{i}" for i in range(cfg.nodes)]
    cluster = LocalCluster(cfg.data_dir, coordinator_port=cfg.port)
    keep_data = False
    with _stop_on_signals() as stopper:
        try:
            _say(f"starting etcd, a coordinator and {cfg.nodes} agent(s) in {cluster.data_dir} ...")
            cluster.start()
            for name in names:
                cluster.add_agent(name, cfg.gpus_per_node, labels={SIMULATED_LABEL: "true"}, wait=False)
            for name in names:
                cluster.wait_agent(name)
            cluster.wait_nodes_up(names)
            _print_banner(cluster, cfg, names)
            if cfg.demo:
                _run_demo(cluster.coordinator_address)
            _say("Press Ctrl-C to stop the cluster.")
            while True:
                dead = cluster.first_dead()
                if dead is not None:
                    print(f"error: {_death_message(dead)}", file=sys.stderr)
                    keep_data = True
                    return 1
                time.sleep(_POLL_S)
        except _Stop as stop:
            _say(f"\nreceived {stop}: stopping agents, coordinator, then etcd ...")
            return 0
        except (StartupError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            keep_data = True
            return 1
        except GpuLeaseError as e:
            print(f"error: coordinator call failed: {e.message}", file=sys.stderr)
            keep_data = True
            return 1
        finally:
            stopper.armed = False
            cluster.stop(keep_data_dir=keep_data)
            if keep_data and cluster.made_data_dir:
                print(f"logs kept in {cluster.logs_dir}", file=sys.stderr)
            _say("dev cluster stopped.")


def _say(text: str) -> None:
    print(text, flush=True)


def _print_banner(cluster: LocalCluster, cfg: DevClusterConfig, names: Sequence[str]) -> None:
    removal = "removed on exit" if cluster.made_data_dir else "kept on exit"
    _say(
        "\n".join(
            [
                "",
                f"gpulease dev cluster is up: {cfg.nodes} node(s) x {cfg.gpus_per_node} GPU(s).",
                "  *** GPUs are SIMULATED: no real GPU is used or reserved. ***",
                f"  coordinator: {cluster.coordinator_address}",
                f"  etcd:        {cluster.etcd_url}",
                f"  nodes:       {', '.join(names)} (label {SIMULATED_LABEL}=true)",
                f"  data dir:    {cluster.data_dir} ({removal}); logs in {cluster.logs_dir}",
                "",
                "Point gpuctl and the client library at it with:",
                f"  export GPULEASE_COORDINATOR={cluster.coordinator_address}",
                "",
            ]
        )
    )


def _run_demo(address: str) -> None:
    """Allocate and release through the client library, printed by gpuctl's own output code."""
    from gpulease.cli import views
    from gpulease.cli.commands import print_status

    with Client(address, timeout=RPC_TIMEOUT_S, handle_sigterm=False) as client:
        _say("demo: cluster before allocating")
        print_status(client.cluster_summary())
        _say("\ndemo: allocate(gpus=2, owner='demo', ttl=60s)")
        allocation = client.allocate(gpus=2, owner="demo", ttl=60)
        _say(f"  {views.allocation_line(allocation)}")
        _say(f"  GPUs (simulated): {', '.join(f'{g.index} ({g.uuid})' for g in allocation.gpus)}")
        print_status(client.cluster_summary())
        _say(f"\ndemo: release({allocation.id})")
        _say(f"  released: {allocation.release()}")
        _say("\ndemo: cluster after releasing")
        print_status(client.cluster_summary())
        _say("")
