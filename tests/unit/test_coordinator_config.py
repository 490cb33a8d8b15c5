"""Coordinator settings: flags > env > TOML file, parsed once into a frozen dataclass."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpulease.common.settings import ConfigError
from gpulease.coordinator.config import CoordinatorConfig, load
from gpulease.errors import InvalidRequest


def test_defaults() -> None:
    assert load([], env={}) == CoordinatorConfig()


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('etcd = ["http://file:1"]\nlisten = "0.0.0.0:1"\nprefix = "/file/"\ndefault_ttl = "2m"\n')
    env = {"GPULEASE_COORDINATOR_LISTEN": "0.0.0.0:2", "GPULEASE_COORDINATOR_PREFIX": "/env/"}
    cfg = load(["--config", str(f), "--prefix", "/flag/", "--insecure"], env=env)
    assert cfg.etcd == ("http://file:1",)  # file only
    assert cfg.listen == "0.0.0.0:2"  # env beats file
    assert cfg.prefix == "/flag/"  # flag beats env
    assert cfg.default_ttl == 120


def test_etcd_list_and_units() -> None:
    cfg = load(["--etcd", "http://a:2379, http://b:2379", "--default-memory-per-gpu", "8GiB", "--node-ttl", "30s"],
               env={})  # fmt: skip
    assert cfg.etcd == ("http://a:2379", "http://b:2379")
    assert (cfg.default_memory_per_gpu, cfg.node_ttl) == (8 * 2**30, 30)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prefix", "nope"], "--prefix must start and end with '/'"),
        (["--node-ttl", "5", "--heartbeat-interval", "5"], "shorter than --node-ttl"),
        (["--default-ttl", "soon"], "cannot parse duration"),
        (["--etcd-max-txn-ops", "2"], "at least 16"),
        (["--config", "/nonexistent.toml"], "cannot read config file"),
        (["--event-loop", "trio"], "event loop must be one of auto, uvloop, asyncio, got 'trio'"),
        (["--max-heartbeats-per-second", "-1"], "must be 0 \\(no cap\\) or more"),
        (["--max-heartbeats-per-second", "many"], "invalid literal"),
        (["--node-liveness", "gossip"], "--node-liveness must be one of session, node-lease, got 'gossip'"),
    ],
)
def test_bad_settings_say_what_to_fix(argv: list[str], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        load(argv, env={})


def test_unknown_file_keys_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("lisen = '0.0.0.0:1'\n")
    with pytest.raises(InvalidRequest, match="unknown setting"):
        load(["--config", str(f)], env={})


def test_event_loop_choice_runs_on_that_loop() -> None:
    import asyncio

    from gpulease.common import eventloop

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(loop_module(), "asyncio").startswith("asyncio")
    # uvloop is a dependency of the coordinator extra, so "auto" must pick it here.
    assert eventloop.resolve(load([], env={}).event_loop) == "uvloop"
    assert eventloop.run(loop_module(), "auto").startswith("uvloop")


def test_clear_text_off_loopback_is_refused_unless_insecure() -> None:
    with pytest.raises(ConfigError, match=re.escape("refusing to serve clear text on 0.0.0.0:50051")):
        load(["--listen", "0.0.0.0:50051"], env={})
    assert load(["--listen", "0.0.0.0:50051", "--insecure"], env={}).insecure
    assert load(["--listen", "0.0.0.0:50051"], env={"GPULEASE_COORDINATOR_INSECURE": "true"}).insecure
    assert not load(["--listen", "127.0.0.1:50051"], env={}).insecure
    tls = ["--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "c.key"]
    assert load(["--listen", "0.0.0.0:50051", *tls], env={}).tls  # TLS anywhere


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "c.pem"], "TLS needs --tls-ca, --tls-cert and --tls-key together"),
        (["--tls-ca", "ca.pem", "--tls-cert", "c.pem"], "TLS needs"),
        (["--mtls-listen", "127.0.0.1:1"], "--mtls-listen needs TLS"),
        (["--etcd-user", "u"], "etcd auth needs --etcd-user and --etcd-password-file together"),
        (["--rate-limit", "-1"], "--rate-limit must be >= 0"),
        (["--audit-max-entries", "5"], "--audit-max-entries >= 100"),
        (["--insecure", "--listen", "nope"], "bad listen address"),
    ],
)
def test_security_settings_are_checked(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(argv, env={})
