"""host:port parsing and the address the agent advertises to the coordinator."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

from gpulease.common.settings import split_host_port

_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    return host in _WILDCARD_HOSTS


def advertised_address(listen_host: str, port: int, coordinator: str) -> str:
    """The address the coordinator should dial to reach this agent.

    A wildcard listen host is not dialable, so it is replaced by the local address that
    routes to the coordinator (127.0.0.1 when the coordinator is local, as in `gpuctl dev`),
    else by what the hostname resolves to, else loopback.
    """
    if not is_wildcard(listen_host):
        return join_host_port(listen_host, port)
    coordinator_host, _ = split_host_port(coordinator)
    host = _local_address_towards(coordinator_host) or _hostname_address() or "127.0.0.1"
    return join_host_port(host, port)


def _local_address_towards(remote_host: str) -> str | None:
    # A UDP connect() sends nothing; it only asks the kernel which source address it would use.
    try:
        infos = socket.getaddrinfo(remote_host, 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, _, _, _, sockaddr in infos:
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            local = str(s.getsockname()[0])
            if not ipaddress.ip_address(local).is_unspecified:
                return local
    return None


def _hostname_address() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
