"""One configuration loader for both daemons (issue 12, point 8): flags > environment > TOML file.

Each daemon declares its settings (a frozen dataclass) and how each is parsed; this module finds
the file, reads it, layers the three sources and reports every problem as one error type,
`ConfigError`, naming the setting and where it came from. Below the entry point nothing reads argv
or the environment: the daemons receive the frozen result.

Also the limits that the tiers share (coordinator, agent, client), declared once.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpulease.errors import InvalidRequest

# --- limits the tiers share --------------------------------------------------------------------

# An allocation's TTL: the coordinator refuses others; an agent assumes MIN_TTL_S for an
# allocation it has never seen a record of.
MIN_TTL_S = 5
MAX_TTL_S = 86400
# A call to a coordinator: the client's default deadline, and the agent's (a fencing check is on
# the StartContainer path, so it fails fast).
CLIENT_CALL_TIMEOUT_S = 10.0
AGENT_CALL_TIMEOUT_S = 5.0


# An allocation id as the coordinator makes it (ms since the epoch, then randomness, in lowercase
# hex): the coordinator and the agent refuse anything else before it reaches etcd or Docker.
ALLOCATION_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")


class ConfigError(InvalidRequest):
    """The configuration is incomplete or malformed; the message says which setting and source.
    Entry points print it and exit with status 2."""


def split_host_port(address: str) -> tuple[str, int]:
    """'10.0.0.1:50052' -> ('10.0.0.1', 50052); '[::1]:50052' -> ('::1', 50052). ValueError if not
    HOST:PORT with a port in 0..65535. The one parser of addresses for every tier."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} of {address!r} is out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


# --- layering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layered:
    """Raw values after layering (setting name -> value as written), and the file they came from."""

    values: dict[str, Any]
    config_file: str | None
    # Keys of the file that are not scalar settings but were allowed (e.g. the agent's labels table).
    extra: dict[str, Any]


def read_toml(path: str) -> dict[str, Any]:
    """The file's top-level table; keys written with '-' are read as '_'."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def layer(
    names: Iterable[str],
    args: argparse.Namespace,
    environ: Mapping[str, str],
    env_prefix: str,
    *,
    extra_file_keys: Iterable[str] = (),
) -> Layered:
    """flags > env (``<env_prefix><NAME>``) > TOML file (``--config`` or ``<env_prefix>CONFIG``).

    A flag counts when argparse holds a value other than None for it (every default must be None,
    so that "not given" differs from "given the default"). Unknown file keys are errors.
    """
    names = tuple(names)
    config_file = getattr(args, "config", None) or environ.get(f"{env_prefix}CONFIG")
    file_values = read_toml(config_file) if config_file else {}
    allowed = set(names) | set(extra_file_keys)
    unknown = sorted(set(file_values) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown setting {', '.join(map(repr, unknown))} in {config_file} (known: {', '.join(sorted(allowed))})"
        )
    values = {name: file_values[name] for name in names if name in file_values}
    for name in names:
        if (text := environ.get(env_prefix + name.upper())) is not None:
            values[name] = text
        if (flag := getattr(args, name, None)) is not None:
            values[name] = flag
    extra = {key: file_values[key] for key in extra_file_keys if key in file_values}
    return Layered(values, config_file, extra)


def parse_values(values: Mapping[str, Any], parsers: Mapping[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """Each value through its parser (identity when it has none); a failure names the setting."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        try:
            out[name] = parsers.get(name, _same)(value)
        except ConfigError:
            raise
        except (ValueError, TypeError, InvalidRequest) as exc:
            why = exc.message if isinstance(exc, InvalidRequest) else str(exc)
            raise ConfigError(f"bad value for {name}: {value!r} ({why})") from exc
    return out


def parse_bool(value: Any) -> bool:
    """True/False from TOML, or 'true'/'false'/'1'/'0'/'yes'/'no' from env and flags."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _same(value: Any) -> Any:
    return value
