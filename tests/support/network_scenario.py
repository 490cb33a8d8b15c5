"""The scenario of tests/e2e/test_network_isolation.py, run in namespaces of its own (never the host's):

    unshare --net --pid --mount-proc --fork --kill-child -- python -m tests.support.network_scenario --root DIR

(tests.support.netns.run_isolated). It prints one line ``RESULT <json>`` on stdout: what each
connection a container tried came to ("connected", "refused", "timeout", or "other: <what nc
said>"), the firewall as ``iptables -S`` printed it at each step, and the error, if any. The test
asserts on it; everything here only does and records.

In the scenario's network namespace: a dockerd with iptables on (tests/support/dockerd.py,
network=True), etcd and a coordinator on loopback (LocalCluster), and one agent (node NODE, its
port on every address of the namespace: 0.0.0.0, clear text) that runs containers on its own
network ``gpulease``. A second namespace, joined by a veth pair, is another machine
(tests/support/netns.py: RemoteHost) with the addresses COORDINATOR_IP (the coordinator's, as the
agent knows it: a forward to the coordinator on loopback), OPEN_IP, DENIED_IP and the cloud
metadata address, each serving a banner on BANNER_PORT.

Steps, each with a container of allocation A that tries every connection at once (busybox nc, 3 s):
1. the agent with its firewall off: the control (what a container reaches without the agent's
   rules), and B's listener behind icc=false; two containers on a network with icc on (made here
   through the Docker SDK, not the agent) reach each other, the control that the probe can connect;
2. the agent restarted with its firewall on and ``--container-egress-deny DENIED_IP``;
3. the agent restarted again: the rules, as iptables lists them; then the agent's egress chain is
   flushed (as a firewall reload would) and A's next container starts: the agent puts the rules
   back first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpulease.agent.firewall import EGRESS_CHAIN
from gpulease.agent.runtime import AGENT_NETWORK
from gpulease.client import Client
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.dev.procs import ManagedProcess
from tests.support import netns
from tests.support.dockerd import Dockerd, busybox_image, start_dockerd

NODE = "netnode"
NODE_IP = "10.20.0.1"
COORDINATOR_IP = "10.20.0.10"
OPEN_IP = "10.20.0.11"
DENIED_IP = "10.20.0.12"
METADATA_IP = "169.254.169.254"
REMOTE_PREFIX = 24
# Docker's default address pools: the containers' subnets, routed back to the node by the remote host.
CONTAINER_SUBNETS = ("172.16.0.0/12", "192.168.0.0/16")
PEER_PORT = 7000
BANNER_PORT = 8080
COORDINATOR_REMOTE_PORT = 50053
NC_WAIT_S = 3
WAIT_CONTAINER_S = 60
RESULT_PREFIX = "RESULT "

# Tries every connection at once; one line per probe: "probe <name> <what nc said>". Busybox nc
# runs /tmp/said once connected (it prints "connected"), else says "timed out" or "Connection refused".
PROBE_SCRIPT = r"""
printf '#!/bin/sh\necho connected >&2\n' > /tmp/said && chmod +x /tmp/said
probe() {
  out=$(nc -w {wait} "$2" "$3" -e /tmp/said </dev/null 2>&1)
  echo "probe $1 $out" | tr '\n' ' ' > "/tmp/probe.$1"
}
sleep 1
{probes}
wait
for f in /tmp/probe.*; do cat "$f"; echo; done
"""
LISTENER = f"nc -ll -p {PEER_PORT} -e echo peer-ok"


def probe_script(probes: Mapping[str, tuple[str, int]]) -> str:
    lines = "\n".join(f"probe {name} {ip} {port} &" for name, (ip, port) in probes.items())
    return PROBE_SCRIPT.replace("{wait}", str(NC_WAIT_S)).replace("{probes}", lines)


def outcome(said: str) -> str:
    if said.strip() == "connected":
        return "connected"
    if "refused" in said:
        return "refused"
    if "timed out" in said:
        return "timeout"
    return f"other: {said.strip()}"


def parse_probes(output: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in output.splitlines():
        words = line.split(maxsplit=2)
        if len(words) >= 2 and words[0] == "probe":
            found[words[1]] = outcome(words[2] if len(words) > 2 else "")
    return found


def iptables_listing() -> list[str]:
    return netns.sh("iptables", "-w", "5", "-S").splitlines()


class Scenario:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.result: dict[str, Any] = {}
        self.dockerd: Dockerd | None = None
        self.cluster: LocalCluster | None = None
        self.agent: ManagedProcess | None = None
        self.agent_port = 0
        self.image = ""

    # -- parts -------------------------------------------------------------------------------

    def start_agent(self, *firewall_args: str) -> None:
        assert self.dockerd is not None and self.cluster is not None
        if NODE in self.cluster.agents:
            self.cluster.stop_agent(NODE)
        child = self.dockerd.add_agent(
            self.cluster,
            NODE,
            2,
            # Its port on every address here, so that only the firewall keeps containers off it.
            "--listen", f"0.0.0.0:{self.agent_port}", "--insecure", *firewall_args,
            network=AGENT_NETWORK,
            coordinator=f"{COORDINATOR_IP}:{COORDINATOR_REMOTE_PORT}",
            port=self.agent_port,
        )  # fmt: skip
        self.agent = child.process
        self.cluster.wait_nodes_up({NODE}, timeout=60)

    def run_probes(self, client: Client, allocation_id: str, probes: Mapping[str, tuple[str, int]]) -> dict[str, Any]:
        """A container of the allocation, started through the coordinator and the agent, tries each probe."""
        assert self.dockerd is not None
        started = client.run_container(allocation_id, self.image, ["sh", "-c", probe_script(probes)])
        finished = client.wait_container(allocation_id, started.id, timeout=WAIT_CONTAINER_S)
        docker = self.dockerd.client()
        try:
            attrs = docker.api.inspect_container(started.id)
            output = docker.api.logs(started.id, stdout=True, stderr=True).decode(errors="replace")
        finally:
            docker.close()
        return {
            "state": finished.state,
            "exit_code": finished.exit_code,
            "network_mode": attrs["HostConfig"]["NetworkMode"],
            "probes": parse_probes(output),
            "output": output[-4000:],
        }

    def icc_on_control(self) -> dict[str, Any]:
        """Two containers on a network with icc on, made through the Docker SDK: the probe connects."""
        assert self.dockerd is not None
        docker = self.dockerd.client()
        made: list[Any] = []
        try:
            docker.networks.create("icc-on", driver="bridge")  # Docker's default: icc on
            listener = docker.containers.run(self.image, ["sh", "-c", LISTENER], detach=True, network="icc-on")
            made.append(listener)
            listener.reload()
            peer_ip = listener.attrs["NetworkSettings"]["Networks"]["icc-on"]["IPAddress"]
            script = probe_script({"peer": (peer_ip, PEER_PORT)})
            prober = docker.containers.run(self.image, ["sh", "-c", script], detach=True, network="icc-on")
            made.append(prober)
            prober.wait(timeout=WAIT_CONTAINER_S)
            output = prober.logs(stdout=True, stderr=True).decode(errors="replace")
            options = docker.api.inspect_network("icc-on")["Options"] or {}
            return {"probes": parse_probes(output), "options": options, "output": output[-2000:]}
        finally:
            for c in made:
                c.remove(force=True)
            for n in docker.networks.list(names=["icc-on"]):
                n.remove()
            docker.close()

    def addresses(self, container_id: str) -> tuple[str, str]:
        """(the container's address on the agent's network, that network's gateway: the node)."""
        assert self.dockerd is not None
        docker = self.dockerd.client()
        try:
            attrs = docker.api.inspect_container(container_id)
            net = attrs["NetworkSettings"]["Networks"][AGENT_NETWORK]
            return net["IPAddress"], net["Gateway"]
        finally:
            docker.close()

    # -- the scenario -------------------------------------------------------------------------

    def run(self) -> None:
        netns.require_private_netns("run the network scenario")
        netns.loopback_up()
        self.dockerd = start_dockerd(self.root / "dockerd", network=True, cgroup_parent=self.root.name)
        self.image = busybox_image(self.dockerd)
        self.cluster = LocalCluster(self.root / "cluster", startup_timeout=60).start(coordinators=1)
        coordinator_port = int(self.cluster.coordinator_address.rsplit(":", 1)[1])
        self.agent_port = procs.free_port()
        with netns.remote_host(
            NODE_IP,
            (COORDINATOR_IP, OPEN_IP, DENIED_IP, METADATA_IP),
            REMOTE_PREFIX,
            routes_back=CONTAINER_SUBNETS,
            extra_routes=(f"{METADATA_IP}/32",),
        ) as remote:
            remote.banner_server(BANNER_PORT, b"remote-ok\n")
            # The coordinator, as the agent and the containers see it: on the remote host.
            remote.forward(COORDINATOR_REMOTE_PORT, ("127.0.0.1", coordinator_port))
            self.scenario(coordinator_port)

    def scenario(self, coordinator_port: int) -> None:
        assert self.cluster is not None
        r = self.result
        r["agent_port"], r["coordinator_port"] = self.agent_port, coordinator_port
        self.start_agent("--no-container-firewall")
        with self.cluster.client(timeout=30) as client:
            a = client.allocate(gpus=1, cpus=1, memory="1GiB", ttl=900)
            b = client.allocate(gpus=1, cpus=1, memory="1GiB", ttl=900)
            try:
                listener = client.run_container(b.id, self.image, ["sh", "-c", LISTENER])
                peer_ip, gateway = self.addresses(listener.id)
                r["peer_ip"], r["gateway"] = peer_ip, gateway
                probes = {
                    "peer": (peer_ip, PEER_PORT),  # B's listener: another allocation's container
                    "agent_at_gateway": (gateway, self.agent_port),
                    "agent_at_node_ip": (NODE_IP, self.agent_port),
                    "coordinator_at_gateway": (gateway, coordinator_port),  # on loopback: refused at best
                    "coordinator": (COORDINATOR_IP, COORDINATOR_REMOTE_PORT),
                    "coordinator_host": (COORDINATOR_IP, BANNER_PORT),
                    "open_host": (OPEN_IP, BANNER_PORT),
                    "denied_host": (DENIED_IP, BANNER_PORT),
                    "metadata": (METADATA_IP, BANNER_PORT),
                }
                r["listing_firewall_off"] = iptables_listing()
                r["firewall_off"] = self.run_probes(client, a.id, probes)
                r["icc_on_control"] = self.icc_on_control()

                self.start_agent("--container-firewall", "--container-egress-deny", DENIED_IP)
                r["listing_firewall_on"] = iptables_listing()
                r["firewall_on"] = self.run_probes(client, a.id, probes)

                self.start_agent("--container-firewall", "--container-egress-deny", DENIED_IP)
                r["listing_after_restart"] = iptables_listing()
                netns.sh("iptables", "-w", "5", "-F", EGRESS_CHAIN)  # as a firewall reload would
                r["listing_flushed"] = iptables_listing()
                r["after_flush"] = self.run_probes(
                    client, a.id, {k: probes[k] for k in ("coordinator", "open_host", "denied_host", "metadata")}
                )
                r["listing_after_start"] = iptables_listing()
                r["peer_still_running"] = client.wait_container(b.id, listener.id, timeout=1).state == "running"
            finally:
                for alloc in (a, b):
                    client.release(alloc.id)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop(keep_data_dir=True)
        if self.dockerd is not None:
            self.dockerd.stop(grace=10)

    def log_tails(self) -> dict[str, str]:
        tails = {}
        for path in sorted(self.root.rglob("*.log")):
            try:
                tails[str(path.relative_to(self.root))] = "\n".join(path.read_text(errors="replace").splitlines()[-30:])
            except OSError:
                continue
        return tails


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="network_scenario")
    parser.add_argument("--root", required=True, type=Path, help="a short directory for every file it makes")
    args = parser.parse_args(argv)
    scenario = Scenario(args.root)
    began = time.monotonic()
    code = 0
    try:
        scenario.run()
    except BaseException:
        scenario.result["error"] = traceback.format_exc()
        code = 1
    finally:
        try:
            scenario.stop()
        except BaseException:
            scenario.result.setdefault("error", "")
            scenario.result["error"] += "\nwhile stopping:\n" + traceback.format_exc()
            code = 1
    if code:
        scenario.result["logs"] = scenario.log_tails()
    scenario.result["seconds"] = round(time.monotonic() - began, 1)
    print(RESULT_PREFIX + json.dumps(scenario.result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
