"""The firewall around the agent's container bridge (issue 14, part 4): what containers cannot reach.

dockerd drops traffic between two containers of a bridge made with inter-container traffic off
(icc=false), but only when it runs with iptables on; and a bridge routes wherever the host routes.
So, for its own network (AGENT_NETWORK, Linux bridge AGENT_BRIDGE), the agent:

- installs two chains of its own (``container_firewall``, on by default; unless set, off for a
  development agent: simulated GPUs, or clear text without TLS files): ``GPULEASE-EGRESS``, jumped to from
  ``DOCKER-USER`` for traffic coming in from the bridge, drops what containers send to the cloud
  metadata address, to every IPv4 address of the agent's coordinator and to the CIDRs of
  ``container_egress_deny``; ``GPULEASE-INPUT``, jumped to from ``INPUT`` for the bridge, drops
  every new connection from a container to the GPU server itself (the agent's port, sshd, whatever
  listens there, on any of its addresses). Installed at start, where a failure stops the agent
  with a configuration error; each run flushes and refills the chains, and inserts a jump only
  when ``iptables -C`` does not find it, so restarts never duplicate anything;
- checks, before every start on a bridge, that dockerd enforces icc there (its
  ``-i <bridge> -o <bridge> -j DROP`` rule is in ``iptables -S``) and, with the firewall on, that
  its own chains are still as installed (a firewall reload may have flushed them: they are
  installed again). Otherwise the start is refused (NetworkGuard.problem; rule
  'network-isolation', raised by the runtime's prepare_network).

IPv4 only: ip6tables is left to the admin (deploy/README.md, "Isolation").
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpulease.agent.runtime import AGENT_BRIDGE, AGENT_NETWORK
from gpulease.common.settings import ConfigError, split_host_port

if TYPE_CHECKING:
    from gpulease.agent.config import AgentConfig

log = logging.getLogger(__name__)

EGRESS_CHAIN = "GPULEASE-EGRESS"
INPUT_CHAIN = "GPULEASE-INPUT"
DOCKER_USER = "DOCKER-USER"
METADATA_CIDR = "169.254.169.254/32"
IPTABLES = "iptables"
IPTABLES_TIMEOUT_S = 15.0
# How long iptables waits for the xtables lock (held by dockerd while it changes rules).
LOCK_WAIT_S = "5"


class FirewallError(ConfigError):
    """iptables is missing, or a command failed: the agent does not start (a configuration error)."""


# --------------------------------------------------------------------------- rules (pure)


@dataclass(frozen=True)
class Step:
    """One iptables command (its arguments), skipped when ``unless`` (a check) succeeds."""

    args: tuple[str, ...]
    unless: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ruleset:
    """The agent's rules for one bridge: forwarded traffic from it to ``deny`` dropped, and new
    connections from it to this host dropped."""

    bridge: str
    deny: tuple[str, ...]

    def chain_rules(self) -> dict[str, list[tuple[str, ...]]]:
        """Each chain's rules, as ``iptables -S`` prints them after ``-A <chain>``."""
        return {
            EGRESS_CHAIN: [("-d", cidr, "-j", "DROP") for cidr in self.deny],
            INPUT_CHAIN: [("-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")],
        }

    def jumps(self) -> list[tuple[str, tuple[str, ...]]]:
        """(chain, rule) of the jumps into the agent's chains, for traffic from the bridge only."""
        return [
            (DOCKER_USER, ("-i", self.bridge, "-j", EGRESS_CHAIN)),
            ("INPUT", ("-i", self.bridge, "-j", INPUT_CHAIN)),
        ]

    def steps(self) -> list[Step]:
        """What an install runs, in order: the chains made if missing (DOCKER-USER too: dockerd may
        not have started yet; it keeps the chain as it finds it), the agent's flushed and refilled,
        then each jump inserted first in its chain unless it is there already."""
        steps = [Step(("-N", chain), unless=("-S", chain)) for chain in (EGRESS_CHAIN, INPUT_CHAIN, DOCKER_USER)]
        for chain, rules in self.chain_rules().items():
            steps.append(Step(("-F", chain)))
            steps += [Step(("-A", chain, *rule)) for rule in rules]
        for chain, rule in self.jumps():
            steps.append(Step(("-I", chain, "1", *rule), unless=("-C", chain, *rule)))
        return steps

    def listing(self) -> list[str]:
        """The lines of ``iptables -S`` that the install leaves: the agent's chains and the jumps."""
        lines = [f"-N {chain}" for chain in self.chain_rules()]
        lines += [" ".join(("-A", chain, *rule)) for chain, rules in self.chain_rules().items() for rule in rules]
        lines += [" ".join(("-A", chain, *rule)) for chain, rule in self.jumps()]
        return lines

    def drift(self, listing: str) -> list[str]:
        """What differs between the installed rules (``iptables -S`` output) and these: lines missing,
        and lines of the agent's chains that should not be there."""
        have = [line.strip() for line in listing.splitlines() if line.strip()]
        want = self.listing()
        missing = [line for line in want if line not in have]
        ours = tuple(f"-A {chain} " for chain in self.chain_rules())
        extra = [line for line in have if line.startswith(ours) and line not in want]
        return [*(f"missing: {line}" for line in missing), *(f"unexpected: {line}" for line in extra)]


