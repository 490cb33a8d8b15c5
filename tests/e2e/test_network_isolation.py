"""Tenants cannot reach each other or the control plane (issue 14, part 4), tried for real: containers
started through the coordinator and a real agent on a dockerd with iptables on, on the agent's own
network, open TCP connections (busybox nc) and the test looks at what came of each.

All of it runs in network, PID and mount namespaces of its own (tests/support/network_scenario.py,
through tests/support/netns.run_isolated): the host's firewall is never touched (the test compares
it before and after), and every process the scenario started ends with its PID namespace, even
when it fails or runs out of time (then unshare is killed). The test then kills whatever names the
scenario's directory on its command line and removes its containers' cgroups, and expects to find
nothing left of either.

What a container of allocation A tries, with the agent's firewall off (the control: what would be
reachable) and on:
- B's listener (another allocation's container on the same bridge): dropped either way, by
  dockerd's icc=false rule; two containers on a network with icc on do connect (the probe works);
- the agent's port (the agent listens on every address of the namespace, so only the firewall
  keeps containers off it) at the bridge's gateway and at the node's other address;
- the coordinator, on another machine (a second namespace behind a veth pair), at its port and
  any other; the metadata address; an address in container_egress_deny; and one that is denied
  nowhere, which stays reachable.
Then the agent's chains after a restart (each rule and jump once), and after a flush (a firewall
reload) the next start puts them back before the container runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from gpulease.agent.firewall import build_rules
from gpulease.agent.runtime import AGENT_BRIDGE, AGENT_NETWORK
from tests.support import dockerd, netns
from tests.support import network_scenario as scenario

SCENARIO_TIMEOUT_S = 240.0

BLOCKED_BY_THE_FIREWALL = (
    "agent_at_gateway",
    "agent_at_node_ip",
    "coordinator",
    "coordinator_host",
    "denied_host",
    "metadata",
)


def test_dockerd_with_iptables_is_refused_in_the_hosts_network_namespace(tmp_path: Path) -> None:
    with pytest.raises(netns.HostNetnsError, match="refusing to start dockerd with iptables on"):
        dockerd.start_dockerd(tmp_path, network=True)
    assert not list(tmp_path.iterdir())  # refused before anything was made


def host_rules() -> str:
    """The host's filter and nat rules (reading them changes nothing)."""
    listings = []
    for table in ("filter", "nat"):
        done = subprocess.run(["iptables", "-w", "5", "-t", table, "-S"], capture_output=True, text=True, timeout=30)
        listings.append(f"{table} ({done.returncode}):\n{done.stdout}")
    return "\n".join(listings)


@pytest.fixture(scope="module")  # the scenario runs once for the module (about 30 s)
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    problem = netns.check_prerequisites()
    if problem is None:
        try:
            dockerd.check_prerequisites()
        except dockerd.DockerUnavailable as e:
            problem = str(e)
    if problem is not None:
        if os.environ.get(dockerd.REQUIRE_ENV) == "1":
            pytest.fail(f"{dockerd.REQUIRE_ENV}=1 but the network test cannot run: {problem}", pytrace=False)
        pytest.skip(f"network test skipped: {problem}")
    logs = tmp_path_factory.mktemp("network")
    before = host_rules()
    # Short: dockerd's unix sockets live under it. Also the marker of every process it starts.
    root = Path(tempfile.mkdtemp(prefix="gln-", dir="/tmp"))
    try:
        code, out = netns.run_isolated(
            "tests.support.network_scenario",
            ["--root", str(root)],
            timeout=SCENARIO_TIMEOUT_S,
            log_path=logs / "scenario.log",
        )
    finally:
        survivors = netns.reap_by_marker(str(root))
        cgroups_left = netns.remove_cgroups(root.name)  # the containers' (dockerd's --cgroup-parent)
        shutil.rmtree(root, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith(scenario.RESULT_PREFIX)]
    stderr = (logs / "scenario.log").read_text(errors="replace")[-4000:]
    assert code is not None, f"the scenario ran past {SCENARIO_TIMEOUT_S:.0f}s; its stderr:\n{stderr}"
    assert lines, f"the scenario printed no result (exit {code}); its stderr:\n{stderr}"
    found: dict[str, Any] = json.loads(lines[-1][len(scenario.RESULT_PREFIX) :])
    assert code == 0 and "error" not in found, (
        f"{found.get('error')}\nlogs: {json.dumps(found.get('logs'), indent=1)}\nstderr:\n{stderr}"
    )
    found["survivors"], found["cgroups_left"] = survivors, cgroups_left
    found["host_rules_unchanged"] = host_rules() == before
    return found


