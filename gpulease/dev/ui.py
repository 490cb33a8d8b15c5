"""`gpuctl dev`: a LocalCluster with simulated GPUs, started, announced, optionally shown off by a
demo that goes through the client library and gpuctl's own output, and kept up until Ctrl-C.

With --auth the cluster is a secure one (LocalCluster(secure=True)): mutual TLS on every hop and
token auth. What a user needs to reach it is put at the top of the data dir, ca.pem (the cluster's
CA certificate) and admin.token (the bootstrap admin token, mode 0600), and the banner prints the
exports that point gpuctl and the client library at them; the token itself is never printed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster, death_message
from gpulease.dev.procs import StartupError
from gpulease.errors import GpuLeaseError

if TYPE_CHECKING:
    from gpulease.cli.devconfig import DevClusterConfig

SIMULATED_LABEL = "gpulease.dev/simulated"
# Simulated nodes offer this much besides their GPUs: plausible for a GPU server, independent of the host.
DEMO_NODE_CPUS = 32
DEMO_NODE_MEMORY = "256GiB"
_POLL_S = 0.2
# What `gpuctl dev --auth` leaves at the top of its data dir for clients.
CA_FILE = "ca.pem"
TOKEN_FILE = "admin.token"


@dataclass(frozen=True)
class Credentials:
    """Where a secure dev cluster's CA certificate and admin token are, for clients."""

    ca: Path
    token_file: Path


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
    for port, flag in ((cfg.port, "--port"), (cfg.http_port, "--http-port")):
        if not procs.port_is_free(port):
            print(f"error: port {port} is in use (another dev cluster?); choose one with {flag}", file=sys.stderr)
            return 1
    names = [f"node-{i}" for i in range(cfg.nodes)]
    cluster = LocalCluster(cfg.data_dir, coordinator_port=cfg.port, secure=cfg.auth,
                           coordinator_http_port=cfg.http_port)  # fmt: skip
    keep_data = False
    with _stop_on_signals() as stopper:
        try:
            security = " (mutual TLS and token auth)" if cfg.auth else ""
            _say(f"starting etcd, a coordinator and {cfg.nodes} agent(s){security} in {cluster.data_dir} ...")
            cluster.start()
            credentials = publish_credentials(cluster) if cfg.auth else None
            for name in names:
                cluster.add_agent(
                    name,
                    cfg.gpus_per_node,
                    cpus=DEMO_NODE_CPUS,
                    memory=DEMO_NODE_MEMORY,
                    labels={SIMULATED_LABEL: "true"},
                    wait=False,
                )
            for name in names:
                cluster.wait_agent(name)
            cluster.wait_nodes_up(names)
            _print_banner(cluster, cfg, names, credentials)
            if cfg.demo:
                _run_demo(cluster)
            _say("Press Ctrl-C to stop the cluster.")
            while True:
                dead = cluster.first_dead()
                if dead is not None:
                    print(f"error: {death_message(dead)}", file=sys.stderr)
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


def publish_credentials(cluster: LocalCluster) -> Credentials:
    """data_dir/ca.pem (a copy of the cluster's CA certificate) and data_dir/admin.token (mode 0600),
    once the first coordinator has written the bootstrap token."""
    top = cluster.data_dir.resolve()
    ca, token_file = top / CA_FILE, top / TOKEN_FILE
    if cluster.ca_file.resolve() != ca:
        shutil.copyfile(cluster.ca_file, ca)
    token = cluster.admin_token()  # waits until it is written
    if cluster.token_file.resolve() != token_file:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    os.chmod(token_file, 0o600)
    return Credentials(ca, token_file)


def _print_banner(
    cluster: LocalCluster, cfg: DevClusterConfig, names: Sequence[str], credentials: Credentials | None
) -> None:
    removal = "removed on exit" if cluster.made_data_dir else "kept on exit"
    http = cluster.coordinator(cluster.coordinator_address).http_url
    lines = [
        "",
        f"gpulease dev cluster is up: {cfg.nodes} node(s) x {cfg.gpus_per_node} GPU(s).",
        "  *** GPUs are SIMULATED: no real GPU is used or reserved. ***",
        f"  coordinator: {cluster.coordinator_address}",
        f"  dashboard:   {http}/",
        f"  HTTP:        {http}/metrics, {http}/readyz",
        f"  etcd:        {cluster.etcd_url}",
        f"  nodes:       {', '.join(names)} (label {SIMULATED_LABEL}=true)",
        f"  data dir:    {cluster.data_dir} ({removal}); logs in {cluster.logs_dir}",
    ]
    exports = [f"  export GPULEASE_COORDINATOR={cluster.coordinator_address}"]
    if credentials is not None:
        lines += [
            "  security:    mutual TLS on every hop, token auth",
            f"  CA:          {credentials.ca}",
            f"  admin token: {credentials.token_file} (mode 0600; keep it secret)",
        ]
        exports += [
            f"  export GPULEASE_CA={shlex.quote(str(credentials.ca))}",
            f"  export GPULEASE_TOKEN_FILE={shlex.quote(str(credentials.token_file))}",
        ]
    _say("\n".join([*lines, "", "Point gpuctl and the client library at it with:", *exports, ""]))


def _run_demo(cluster: LocalCluster) -> None:
    """Allocate and release through the client library, printed by gpuctl's own output code."""
    from gpulease.cli import views
    from gpulease.cli.commands import print_status

    with cluster.client() as client:
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
