"""One configuration loader for both daemons, one error type, shared limits (issue 12, point 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpulease.agent import fencing
from gpulease.agent.config import load_config as load_agent
from gpulease.cli import config as cli_config
from gpulease.common import settings
from gpulease.common.settings import ConfigError, split_host_port
from gpulease.coordinator import validation
from gpulease.coordinator.config import load as load_coordinator

AGENT_BASE = ["--coordinator", "c:1", "--node-id", "n1"]


def test_flags_beat_env_beat_the_file_in_both_daemons(tmp_path: Path) -> None:
    coordinator_file = tmp_path / "c.toml"
    coordinator_file.write_text('listen = "127.0.0.1:1"\nprefix = "/file/"\nnode-ttl = "20s"\n')
    env = {"GPULEASE_COORDINATOR_PREFIX": "/env/", "GPULEASE_COORDINATOR_LISTEN": "127.0.0.1:2"}
    cfg = load_coordinator(["--config", str(coordinator_file), "--listen", "127.0.0.1:3"], env)
    assert (cfg.listen, cfg.prefix, cfg.node_ttl) == ("127.0.0.1:3", "/env/", 20)

    agent_file = tmp_path / "a.toml"
    agent_file.write_text('listen = "127.0.0.1:1"\ngpu_model = "file"\ncpus = 3\n')
    env = {
        "GPULEASE_AGENT_GPU_MODEL": "env",
        "GPULEASE_AGENT_LISTEN": "127.0.0.1:2",
        "GPULEASE_AGENT_CONFIG": str(agent_file),
    }
    cfg_a = load_agent([*AGENT_BASE, "--listen", "127.0.0.1:3"], env)
    assert (cfg_a.listen, cfg_a.gpu_model, cfg_a.cpus) == ("127.0.0.1:3", "env", 3)


@pytest.mark.parametrize(
    ("load", "argv", "text", "words"),
    [
        (load_coordinator, [], "gpus = 3\n", "unknown setting 'gpus'"),
        (load_agent, AGENT_BASE, "gpus = 3\n", "unknown setting 'gpus'"),
        (load_coordinator, [], "prefix = [\n", "not valid TOML"),
        (load_agent, AGENT_BASE, "prefix = [\n", "not valid TOML"),
        (load_coordinator, [], 'node_ttl = "soon"\n', "bad value for node_ttl"),
    ],
)
def test_one_error_type_names_the_setting_and_the_file(
    tmp_path: Path, load: object, argv: list[str], text: str, words: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load([*argv, "--config", str(path)], {})  # type: ignore[operator]
    for loader, extra in ((load_coordinator, []), (load_agent, AGENT_BASE)):
        with pytest.raises(ConfigError, match="cannot read config file"):
            loader([*extra, "--config", str(tmp_path / "absent.toml")], {})


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("10.0.0.1:50052", ("10.0.0.1", 50052)), ("[::1]:7", ("::1", 7)), ("host:0", ("host", 0)),
     ("nohost", None), ("h:port", None), ("h:70000", None), (":", None)],
)  # fmt: skip
def test_one_address_parser(text: str, parsed: tuple[str, int] | None) -> None:
    if parsed is None:
        with pytest.raises(ValueError):
            split_host_port(text)
    else:
        assert split_host_port(text) == parsed


def test_limits_the_tiers_share_are_declared_once() -> None:
    assert (validation.MIN_TTL, validation.MAX_TTL) == (settings.MIN_TTL_S, settings.MAX_TTL_S)
    assert fencing.MIN_ALLOCATION_TTL_S == settings.MIN_TTL_S
    assert fencing.DEFAULT_RPC_TIMEOUT_S == settings.AGENT_CALL_TIMEOUT_S
    assert cli_config.DEFAULT_TIMEOUT_S == settings.CLIENT_CALL_TIMEOUT_S


def test_the_client_has_a_typed_configuration() -> None:
    from gpulease.client import Client, ClientConfig, RetryConfig
    from gpulease.errors import InvalidRequest

    cfg = ClientConfig.resolve(None, {"GPULEASE_COORDINATOR": "a:1, b:2,a:1"}, timeout=3)
    assert cfg == ClientConfig(("a:1", "b:2"), 3, RetryConfig(None))
    assert ClientConfig.resolve("c:3", {"GPULEASE_COORDINATOR": "a:1"}).targets == ("c:3",)
    assert ClientConfig.resolve(None, {}).targets == ("127.0.0.1:50051",)
    for bad in (lambda: ClientConfig(timeout=0), lambda: ClientConfig(retry=RetryConfig(-1)),
                lambda: ClientConfig(targets=(" ",))):  # fmt: skip
        with pytest.raises(InvalidRequest):
            bad()
    with Client(config=cfg) as client:  # no call is made: channels connect lazily
        assert client.targets == ("a:1", "b:2") and client.config is cfg