def parse_cidrs(items: Iterable[str], setting: str = "container_egress_deny") -> tuple[str, ...]:
    """IPv4 networks or addresses -> normalised CIDRs ('10.0.0.5' -> '10.0.0.5/32'); ValueError otherwise."""
    out: list[str] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError as e:
            raise ValueError(f"{setting}: {text!r} is not an IPv4 address or network ({e})") from None
        if not isinstance(network, ipaddress.IPv4Network):
            raise ValueError(f"{setting}: {text!r} is IPv6; the agent's rules are IPv4 only (see deploy/README.md)")
        if str(network) not in out:
            out.append(str(network))
    return tuple(out)


def build_rules(bridge: str, deny: Iterable[str]) -> Ruleset:
    """The Ruleset for bridge: the metadata address first, then deny (normalised, each once)."""
    if not bridge or any(c.isspace() for c in bridge) or len(bridge) > 15:
        raise ValueError(f"{bridge!r} is not a Linux interface name")
    return Ruleset(bridge, parse_cidrs([METADATA_CIDR, *deny]))


def icc_problem(bridge: str, listing: str) -> str | None:
    """Why traffic between two containers of bridge is not dropped, judging by ``iptables -S`` (None:
    it is). dockerd drops it with ``-A FORWARD -i B -o B -j DROP`` (``DOCKER-FORWARD`` since Docker
    28) when the network has icc off, and only when it runs with iptables on."""
    for line in listing.splitlines():
        words = line.split()
        if not words or words[0] != "-A" or "!" in words:
            continue
        pairs = dict(zip(words[2::2], words[3::2], strict=False))
        if pairs.get("-i") == bridge and pairs.get("-o") == bridge and pairs.get("-j") == "DROP" and len(pairs) == 3:
            return None
    return (
        f"dockerd runs with iptables off: no firewall rule drops traffic between containers on bridge {bridge} "
        f"(no '-i {bridge} -o {bridge} -j DROP' in iptables -S), so containers of different allocations could "
        "reach each other"
    )


# --------------------------------------------------------------------------- running iptables


class Iptables:
    """Runs iptables (IPv4, filter table), bounded; FirewallError when it is missing or hangs."""

    def __init__(self, binary: str | None = None) -> None:
        self._binary = binary

    def binary(self) -> str:
        if self._binary is None:
            path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
            found = shutil.which(IPTABLES, path=path)
            if found is None:
                raise FirewallError(
                    "iptables is not installed (apt-get install iptables): the agent needs it for its container "
                    "firewall (or turn that off with --no-container-firewall and keep containers away from the "
                    "control plane yourself: deploy/README.md, 'Isolation') and to check that dockerd keeps "
                    "containers apart"
                )
            self._binary = found
        return self._binary

    def run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = [self.binary(), "-w", LOCK_WAIT_S, *args]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FirewallError(f"{' '.join(argv)}: {e}") from e

    def check(self, args: Sequence[str]) -> str:
        """stdout of a command that must succeed; FirewallError with its stderr otherwise."""
        done = self.run(args)
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
            raise FirewallError(f"iptables {' '.join(args)} failed: {why}")
        return done.stdout

    def listing(self) -> str:
        """``iptables -S``: every rule of the filter table."""
        return self.check(["-S"])


