"""Entry point of gpulease-agent: reads the configuration once, sets up logging, runs the agent."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from gpulease.agent import firewall
from gpulease.agent.app import run_agent
from gpulease.agent.config import load_config
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
        guard = firewall.start(cfg)
    except ConfigError as e:
        _config_error(e)
    raise SystemExit(asyncio.run(run_agent(cfg, tls, network_guard=guard)))


def _config_error(e: ConfigError) -> NoReturn:
    print(f"gpulease-agent: {e}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
