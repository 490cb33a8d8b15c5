"""Entry point of gpulease-agent: reads the configuration once, sets up logging, runs the agent."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from gpulease.agent import firewall
from gpulease.agent.app import run_agent
from gpulease.agent.config import AgentConfig, load_config
from gpulease.agent.runtime import AGENT_NETWORK
from gpulease.agent.security import load_tls
from gpulease.common import logs
from gpulease.common.settings import ConfigError


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cfg = load_config(argv, os.environ)
        # Read now, so that a certificate that does not name this node stops the agent before it serves.
        tls = load_tls(cfg)
    except ConfigError as e:
        _config_error(e)
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        # Before any container can start: what containers on the agent's bridge cannot reach.
        guard = firewall.start(_every_coordinator_denied(cfg))
    except ConfigError as e:
        _config_error(e)
    raise SystemExit(asyncio.run(run_agent(cfg, tls, network_guard=guard)))


def _every_coordinator_denied(cfg: AgentConfig) -> AgentConfig:
    """The configuration firewall.start sees: it denies containers `coordinator` (the first
    replica), so the other replicas' IPv4 addresses are added to container_egress_deny."""
    if len(cfg.coordinators) == 1 or cfg.container_network != AGENT_NETWORK or not cfg.firewall_enabled:
        return cfg  # no rules to add to (and no names to resolve)
    others = [f"{ip}/32" for address in cfg.coordinators[1:] for ip in firewall.coordinator_addresses(address)]
    deny = tuple(dict.fromkeys([*cfg.container_egress_deny, *others]))
    return dataclasses.replace(cfg, container_egress_deny=deny)


def _config_error(e: ConfigError) -> NoReturn:
    print(f"gpulease-agent: {e}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
