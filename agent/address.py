"""host:port parsing, the agent's list of coordinator addresses, and the address it advertises."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from collections.abc import Sequence

from gpulease.common.settings import split_host_port

_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}
# Underscores too: not a host name by the RFCs, but resolvers (and Docker's DNS) answer them.
_DNS_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def parse_coordinators(value: str | Sequence[str]) -> tuple[str, ...]:
    """'a:50053, b:50053' (or ['a:50053', 'b:50053']) -> ('a:50053', 'b:50053').

    ValueError naming the first malformed address: an empty one, one without a port or with a port
    outside 1..65535, a host that is neither an IP address nor a DNS name (IPv6 goes in brackets),
    or one listed twice. Checked at start, so that a typo stops the agent instead of surfacing as
    a name-resolution warning on every heartbeat.
    """
    whole = value if isinstance(value, str) else ",".join(str(v) for v in value)
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out: list[str] = []
    for item in items:
        address = item.strip()
        if not address:
            raise ValueError(f"{whole!r} has an empty address: give HOST:PORT, or several separated by commas")
        host, port = split_host_port(address)
        if port == 0:
            raise ValueError(f"port 0 of {address!r} is out of range (1-65535)")
        problem = _host_problem(host, bracketed=address.startswith("["))
        if problem is not None:
            raise ValueError(f"{address!r} has {problem}")
        if address in out:
            raise ValueError(f"{address!r} is listed twice in {whole!r}")
        out.append(address)
    if not out:
        raise ValueError("no coordinator address given")
    return tuple(out)


def _host_problem(host: str, *, bracketed: bool) -> str | None:
    if not host:
        return "no host"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version == 6 and not bracketed:
            return f"the IPv6 address {host!r} without brackets: write [{host}]:PORT"
        return None
    if bracketed:
        return f"{host!r} in brackets, which is not an IPv6 address"
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        return f"an invalid host {host!r} (an IP address or a DNS name)"
    return None


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    return host in _WILDCARD_HOSTS


def advertised_address(listen_host: str, port: int, coordinator: str | Sequence[str]) -> str:
    """The address the coordinators should dial to reach this agent.

    A wildcard listen host is not dialable, so it is replaced by the local address that routes
    to the first coordinator (of a list, or a comma-separated one) whose host resolves
    (127.0.0.1 when the coordinators are local, as in `gpuctl dev`), else by what the hostname
    resolves to, else loopback.
    """
    if not is_wildcard(listen_host):
        return join_host_port(listen_host, port)
    targets = coordinator.split(",") if isinstance(coordinator, str) else coordinator
    towards = (_local_address_towards(split_host_port(t)[0]) for t in targets if t.strip())
    host = next((a for a in towards if a is not None), None) or _hostname_address() or "127.0.0.1"
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
