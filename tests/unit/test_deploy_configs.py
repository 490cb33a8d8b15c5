"""The example configs in deploy/ must load with the real entry points' loaders: an operator
copies them first, and a stale key there would stop a service at start. They are the secure
example of issue 13: TLS files everywhere, --insecure nowhere, the agent on a management address."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gpulease.agent.config import load_config as load_agent
from gpulease.agent.runtime import AGENT_NETWORK, Hardening
from gpulease.common.container_policy import ContainerPolicy
from gpulease.common.transport import is_loopback
from gpulease.coordinator.config import load as load_coordinator

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "config"
UNITS = sorted((DEPLOY.parent / "systemd").glob("*.service"))


def test_coordinator_example_config_loads() -> None:
    cfg = load_coordinator(["--config", str(DEPLOY / "coordinator.toml")], env={})
    assert cfg.listen == "0.0.0.0:50051" and len(cfg.etcd) == 3
    assert (cfg.event_loop, cfg.etcd_max_txn_ops, cfg.default_memory_per_gpu) == ("auto", 128, 64 * 2**30)
    tls = (cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
    assert tls == ("/etc/gpulease/tls/ca.pem", "/etc/gpulease/tls/coordinator.pem", "/etc/gpulease/tls/coordinator.key")
    assert cfg.mtls_listen == "0.0.0.0:50053" and not cfg.insecure
    # Written by the coordinator: in its StateDirectory, the one place its unit lets it write.
    assert cfg.bootstrap_token_file == "/var/lib/gpulease/bootstrap-token"
    assert cfg.container_policy == ContainerPolicy(
        ("/data", "/scratch/datasets"), ("models-cache",), ("registry.internal:5000", "ghcr.io/acme", "docker.io")
    )


def test_agent_example_config_loads() -> None:
    cfg = load_agent(["--config", str(DEPLOY / "agent.toml")], {})
    assert (cfg.node_id, cfg.coordinator) == ("gpu-17", "coordinator.internal:50053")
    assert dict(cfg.labels) == {"rack": "r12", "zone": "eu-west-1a"}
    assert cfg.container_retention_seconds == 3600.0
    assert (cfg.tls_ca, cfg.tls_cert, cfg.tls_key) == (
        "/etc/gpulease/tls/ca.pem",
        "/etc/gpulease/tls/agent.pem",
        "/etc/gpulease/tls/agent.key",
    )
    assert not cfg.insecure
    # The same container policy as the coordinator's example.
    assert (
        cfg.container_policy
        == load_coordinator(["--config", str(DEPLOY / "coordinator.toml")], env={}).container_policy
    )
    # A management address: neither a wildcard nor loopback (the coordinator must reach it).
    assert cfg.listen == "10.20.0.17:50052" and not is_loopback(cfg.listen)
    # How containers run, and what one tenant may hold (issue 14, part B): the defaults, spelled out.
    assert cfg.hardening == Hardening() and cfg.container_network == AGENT_NETWORK
    # The agent's firewall on its bridge, with the management subnet (etcd, every replica) denied too.
    assert cfg.firewall_enabled and cfg.container_egress_deny == ("10.20.0.0/24",)
    assert (cfg.max_concurrent_pulls, cfg.pull_timeout_seconds) == (2, 600.0)
    assert (cfg.max_log_streams_per_allocation, cfg.max_waits_per_allocation) == (4, 8)
    assert (cfg.image_retention_seconds, cfg.image_disk_limit) == (86400.0, 200 * 2**30)


def test_the_agent_unit_lets_only_loopback_and_the_coordinators_reach_it() -> None:
    unit = (DEPLOY.parent / "systemd" / "gpulease-agent.service").read_text()
    service = unit[unit.index("[Service]") : unit.index("[Install]")]
    lines = [line.strip() for line in service.splitlines() if line.strip() and not line.startswith("#")]
    assert "IPAddressDeny=any" in lines
    allowed = [word for line in lines if line.startswith("IPAddressAllow=") for word in line.split("=", 1)[1].split()]
    assert allowed[0] == "localhost" and len(allowed) > 1
    assert not {"any", "0.0.0.0/0", "::/0"} & set(allowed)


def test_the_docker_daemon_example_has_what_the_agent_relies_on() -> None:
    daemon = json.loads((DEPLOY.parent / "docker" / "daemon.json").read_text())
    # Containers on the default bridge cannot talk to each other; nothing gains privileges;
    # logs are bounded for containers the agent did not make (its own carry their own limits).
    assert daemon["icc"] is False and daemon["no-new-privileges"] is True
    assert daemon["log-driver"] == "json-file" and set(daemon["log-opts"]) == {"max-size", "max-file"}
    assert "iptables" not in daemon  # icc=false is enforced with iptables: never turned off


@pytest.mark.parametrize("path", [*sorted(DEPLOY.glob("*.toml")), *UNITS], ids=lambda p: p.name)
def test_the_secure_example_never_says_insecure(path: Path) -> None:
    text = path.read_text()
    assert "insecure" not in text.lower()
    assert "0.0.0.0:50052" not in text  # the agent's port on every interface


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_reload_tls_with_sighup(unit: Path) -> None:
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.read_text()


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_have_no_unknown_or_misplaced_keys(unit: Path) -> None:
    assert not key_warnings(unit)


def test_a_start_limit_under_service_is_caught(tmp_path: Path) -> None:
    """The check can fail: StartLimitIntervalSec moved back under [Service], where systemd ignores it."""
    text = (DEPLOY.parent / "systemd" / "gpulease-agent.service").read_text()
    moved = text.replace("StartLimitIntervalSec=0\n", "", 1).replace(
        "[Service]\n", "[Service]\nStartLimitIntervalSec=0\n", 1
    )
    unit = tmp_path / "gpulease-agent.service"
    unit.write_text(moved)
    assert any("StartLimitIntervalSec" in line for line in key_warnings(unit))


def key_warnings(unit: Path) -> list[str]:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("GPULEASE_REQUIRE_DOCKER") == "1":  # CI: .ci/run installs it
            pytest.fail("systemd-analyze is missing (Debian's systemd package provides it)")
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify also complains about the absent /opt/gpulease binaries; only the unit's own text counts here:
    # any warning about a key or section (StartLimitIntervalSec under [Service] reads "Unknown key ...
    # in section [Service], ignoring", and systemd then gives up restarting after 5 quick failures).
    bad = [
        line
        for line in done.stderr.splitlines()
        if re.search(r"unknown key|unknown section|failed to parse|key .* ignoring|lvalue", line, re.I)
    ]
    return bad