def probes(step: dict[str, Any]) -> dict[str, str]:
    assert step["state"] == "exited" and step["exit_code"] == 0, step
    assert step["network_mode"] == AGENT_NETWORK, step  # the agent's default network, not "none"
    return dict(step["probes"])


@pytest.mark.slow
def test_nothing_is_left_running_and_the_hosts_firewall_is_untouched(result: dict[str, Any]) -> None:
    assert result["survivors"] == [] and result["cgroups_left"] == []
    assert result["host_rules_unchanged"]


@pytest.mark.slow
def test_a_container_cannot_reach_another_allocations_container(result: dict[str, Any]) -> None:
    # The control: on a network with icc on, the same probe connects.
    control = result["icc_on_control"]
    assert control["probes"] == {"peer": "connected"}, control
    # On the agent's network (icc off), B's listener is never reached, whatever the agent's firewall.
    for step in ("firewall_off", "firewall_on"):
        assert probes(result[step])["peer"] == "timeout", result[step]
    assert result["peer_still_running"]  # B's listener was there all along


@pytest.mark.slow
def test_without_the_agents_firewall_containers_reach_the_host_and_the_control_plane(result: dict[str, Any]) -> None:
    """The control for the next test: every probe it expects to be dropped connects here."""
    seen = probes(result["firewall_off"])
    assert {name: seen[name] for name in BLOCKED_BY_THE_FIREWALL} == dict.fromkeys(
        BLOCKED_BY_THE_FIREWALL, "connected"
    ), seen
    assert seen["open_host"] == "connected"
    # The coordinator on this host listens on loopback only: nothing answers at the gateway.
    assert seen["coordinator_at_gateway"] == "refused"
    assert not [line for line in result["listing_firewall_off"] if "GPULEASE" in line]


@pytest.mark.slow
def test_with_the_agents_firewall_containers_reach_neither_the_host_nor_the_control_plane(
    result: dict[str, Any],
) -> None:
    seen = probes(result["firewall_on"])
    # Dropped, not refused: nothing answers at all, on any address of the node or the coordinator's host.
    assert {name: seen[name] for name in (*BLOCKED_BY_THE_FIREWALL, "coordinator_at_gateway")} == dict.fromkeys(
        (*BLOCKED_BY_THE_FIREWALL, "coordinator_at_gateway"), "timeout"
    ), seen
    # An address denied nowhere, on the same remote host: still reachable.
    assert seen["open_host"] == "connected"


def expected_listing() -> list[str]:
    return build_rules(AGENT_BRIDGE, [scenario.COORDINATOR_IP, scenario.DENIED_IP]).listing()


@pytest.mark.slow
def test_the_agents_rules_are_installed_once_and_survive_a_restart(result: dict[str, Any]) -> None:
    want = expected_listing()
    assert want[2:5] == [
        "-A GPULEASE-EGRESS -d 169.254.169.254/32 -j DROP",
        "-A GPULEASE-EGRESS -d 10.20.0.10/32 -j DROP",  # the coordinator, as the agent was configured
        "-A GPULEASE-EGRESS -d 10.20.0.12/32 -j DROP",  # --container-egress-deny
    ]
    for key in ("listing_firewall_on", "listing_after_restart"):
        listing = result[key]
        ours = [line for line in listing if "GPULEASE" in line]
        assert sorted(ours) == sorted(want), (key, ours)  # each exactly once: a restart duplicates nothing
        # Jumps first in their chains: nothing before them accepts container traffic.
        assert [line for line in listing if line.startswith("-A DOCKER-USER")] == [
            f"-A DOCKER-USER -i {AGENT_BRIDGE} -j GPULEASE-EGRESS",
            "-A DOCKER-USER -j RETURN",
        ]
        assert next(line for line in listing if line.startswith("-A INPUT")) == (
            f"-A INPUT -i {AGENT_BRIDGE} -j GPULEASE-INPUT"
        )
        # dockerd's own rule, which the agent checks before each start.
        assert f"-A FORWARD -i {AGENT_BRIDGE} -o {AGENT_BRIDGE} -j DROP" in listing


@pytest.mark.slow
def test_rules_flushed_away_are_put_back_before_the_next_start(result: dict[str, Any]) -> None:
    assert not [line for line in result["listing_flushed"] if line.startswith("-A GPULEASE-EGRESS")]
    seen = probes(result["after_flush"])
    assert seen == {"coordinator": "timeout", "denied_host": "timeout", "metadata": "timeout", "open_host": "connected"}
    assert sorted(line for line in result["listing_after_start"] if "GPULEASE" in line) == sorted(expected_listing())
