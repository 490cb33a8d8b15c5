"""The example configs in deploy/ must load with the real entry points' loaders: an operator
copies them first, and a stale key there would stop a service at start. They are the secure
example of issue 13: TLS files everywhere, --insecure nowhere, the agent on a management address."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gpulease.agent.config import load_config as load_agent
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
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify also complains about the absent /opt/gpulease binaries; only the unit's own text counts here.
    bad = [
        line
        for line in done.stderr.splitlines()
        if re.search(r"unknown key|unknown section|failed to parse", line, re.I)
    ]
    assert not bad, bad
