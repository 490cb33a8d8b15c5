"""Whether a daemon may serve clear text, and the warning it repeats while it does.

A coordinator or agent without TLS serves anyone who can reach its port, as root on GPU servers
in the agent's case. So clear text is allowed on loopback only, unless the operator says
``--insecure``; then the daemon logs a warning at start and every hour, so it is not forgotten.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from gpulease.common.settings import ConfigError, split_host_port

WARN_EVERY_S = 3600.0


def is_loopback(address: str) -> bool:
    """'127.0.0.1:50051', '[::1]:1', 'localhost:2' -> True; '0.0.0.0:50051', '10.0.0.5:1' -> False."""
    host, _ = split_host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def check_clear_text(listen: str, *, tls: bool, insecure: bool, flag_hint: str) -> None:
    """Refuse clear text on a non-loopback address unless --insecure (ConfigError, exit 2)."""
    if tls or insecure or is_loopback(listen):
        return
    raise ConfigError(
        f"refusing to serve clear text on {listen}: anyone who can reach it could use it. Give TLS files "
        f"({flag_hint}), listen on a loopback address, or pass --insecure to accept the risk"
    )


async def warn_while_insecure(log: logging.Logger, what: str, every: float = WARN_EVERY_S) -> None:
    """Log the clear-text warning now and every ``every`` seconds; runs until cancelled."""
    while True:
        log.warning(
            "INSECURE: %s serves clear text without authentication (--insecure); do not use this in production", what
        )
        await asyncio.sleep(every)
