"""The agent's firewall (agent/firewall.py) without root: the rules it builds, how it installs them
(against a small model of iptables' filter table), how it reads dockerd's icc rule, its settings,
and the agent refusing to start when the rules cannot be installed.

The same rules installed for real, and what they stop, are tested in a network namespace of the
test's own: tests/e2e/test_network_isolation.py.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence

import pytest

from gpulease.agent import firewall
from gpulease.agent import main as agent_main
from gpulease.agent.config import AgentConfig, load_config
from gpulease.agent.firewall import (
    DOCKER_USER,
    EGRESS_CHAIN,
    INPUT_CHAIN,
    FirewallError,
    Iptables,
    NetworkGuard,
    Step,
    build_rules,
    icc_problem,
    install,
    parse_cidrs,
)
from gpulease.common.settings import ConfigError

# What dockerd 20.10 (Debian 12's) leaves in `iptables -S` for the agent's network (icc off), as the
# network test's dockerd printed it.
DOCKERD_20_10 = """\
-P INPUT ACCEPT
-P FORWARD ACCEPT
-P OUTPUT ACCEPT
-N DOCKER
-N DOCKER-ISOLATION-STAGE-1
-N DOCKER-ISOLATION-STAGE-2
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o gpulease0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o gpulease0 -j DOCKER
-A FORWARD -i gpulease0 ! -o gpulease0 -j ACCEPT
-A FORWARD -i gpulease0 -o gpulease0 -j DROP
-A DOCKER-ISOLATION-STAGE-1 -i gpulease0 ! -o gpulease0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o gpulease0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
"""


class FakeIptables(Iptables):
    """iptables' filter table as lists of rule strings, for -S, -N, -F, -A, -I, -C (what install uses)."""

    def __init__(self, chains: dict[str, list[str]] | None = None, fail: Sequence[str] = ()) -> None:
        super().__init__(binary="/nonexistent/iptables")
        self.chains: dict[str, list[str]] = chains if chains is not None else {"INPUT": [], "FORWARD": []}
        self.calls: list[tuple[str, ...]] = []
        self.fail = tuple(fail)  # a command whose first argument is in here fails

    def run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        args = tuple(args)
        self.calls.append(args)

        def done(code: int, out: str = "", err: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.CompletedProcess(list(args), code, out, err)

        if args[0] in self.fail:
            return done(4, err="iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied")
        op, chain = args[0], args[1] if len(args) > 1 else None
        rule = " ".join(args[2:])
        if op == "-S":
            if chain is None:
                lines = [f"-N {c}" for c in self.chains if c not in ("INPUT", "FORWARD", "OUTPUT")]
                lines += [f"-A {c} {r}" for c, rules in self.chains.items() for r in rules]
                return done(0, "\n".join(lines) + "\n")
            return done(0) if chain in self.chains else done(1, err="No chain/target/match by that name.")
        if chain not in self.chains and op != "-N":
            return done(1, err="No chain/target/match by that name.")
        if op == "-N":
            if chain in self.chains:
                return done(1, err="Chain already exists.")
            self.chains[chain] = []
        elif op == "-F":
            self.chains[chain] = []
        elif op == "-A":
            self.chains[chain].append(rule)
        elif op == "-I":
            position, rule = int(args[2]), " ".join(args[3:])
            self.chains[chain].insert(position - 1, rule)
        elif op == "-C":
            return done(0) if rule in self.chains[chain] else done(1, err="Bad rule")
        else:
            raise AssertionError(f"unexpected iptables call {args}")
        return done(0)

    def listing_text(self) -> str:
        return self.run(["-S"]).stdout


# -- the rules -------------------------------------------------------------------------------------


def test_the_rules_drop_the_metadata_address_the_deny_list_and_new_connections_to_the_host() -> None:
    ruleset = build_rules("gpulease0", ["10.20.0.10", "10.0.0.0/8", "169.254.169.254", "10.20.0.10/32"])
    assert ruleset.deny == ("169.254.169.254/32", "10.20.0.10/32", "10.0.0.0/8")  # metadata first, each once
    assert ruleset.steps() == [
        Step(("-N", EGRESS_CHAIN), unless=("-S", EGRESS_CHAIN)),
        Step(("-N", INPUT_CHAIN), unless=("-S", INPUT_CHAIN)),
        Step(("-N", DOCKER_USER), unless=("-S", DOCKER_USER)),
        Step(("-F", EGRESS_CHAIN)),
        Step(("-A", EGRESS_CHAIN, "-d", "169.254.169.254/32", "-j", "DROP")),
        Step(("-A", EGRESS_CHAIN, "-d", "10.20.0.10/32", "-j", "DROP")),
        Step(("-A", EGRESS_CHAIN, "-d", "10.0.0.0/8", "-j", "DROP")),
        Step(("-F", INPUT_CHAIN)),
        Step(("-A", INPUT_CHAIN, "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")),
        Step(
            ("-I", DOCKER_USER, "1", "-i", "gpulease0", "-j", EGRESS_CHAIN),
            unless=("-C", DOCKER_USER, "-i", "gpulease0", "-j", EGRESS_CHAIN),
        ),
        Step(
            ("-I", "INPUT", "1", "-i", "gpulease0", "-j", INPUT_CHAIN),
            unless=("-C", "INPUT", "-i", "gpulease0", "-j", INPUT_CHAIN),
        ),
    ]
    # As `iptables -S` prints them once installed (the network test compares these to the real output).
    assert ruleset.listing() == [
        "-N GPULEASE-EGRESS",
        "-N GPULEASE-INPUT",
        "-A GPULEASE-EGRESS -d 169.254.169.254/32 -j DROP",
        "-A GPULEASE-EGRESS -d 10.20.0.10/32 -j DROP",
        "-A GPULEASE-EGRESS -d 10.0.0.0/8 -j DROP",
        "-A GPULEASE-INPUT -m conntrack --ctstate NEW -j DROP",
        "-A DOCKER-USER -i gpulease0 -j GPULEASE-EGRESS",
        "-A INPUT -i gpulease0 -j GPULEASE-INPUT",
    ]


def test_only_the_metadata_address_is_denied_by_default() -> None:
    assert build_rules("gpulease0", []).deny == ("169.254.169.254/32",)


@pytest.mark.parametrize("bridge", ["", "gpu lease", "a-bridge-name-too-long"])
def test_a_bridge_name_linux_would_refuse_is_refused(bridge: str) -> None:
    with pytest.raises(ValueError, match="interface name"):
        build_rules(bridge, [])


def test_cidrs_are_ipv4_and_normalised() -> None:
    assert parse_cidrs(["10.0.0.5", " 10.1.2.3/16 ", "", "10.0.0.5/32"]) == ("10.0.0.5/32", "10.1.0.0/16")
    for bad, why in (("fd00::/8", "IPv6"), ("10.0.0.0/40", "not an IPv4"), ("coordinator", "not an IPv4")):
        with pytest.raises(ValueError, match=why):
            parse_cidrs([bad])


# -- installing ------------------------------------------------------------------------------------


def test_install_makes_the_chains_and_jumps_once_however_often_it_runs() -> None:
    ipt = FakeIptables()
    ruleset = build_rules("gpulease0", ["10.20.0.10"])
    install(ruleset, ipt)
    assert ruleset.drift(ipt.listing_text()) == []
    # dockerd starting later keeps DOCKER-USER as it is and appends its RETURN.
    ipt.chains[DOCKER_USER].append("-j RETURN")
    ipt.chains["INPUT"].append("-i eth0 -p tcp --dport 22 -j ACCEPT")
    first = list(ipt.calls)
    for _ in range(3):  # agent restarts
        install(ruleset, ipt)
    assert ipt.chains[DOCKER_USER] == ["-i gpulease0 -j GPULEASE-EGRESS", "-j RETURN"]
    assert ipt.chains["INPUT"] == ["-i gpulease0 -j GPULEASE-INPUT", "-i eth0 -p tcp --dport 22 -j ACCEPT"]
    assert ipt.chains[EGRESS_CHAIN] == ["-d 169.254.169.254/32 -j DROP", "-d 10.20.0.10/32 -j DROP"]
    assert ipt.chains[INPUT_CHAIN] == ["-m conntrack --ctstate NEW -j DROP"]
    # The first run made the chains and inserted the jumps; the later ones only checked for them.
    assert [c[:2] for c in first if c[0] in ("-N", "-I")] == [
        ("-N", EGRESS_CHAIN), ("-N", INPUT_CHAIN), ("-N", DOCKER_USER), ("-I", DOCKER_USER), ("-I", "INPUT"),
    ]  # fmt: skip
    assert not [c for c in ipt.calls[len(first) :] if c[0] in ("-N", "-I")]


def test_a_new_deny_list_replaces_the_old_one() -> None:
    ipt = FakeIptables()
    install(build_rules("gpulease0", ["10.20.0.10", "10.9.0.0/16"]), ipt)
    install(build_rules("gpulease0", ["10.20.0.11"]), ipt)
    assert ipt.chains[EGRESS_CHAIN] == ["-d 169.254.169.254/32 -j DROP", "-d 10.20.0.11/32 -j DROP"]


def test_a_failing_iptables_is_a_configuration_error() -> None:
    with pytest.raises(FirewallError, match=r"iptables -N GPULEASE-EGRESS failed: .*Permission denied") as e:
        install(build_rules("gpulease0", []), FakeIptables(fail=("-N",)))
    assert isinstance(e.value, ConfigError)


def test_a_missing_iptables_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(firewall.shutil, "which", lambda *a, **kw: None)
    with pytest.raises(FirewallError, match=r"iptables is not installed.*--no-container-firewall"):
        Iptables().run(["-S"])


# -- dockerd's icc rule, and the guard before each start ----------------------------------------


def test_dockerds_icc_rule_is_found_in_its_chains() -> None:
    assert icc_problem("gpulease0", DOCKERD_20_10) is None
    # Docker 28 keeps it in DOCKER-FORWARD.
    assert icc_problem("gpulease0", "-N DOCKER-FORWARD\n-A DOCKER-FORWARD -i gpulease0 -o gpulease0 -j DROP\n") is None


@pytest.mark.parametrize(
    "listing",
    [
        "-P FORWARD ACCEPT\n",  # dockerd with iptables off: nothing of its own
        DOCKERD_20_10.replace("-A FORWARD -i gpulease0 -o gpulease0 -j DROP\n", ""),
        "-A FORWARD -i gpulease0 -o gpulease0 -j ACCEPT\n",  # icc on
        "-A FORWARD -i gpulease0 ! -o gpulease0 -j DROP\n",
        "-A FORWARD -i gpulease0 -o gpulease0 -p tcp -j DROP\n",  # only some of it
        "-A FORWARD -i br-1234 -o br-1234 -j DROP\n",  # another bridge's
    ],
)
def test_no_icc_rule_for_the_bridge_means_dockerd_does_not_keep_containers_apart(listing: str) -> None:
    problem = icc_problem("gpulease0", listing)
    assert problem is not None and problem.startswith("dockerd runs with iptables off")


def test_the_guard_refuses_without_dockerds_rule_and_puts_the_agents_rules_back() -> None:
    ipt = FakeIptables({"INPUT": [], "FORWARD": ["-i gpulease0 -o gpulease0 -j DROP"], DOCKER_USER: ["-j RETURN"]})
    ruleset = build_rules("gpulease0", ["10.20.0.10"])
    install(ruleset, ipt)
    guard = NetworkGuard(ruleset, ipt)
    assert guard.problem("gpulease0") is None
    # A firewall reload flushed the agent's chain: the next start puts it back first.
    ipt.chains[EGRESS_CHAIN] = []
    assert guard.problem("gpulease0") is None
    assert ruleset.drift(ipt.listing_text()) == []
    # Something added a rule of its own to the agent's chain: flushed away.
    ipt.chains[INPUT_CHAIN].insert(0, "-p tcp --dport 50052 -j ACCEPT")
    assert guard.problem("gpulease0") is None and ipt.chains[INPUT_CHAIN] == ["-m conntrack --ctstate NEW -j DROP"]
    # Another network's bridge: dockerd's rule only.
    assert (guard.problem("br-0123456789ab") or "").startswith("dockerd runs with iptables off")
    # dockerd restarted with iptables off (its rules gone): refused.
    ipt.chains["FORWARD"] = []
    assert (guard.problem("gpulease0") or "").startswith("dockerd runs with iptables off")


def test_the_guard_refuses_when_the_rules_cannot_be_read_or_put_back() -> None:
    ipt = FakeIptables({"INPUT": [], "FORWARD": ["-i gpulease0 -o gpulease0 -j DROP"]})
    ruleset = build_rules("gpulease0", [])
    guard = NetworkGuard(ruleset, ipt)
    ipt.fail = ("-N",)  # the chains are not there, and cannot be made
    assert "cannot be installed again" in (guard.problem("gpulease0") or "")
    ipt.fail = ("-S",)
    assert "the firewall cannot be read" in (guard.problem("gpulease0") or "")
    assert "cannot be read" in (NetworkGuard(None, ipt).problem("gpulease0") or "")


# -- settings and start ----------------------------------------------------------------------------


def config(*args: str, env: dict[str, str] | None = None) -> AgentConfig:
    return load_config(["--coordinator", "10.20.0.10:50053", "--node-id", "n1", *args], env or {})


TLS = ("--tls-ca", "ca.pem", "--tls-cert", "agent.pem", "--tls-key", "agent.key")  # not read by load_config


def test_settings_default_on_except_for_a_development_agent() -> None:
    assert config(*TLS).firewall_enabled and config(*TLS).container_egress_deny == ()
    # Simulated GPUs, or clear text: the tests' and `gpuctl dev`'s agents, off unless asked.
    assert not config(*TLS, "--simulate-gpus", "2").firewall_enabled
    assert not config("--insecure").firewall_enabled
    assert config("--insecure", "--simulate-gpus", "2", "--container-firewall").firewall_enabled
    assert not config(*TLS, "--no-container-firewall").firewall_enabled
    assert not config(*TLS, env={"GPULEASE_AGENT_CONTAINER_FIREWALL": "false"}).firewall_enabled
    assert config("--container-egress-deny", "10.20.0.0/24, 10.30.0.7").container_egress_deny == (
        "10.20.0.0/24",
        "10.30.0.7/32",
    )
    with pytest.raises(ConfigError, match="container_egress_deny: 'fd00::1' is IPv6"):
        config("--container-egress-deny", "fd00::1")
    with pytest.raises(ConfigError, match="container_firewall must be true or false"):
        config(env={"GPULEASE_AGENT_CONTAINER_FIREWALL": "maybe"})


def test_start_installs_the_rules_for_the_agents_own_network_only() -> None:
    ipt = FakeIptables()
    guard = firewall.start(config(*TLS, "--container-egress-deny", "10.30.0.0/16"), ipt)
    assert guard.ruleset is not None and guard.ruleset.bridge == "gpulease0"
    assert ipt.chains[EGRESS_CHAIN] == [
        "-d 169.254.169.254/32 -j DROP",
        "-d 10.20.0.10/32 -j DROP",  # the coordinator
        "-d 10.30.0.0/16 -j DROP",
    ]
    for args in (
        (*TLS, "--no-container-firewall"),
        (*TLS, "--container-network", "none"),
        (*TLS, "--container-network", "jobs"),  # an admin's network: the admin's firewall
        (*TLS, "--simulate-gpus", "2"),  # development agents
        ("--insecure",),
    ):
        ipt = FakeIptables()
        assert firewall.start(config(*args), ipt).ruleset is None
        assert ipt.calls == [], args  # nothing touched


def test_coordinator_names_are_resolved_to_their_ipv4_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(host: str, *args: object, **kw: object) -> list[tuple[object, ...]]:
        if host == "coordinator.internal":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in ("10.20.0.10", "10.20.0.11")]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(firewall.socket, "getaddrinfo", getaddrinfo)
    assert firewall.coordinator_addresses("coordinator.internal:50053") == ("10.20.0.10", "10.20.0.11")
    assert firewall.coordinator_addresses("10.1.2.3:1") == ("10.1.2.3",)
    assert firewall.coordinator_addresses("127.0.0.1:1") == ()  # never forwarded; the INPUT chain covers it
    assert firewall.coordinator_addresses("[fd00::1]:1") == ()  # IPv6: the admin's
    with pytest.raises(FirewallError, match=r"'nowhere\.invalid' does not resolve"):
        firewall.coordinator_addresses("nowhere.invalid:1")


def test_the_agent_does_not_start_when_its_rules_cannot_be_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = FakeIptables(fail=("-N",))
    monkeypatch.setattr(firewall, "Iptables", lambda: failing)
    ran: list[object] = []
    monkeypatch.setattr(agent_main, "run_agent", lambda *a, **kw: ran.append(a))
    with pytest.raises(SystemExit) as e:
        agent_main.main(["--coordinator", "10.20.0.10:50053", "--node-id", "n1", "--insecure", "--container-firewall"])
    assert e.value.code == 2 and not ran
    err = capsys.readouterr().err
    assert err.startswith("gpulease-agent: iptables -N GPULEASE-EGRESS failed:"), err
