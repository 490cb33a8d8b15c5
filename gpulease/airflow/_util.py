"""Plain helpers of the Airflow provider: no Airflow import here, so they are testable without it."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpulease.client.config import ClientConfig
from gpulease.common.settings import CLIENT_CALL_TIMEOUT_S
from gpulease.errors import InvalidRequest

DEFAULT_PORT = 50051
DEFAULT_TIMEOUT_S = CLIENT_CALL_TIMEOUT_S  # gpulease.common.settings: one value for every client
# The coordinator's limits (coordinator/validation.py): request ids are 1-256 characters from
# letters, digits and ._:+@=- ; owners are at most 128 printable characters.
MAX_OWNER = 128
_READABLE = re.compile(r"[^A-Za-z0-9._-]")


def _ti(context: Any) -> Any:
    """The task instance of a context (also accepts the task instance itself)."""
    if isinstance(context, Mapping):
        return context["ti"]
    return context


def request_id_for(context: Any, suffix: str = "") -> str:
    """A request id that depends on dag_id, run_id, task_id, map_index (and suffix), never on the
    try number: a retried task asks again with the same id and gets back the allocation it made.

    Readable at the front (dag and task ids), unique by a hash of everything.
    """
    ti = _ti(context)
    map_index = getattr(ti, "map_index", -1)
    parts = [str(ti.dag_id), str(ti.run_id), str(ti.task_id), str(-1 if map_index is None else map_index), suffix]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]
    readable = _READABLE.sub("-", f"{ti.dag_id}.{ti.task_id}")[:80]
    return f"af.{readable}.{digest}"


def owner_for(context: Any) -> str:
    """The default owner of an allocation a task makes: airflow:<dag_id>.<task_id>, cut to fit."""
    ti = _ti(context)
    return f"airflow:{ti.dag_id}.{ti.task_id}"[:MAX_OWNER]


def allocation_id_of(value: Any) -> str:
    """The allocation id from an allocate task's XCom (a dict), a rendered template of it (JSON or
    a Python dict's repr), or a plain id."""
    if isinstance(value, Mapping):
        alloc_id = value.get("id")
        if isinstance(alloc_id, str) and alloc_id.strip():
            return alloc_id.strip()
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return allocation_id_of(_parse_mapping(text, value))
        if text and text != "None":
            return text
    raise InvalidRequest(
        f"allocation={value!r}: pass the allocate task's output (allocation=allocate.output), "
        "a template that renders to it, or an allocation id"
    )


def _parse_mapping(text: str, original: Any) -> Any:
    # "{{ ti.xcom_pull(...) }}" renders a dict as its Python repr (single quotes), not as JSON.
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise InvalidRequest(f"allocation={original!r} is neither JSON nor a dict: {exc}") from None


def targets_from(host: str, port: int | None) -> list[str]:
    """Coordinator targets from a connection's host ("h", "h:p", "h1:p1,h2:p2", IPv6 in brackets)
    and port (the default for hosts that name none)."""
    default_port = port or DEFAULT_PORT
    targets = []
    for item in host.split(","):
        h = item.strip()
        if not h:
            continue
        if h.startswith("["):  # [v6] or [v6]:port
            targets.append(h if "]:" in h else f"{h}:{default_port}")
        elif h.count(":") > 1:  # a bare IPv6 address: no port can be told apart
            targets.append(f"[{h}]:{default_port}")
        elif ":" in h:
            targets.append(h)
        else:
            targets.append(f"{h}:{default_port}")
    if not targets:
        raise InvalidRequest("the gpulease connection has no host: set it to the coordinator's address")
    return targets


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise InvalidRequest(f"the gpulease connection's extra {name!r} must be true or false, got {value!r}")


@dataclass(frozen=True)
class ConnectionSettings:
    """What a gpulease connection says: where the coordinators are and how to talk to them."""

    targets: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT_S
    tls: bool = False
    token: str | None = field(default=None, repr=False)

    def client_config(self) -> ClientConfig:
        """The client's typed configuration for this connection."""
        return ClientConfig.of(self.targets, timeout=self.timeout)


def settings_from(host: str | None, port: int | None, extra: Mapping[str, Any] | None) -> ConnectionSettings:
    """Connection fields -> ConnectionSettings. Extra: {"timeout": 10, "tls": false, "token": "..."}."""
    extra = extra or {}
    raw_timeout = extra.get("timeout", DEFAULT_TIMEOUT_S)
    try:
        timeout = float(raw_timeout)
    except (TypeError, ValueError):
        timeout = -1.0
    if not timeout > 0:
        raise InvalidRequest(
            f"the gpulease connection's extra 'timeout' must be a positive number, got {raw_timeout!r}"
        )
    token = extra.get("token")
    return ConnectionSettings(
        targets=tuple(targets_from(host or "", port)),
        timeout=timeout,
        tls=_flag("tls", extra.get("tls", False)),
        token=str(token) if token else None,
    )


def check_supported(settings: ConnectionSettings, conn_id: str) -> list[str]:
    """Refuse what this client cannot do yet (TLS: never downgrade to clear text silently);
    returns warnings for what it ignores (a token)."""
    if settings.tls:
        raise InvalidRequest(
            f"connection {conn_id!r} asks for TLS, which this gpulease client does not support yet: "
            'remove "tls" from its extra to connect without it'
        )
    if settings.token:
        return [f"connection {conn_id!r} has a token; this gpulease client does not send tokens yet"]
    return []


class LineSplitter:
    """Turns log chunks, which may end mid-line, into whole lines, per stream."""

    def __init__(self) -> None:
        self._partial: dict[str, bytes] = {}

    def feed(self, stream: str, data: bytes) -> list[str]:
        *lines, rest = (self._partial.pop(stream, b"") + data).split(b"\n")
        if rest:
            self._partial[stream] = rest
        return [line.decode(errors="replace").rstrip("\r") for line in lines]

    def flush(self) -> list[tuple[str, str]]:
        """What is left of each stream (a last line without a newline)."""
        out = [(stream, rest.decode(errors="replace").rstrip("\r")) for stream, rest in self._partial.items()]
        self._partial.clear()
        return out
