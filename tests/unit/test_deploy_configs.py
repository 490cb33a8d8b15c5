"""The example configs in deploy/ must load with the real entry points' loaders: an operator
copies them first, and a stale key there would stop a service at start."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gpulease.agent.config import load_config as load_agent
from gpulease.coordinator.config import load as load_coordinator

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "config"


def test_coordinator_example_config_loads() -> None:
    cfg = load_coordinator(["--config", str(DEPLOY / "coordinator.toml")], env={})
    assert cfg.listen == "0.0.0.0:50051" and len(cfg.etcd) == 3
    assert (cfg.event_loop, cfg.etcd_max_txn_ops, cfg.default_memory_per_gpu) == ("auto", 128, 64 * 2**30)


def test_agent_example_config_loads() -> None:
    cfg = load_agent(["--config", str(DEPLOY / "agent.toml")], {})
    assert (cfg.node_id, cfg.coordinator) == ("gpu-17", "coordinator.internal:50051")
    assert dict(cfg.labels) == {"rack": "r12", "zone": "eu-west-1a"}
    assert cfg.container_retention_seconds == 3600.0


@pytest.mark.parametrize("unit", sorted((DEPLOY.parent / "systemd").glob("*.service")), ids=lambda p: p.name)
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
