"""Plain helpers of the Airflow provider: no Airflow import here, so they are testable without it."""

from __future__ import annotations

import ast
import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpulease import errors
from gpulease.client.config import ClientConfig, TLSConfig
from gpulease.client.models import PendingInfo
from gpulease.common.settings import CLIENT_CALL_TIMEOUT_S
from gpulease.common.units import parse_duration
from gpulease.errors import GpuLeaseError, InvalidRequest

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


def _path(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"the gpulease connection's extra {name!r} must be a file path")
    return value.strip()


# PEM text from connections, written once per process into a directory only this user can read
# (mkdtemp: 0700, an unguessable name), since the TLS settings name files.
_pem_dir: str | None = None


def pem_file(text: str) -> str:
    """A path holding ``text`` (a CA bundle in PEM): a file per distinct text, removed at exit."""
    global _pem_dir
    if _pem_dir is None:
        _pem_dir = tempfile.mkdtemp(prefix="gpulease-airflow-")
        atexit.register(shutil.rmtree, _pem_dir, True)
    path = os.path.join(_pem_dir, f"ca-{hashlib.sha256(text.encode()).hexdigest()[:32]}.pem")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        os.replace(tmp, path)
    return path


def _ca(value: Any) -> str:
    """The extra's "ca": a path, or the PEM text itself (written to a private file)."""
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return pem_file(value.strip())
    return _path("ca", value)


@dataclass(frozen=True)
class ConnectionSettings:
    """What a gpulease connection says: where the coordinators are and how to talk to them.

    ``ca``, ``cert``, ``key``: file paths (TLS with the coordinator's CA; a client certificate);
    ``token``: the connection's password, kept out of repr."""

    targets: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT_S
    ca: str = ""
    cert: str = ""
    key: str = ""
    token: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    def client_config(self) -> ClientConfig:
        """The client's typed configuration for this connection."""
        tls = TLSConfig(self.ca, self.cert, self.key) if self.ca else None
        return ClientConfig.of(self.targets, timeout=self.timeout, tls=tls, token=self.token)


def settings_from(
    host: str | None, port: int | None, extra: Mapping[str, Any] | None, password: str | None = None
) -> ConnectionSettings:
    """Connection fields -> ConnectionSettings. The password is the token; the extra:
    {"timeout": 10, "ca": "/path/ca.pem" or PEM text, "cert": "/path", "key": "/path", "tls": true}.

    Refused, without quoting the token: a token or a certificate without a CA (it would travel in
    clear text, or mean nothing), "tls": true without a CA, and a token in the extra (Airflow masks
    the password field; the token belongs there)."""
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
    if extra.get("token"):
        raise InvalidRequest(
            "the gpulease connection has a 'token' in its extra: put the token in the connection's "
            "password field (Airflow masks it) and remove it from the extra"
        )
    ca, cert, key = _ca(extra.get("ca")), _path("cert", extra.get("cert")), _path("key", extra.get("key"))
    token = password.strip() if password and password.strip() else None
    tls = _flag("tls", extra.get("tls", bool(ca)))
    if tls and not ca:
        raise InvalidRequest(
            "the gpulease connection asks for TLS but names no CA: set 'ca' in its extra to the "
            "coordinator's CA bundle (a path, or the PEM text)"
        )
    if ca and not tls:
        raise InvalidRequest("the gpulease connection's extra sets 'ca' and 'tls': false: remove one of them")
    if not ca and token:
        raise InvalidRequest(
            "the gpulease connection has a token (its password) but no CA, and a token never travels in "
            "clear text: set 'ca' in its extra to the coordinator's CA bundle (a path, or the PEM text)"
        )
    if not ca and (cert or key):
        raise InvalidRequest("the gpulease connection has a client certificate but no CA: set 'ca' in its extra")
    settings = ConnectionSettings(tuple(targets_from(host or "", port)), timeout, ca, cert, key, token)
    settings.client_config()  # refuses now what a client would refuse (a lone cert, an unusable token)
    return settings


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


# --- waiting in the coordinator's queue --------------------------------------------------------


def wait_seconds(wait: int | str | None) -> int:
    """``wait=`` of an operator in whole seconds (0: no waiting); a duration's text or seconds."""
    if wait is None or wait == "":
        return 0
    seconds = parse_duration(wait) if isinstance(wait, str) else int(wait)
    if seconds <= 0:
        raise InvalidRequest(f"wait={wait!r} must be positive (leave it out not to wait)")
    return seconds


def describe_pending(status: PendingInfo) -> str:
    """One task-log line for a pending status: position, reason and the estimated start."""
    pool = status.pool or "any GPU model"
    place = f"position {status.position}" if status.position else "not placed yet"
    text = f"request {status.request_id} pending ({place} in pool {pool}): {status.reason}"
    if status.estimated_start_unix_ms:
        start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status.estimated_start_unix_ms / 1000))
        text += f"; estimated start {start}"
    return text


def error_event(exc: BaseException, last_reason: str = "") -> dict[str, Any]:
    """A trigger event's payload for a failed wait: the error's class name and message, with the
    coordinator's last pending reason when the message does not already say it."""
    message = exc.message if isinstance(exc, GpuLeaseError) else str(exc)
    if last_reason and last_reason not in message:
        message = f"{message} (last pending reason: {last_reason})"
    return {"status": "error", "error": type(exc).__name__, "message": message}


def error_of(event: Mapping[str, Any]) -> Exception:
    """The exception a task raises for a failed-wait event: the gpulease error class it names
    (InsufficientResources for a wait that ran out), or a GpuLeaseError."""
    name = str(event.get("error") or "")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, GpuLeaseError)):
        cls = GpuLeaseError
    return cls(f"waiting in the queue failed: {event.get('message') or 'no reason given'}")