def install(ruleset: Ruleset, iptables: Iptables) -> None:
    """Run ruleset's steps; FirewallError at the first that fails."""
    for step in ruleset.steps():
        if step.unless and iptables.run(step.unless).returncode == 0:
            continue
        iptables.check(step.args)


# --------------------------------------------------------------------------- the agent's use


class NetworkGuard:
    """Asked by the runtime before every start on a bridge network: None, or why no container may
    start on it. With a ruleset (the agent's firewall, for its bridge) it also puts the agent's
    rules back when they have gone (a firewall reload, iptables -F)."""

    def __init__(self, ruleset: Ruleset | None = None, iptables: Iptables | None = None) -> None:
        self.ruleset = ruleset
        self._iptables = iptables or Iptables()
        self._lock = threading.Lock()

    def problem(self, bridge: str) -> str | None:
        with self._lock:
            try:
                listing = self._iptables.listing()
            except FirewallError as e:
                return f"the firewall cannot be read, so whether dockerd keeps containers apart is unknown ({e})"
            problem = icc_problem(bridge, listing)
            if problem is not None or self.ruleset is None or self.ruleset.bridge != bridge:
                return problem
            drift = self.ruleset.drift(listing)
            if not drift:
                return None
            log.warning("the agent's firewall rules for %s have changed (%s): installing them again", bridge, drift)
            try:
                install(self.ruleset, self._iptables)
            except FirewallError as e:
                return f"the agent's firewall rules for bridge {bridge} are gone and cannot be installed again ({e})"
            return None


def coordinator_addresses(coordinator: str) -> tuple[str, ...]:
    """The IPv4 addresses of the coordinator's host (a name resolved now), loopback left out:
    traffic to it is never forwarded, and INPUT_CHAIN covers this host. ConfigError when a name
    does not resolve."""
    host, _ = split_host_port(coordinator)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        found = [str(literal)] if literal.version == 4 else []
    else:
        try:
            infos = socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError as e:
            raise FirewallError(
                f"coordinator host {host!r} does not resolve ({e}): the agent denies containers its addresses, "
                "so it must know them at start; fix the name (or /etc/hosts)"
            ) from e
        found = [str(info[4][0]) for info in infos]
    return tuple(a for a in dict.fromkeys(found) if not ipaddress.ip_address(a).is_loopback)


def start(cfg: AgentConfig, iptables: Iptables | None = None) -> NetworkGuard:
    """At the agent's start: install its firewall if it is on for this configuration; the guard
    the runtime asks before each start. FirewallError (a ConfigError) when it cannot be installed."""
    iptables = iptables or Iptables()
    if cfg.container_network == "none":
        return NetworkGuard(None, iptables)
    if cfg.container_network != AGENT_NETWORK or not cfg.firewall_enabled:
        if cfg.container_network != AGENT_NETWORK:
            why = f"network {cfg.container_network!r} is not the agent's own"
        elif cfg.container_firewall is None:
            why = "a development agent (simulated GPUs, or no TLS files); --container-firewall turns it on"
        else:
            why = "container_firewall is off"
        log.warning(
            "container firewall not installed (%s): containers can reach this server's services, the "
            "coordinators and the cloud metadata address unless the host's firewall stops them",
            why,
        )
        return NetworkGuard(None, iptables)
    ruleset = build_rules(AGENT_BRIDGE, [*coordinator_addresses(cfg.coordinator), *cfg.container_egress_deny])
    install(ruleset, iptables)
    log.info(
        "container firewall on bridge %s: forwarded traffic to %s dropped (%s), new connections to this host "
        "dropped (%s)",
        ruleset.bridge,
        ", ".join(ruleset.deny),
        EGRESS_CHAIN,
        INPUT_CHAIN,
    )
    return NetworkGuard(ruleset, iptables)
