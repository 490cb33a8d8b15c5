"""`gpuctl dev` as a user runs it: a subprocess that starts etcd, a coordinator and simulated agents,
serves gpuctl, and on SIGTERM or Ctrl-C stops every child before exiting 0."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpulease.dev import procs

STARTUP_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 30
NODES = 2
GPUS_PER_NODE = 4
READY_LINE = "Press Ctrl-C to stop the cluster."

pytestmark = pytest.mark.slow


class DevProcess:
    """A running `gpuctl dev`; its stdout is collected line by line by a reader thread."""

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=procs.python_child_env(drop_prefixes=("GPULEASE_",)),
                start_new_session=True,
            )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="gpuctl-dev-stdout", daemon=True)
        self._reader.start()
        # Every descendant seen so far: what must be gone once the dev process has exited.
        self.descendants: dict[int, psutil.Process] = {}

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"exit status {self.popen.poll()}\nstdout:\n{self.output}\nstderr:\n{self.stderr()}"

    def wait_for_line(self, pattern: str, timeout: float = STARTUP_TIMEOUT_S) -> re.Match[str]:
        """The first stdout line matching pattern (re.search); fails if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                m = regex.search(line)
                if m:
                    return m
            if self.popen.poll() is not None:
                self._reader.join(timeout=5)
                if any(regex.search(line) for line in self.lines):
                    continue
                raise AssertionError(f"gpuctl dev exited before printing /{pattern}/; {self.describe()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"gpuctl dev did not print /{pattern}/ within {timeout:.0f}s; {self.describe()}")
            time.sleep(0.1)

    def snapshot_descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in psutil.Process(self.popen.pid).children(recursive=True):
                self.descendants.setdefault(p.pid, p)
        return list(self.descendants.values())

    def cleanup(self) -> None:
        """Whatever happened in the test: no dev process and no child of it is left running."""
        if self.popen.poll() is None:
            self.snapshot_descendants()
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        for p in self.descendants.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()  # psutil refuses if the pid now belongs to another process
        self._reader.join(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@contextlib.contextmanager
def gpuctl_dev(tmp_path: Path, *extra: str) -> Iterator[tuple[DevProcess, int, Path]]:
    port = procs.free_port()
    data_dir = tmp_path / "dev"
    argv = [sys.executable, "-m", "gpulease.cli.main", "dev", "--nodes", str(NODES), "--gpus-per-node",
            str(GPUS_PER_NODE), "--port", str(port), "--data-dir", str(data_dir), *extra]  # fmt: skip
    dev = DevProcess(argv, tmp_path / "dev-stderr.log")
    try:
        yield dev, port, data_dir
    finally:
        dev.cleanup()


def run_gpuctl(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """gpuctl ARGS with only `env` of GPULEASE_* set; no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "gpulease.cli.main", *args],
        capture_output=True,
        text=True,
        env=procs.python_child_env(env, drop_prefixes=("GPULEASE_",)),
        stdin=subprocess.DEVNULL,
        timeout=CLI_TIMEOUT_S,
    )
    assert "Traceback" not in done.stderr, (args, done.returncode, done.stdout, done.stderr)
    return done


def gpuctl(address: str, *args: str) -> Any:
    """gpuctl ARGS --json against address; must succeed; returns the parsed JSON."""
    done = run_gpuctl("--coordinator", address, *args, "--json")
    assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout)


def wait_ready(dev: DevProcess, port: int) -> tuple[str, str]:
    """Until the banner and the ready line are printed; returns (coordinator address, etcd URL)."""
    address = dev.wait_for_line(r"^\s*coordinator:\s+(\S+)$").group(1)
    etcd_url = dev.wait_for_line(r"^\s*etcd:\s+(http://\S+)$").group(1)
    dev.wait_for_line(re.escape(READY_LINE))
    assert address == f"127.0.0.1:{port}", dev.output
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", etcd_url), dev.output
    return address, etcd_url


def check_cluster(address: str) -> None:
    status = gpuctl(address, "status")
    assert sorted((n["name"], n["state"]) for n in status["nodes"]) == [("node-0", "up"), ("node-1", "up")]
    assert status["totals"]["gpus_total"] == NODES * GPUS_PER_NODE
    assert status["totals"]["gpus_free"] == NODES * GPUS_PER_NODE
    for node in status["nodes"]:
        assert node["gpus_total"] == node["gpus_free"] == GPUS_PER_NODE, node

    nodes = gpuctl(address, "nodes")
    assert len(nodes) == NODES
    for node in nodes:
        assert node["labels"].get("gpulease.dev/simulated") == "true", node
        assert len(node["gpus"]) == GPUS_PER_NODE, node
        assert all(g["simulated"] is True for g in node["gpus"]), node


def expect_children(dev: DevProcess, etcd_url: str) -> list[psutil.Process]:
    children = dev.snapshot_descendants()
    cmdlines = []
    for p in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            cmdlines.append(" ".join(p.cmdline()))
    assert sum("gpulease.coordinator.main" in c for c in cmdlines) == 1, cmdlines
    assert sum("gpulease.agent.main" in c for c in cmdlines) == NODES, cmdlines
    assert sum(etcd_url in c and "etcd" in c.split()[0] for c in cmdlines) == 1, cmdlines
    return children


def still_running(children: list[psutil.Process]) -> list[str]:
    left = []
    for p in children:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_dev_cluster_serves_gpuctl_and_stops_every_child(tmp_path: Path, sig: signal.Signals) -> None:
    with gpuctl_dev(tmp_path) as (dev, port, data_dir):
        address, etcd_url = wait_ready(dev, port)
        assert f"{NODES} node(s) x {GPUS_PER_NODE} GPU(s)" in dev.output
        assert "SIMULATED" in dev.output
        check_cluster(address)
        children = expect_children(dev, etcd_url)

        dev.popen.send_signal(sig)  # the dev process alone, as Ctrl-C or `kill` would
        try:
            rc = dev.popen.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gpuctl dev still running {EXIT_TIMEOUT_S:.0f}s after {sig.name}; {dev.describe()}")
        assert rc == 0, dev.describe()
        assert still_running(children) == [], dev.describe()

        dev.wait_for_line(r"^dev cluster stopped\.$", timeout=5)
        assert f"received {sig.name}" in dev.output, dev.describe()
        assert "Traceback" not in dev.stderr() + dev.output, dev.describe()
        # A data dir given on the command line is the user's: kept, with the processes' logs.
        assert (data_dir / "logs").is_dir()


def exports(dev: DevProcess) -> dict[str, str]:
    """The `export NAME=VALUE` lines of the banner."""
    found = [re.fullmatch(r"\s*export (GPULEASE_\w+)=(\S+)", line) for line in dev.lines]
    return {m.group(1): m.group(2) for m in found if m}


def test_dev_cluster_auth_serves_gpuctl_with_the_printed_exports(tmp_path: Path) -> None:
    """`gpuctl dev --auth`: mutual TLS and tokens; D/ca.pem and D/admin.token (0600) and the exports
    that use them; the token printed nowhere; every child stopped on Ctrl-C."""
    with gpuctl_dev(tmp_path, "--auth") as (dev, port, data_dir):
        address, etcd_url = wait_ready(dev, port)
        env = exports(dev)
        ca, token_file = data_dir.resolve() / "ca.pem", data_dir.resolve() / "admin.token"
        assert env == {"GPULEASE_COORDINATOR": address, "GPULEASE_CA": str(ca),
                       "GPULEASE_TOKEN_FILE": str(token_file)}, dev.output  # fmt: skip
        assert ca.read_bytes() == (data_dir / "pki" / "ca.pem").read_bytes()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token

        status = run_gpuctl("status", "--json", env=env)
        assert status.returncode == 0, status
        assert sorted((n["name"], n["state"]) for n in json.loads(status.stdout)["nodes"]) == [
            ("node-0", "up"),
            ("node-1", "up"),
        ]
        me = run_gpuctl("whoami", "--json", env=env)
        assert me.returncode == 0, me
        assert json.loads(me.stdout) | {"principal": ""} == {"principal": "", "role": "admin", "tenant": "admin",
                                                             "method": "token"}  # fmt: skip
        # Without the token: UNAUTHENTICATED (exit 3). Without the CA, gpuctl refuses to send it (exit 2).
        no_token = run_gpuctl("status", env={k: v for k, v in env.items() if k != "GPULEASE_TOKEN_FILE"})
        assert no_token.returncode == 3 and "not authenticated" in no_token.stderr, no_token
        no_ca = run_gpuctl("status", env={k: v for k, v in env.items() if k != "GPULEASE_CA"})
        assert no_ca.returncode == 2, no_ca
        children = expect_children(dev, etcd_url)
        assert sum("--mtls-listen" in " ".join(p.cmdline()) for p in children if p.is_running()) == 1

        dev.popen.send_signal(signal.SIGINT)
        try:
            rc = dev.popen.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gpuctl dev --auth still running {EXIT_TIMEOUT_S:.0f}s after SIGINT; {dev.describe()}")
        assert rc == 0, dev.describe()
        assert still_running(children) == [], dev.describe()
        dev.wait_for_line(r"^dev cluster stopped\.$", timeout=5)
        assert "Traceback" not in dev.stderr() + dev.output, dev.describe()

        # The token is in admin.token alone: not in gpuctl dev's output, its children's logs or gpuctl's stderr.
        for text in (dev.output, dev.stderr(), status.stderr, me.stderr, no_token.stderr, no_ca.stderr):
            assert token not in text
        for log in (data_dir / "logs").glob("*.log"):
            assert token not in log.read_text(errors="replace"), log


def test_dev_cluster_demo_allocates_and_releases(tmp_path: Path) -> None:
    with gpuctl_dev(tmp_path, "--demo") as (dev, port, _):
        address, _ = wait_ready(dev, port)
        lines = dev.lines
        out = "\n".join(lines)

        def index(text: str, start: int = 0) -> int:
            for i in range(start, len(lines)):
                if lines[i].strip() == text:
                    return i
            raise AssertionError(f"no line {text!r} after line {start} in:\n{out}")

        before = index("demo: cluster before allocating")
        allocate = index("demo: allocate(gpus=2, owner='demo', ttl=60s)", before)
        # gpuctl's own allocation line, then the simulated GPUs by UUID.
        m = re.fullmatch(
            r"\s*allocated ([0-9a-f]{8,64}) on (node-[01]): GPUs \d+,\d+ .* revision \d+", lines[allocate + 1]
        )
        assert m, out
        alloc_id, node = m.groups()
        assert re.fullmatch(rf"\s*GPUs \(simulated\): \d+ \(GPU-SIM-{node}-\d+\), \d+ \(GPU-SIM-{node}-\d+\)",
                            lines[allocate + 2]), out  # fmt: skip
        release = index(f"demo: release({alloc_id})", allocate)
        assert lines[release + 1].strip() == "released: True", out
        after = index("demo: cluster after releasing", release)
        assert index(READY_LINE, after) > after

        # The summary tables' total rows: all free, 2 GPUs taken, all free again.
        totals = [line.split()[1] for line in lines if line.strip().startswith("TOTAL")]
        assert totals == ["8/8", "6/8", "8/8"], out
        assert gpuctl(address, "allocs") == []
        assert gpuctl(address, "status")["totals"]["gpus_free"] == NODES * GPUS_PER_NODE

        dev.popen.send_signal(signal.SIGTERM)
        assert dev.popen.wait(timeout=EXIT_TIMEOUT_S) == 0, dev.describe()


def test_dev_cluster_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gpulease.cli.main", "dev", "--port", str(port), "--data-dir", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            env=procs.python_child_env(drop_prefixes=("GPULEASE_",)),
            stdin=subprocess.DEVNULL,
            timeout=CLI_TIMEOUT_S,
        )
    assert done.returncode == 1, done
    assert f"port {port} is in use" in done.stderr, done
    assert "Traceback" not in done.stderr, done
