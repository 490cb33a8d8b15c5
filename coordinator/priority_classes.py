"""Named priority classes: the configured ones (coordinator setting ``priority_classes``), overridden
and extended by those an admin writes to etcd (``priorities/<name>``, ``gpuctl priority set``).

A class has a value (higher goes first in the queue, and may preempt lower preemptible work), a
preemption grace (how long a victim of this class runs between notice and revocation) and a minimum
runtime (an allocation of the class is never preempted younger than this). One class is the
default, for requests that name none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpulease.errors import InvalidRequest

DEFAULT_GRACE_S = 30
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_VALUE = 1_000_000


@dataclass(frozen=True)
class PriorityClass:
    name: str
    value: int
    is_default: bool = False
    grace_s: int = DEFAULT_GRACE_S
    min_runtime_s: int = 0


def validate(c: PriorityClass) -> PriorityClass:
    if not NAME_RE.match(c.name):
        raise InvalidRequest(f"priority class name {c.name[:64]!r} is not valid: lower-case letters, digits and '-'")
    if not -MAX_VALUE <= c.value <= MAX_VALUE:
        raise InvalidRequest(f"priority value {c.value} is out of range ({-MAX_VALUE} to {MAX_VALUE})")
    if not 0 <= c.grace_s <= 3600:
        raise InvalidRequest(f"preemption grace {c.grace_s}s is out of range (0 to 3600 s; 0 = {DEFAULT_GRACE_S} s)")
    if not 0 <= c.min_runtime_s <= 30 * 86400:
        raise InvalidRequest(f"minimum runtime {c.min_runtime_s}s is out of range (0 to 30 days)")
    return PriorityClass(c.name, c.value, c.is_default, c.grace_s or DEFAULT_GRACE_S, c.min_runtime_s)


def encode(c: PriorityClass) -> bytes:
    doc = {"value": c.value, "default": c.is_default, "grace": c.grace_s, "min_runtime": c.min_runtime_s}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(name: str, raw: bytes) -> PriorityClass:
    d: dict[str, Any] = json.loads(raw)
    return PriorityClass(name, int(d["value"]), bool(d.get("default", False)), int(d.get("grace", DEFAULT_GRACE_S)),
                         int(d.get("min_runtime", 0)))  # fmt: skip


@dataclass(frozen=True)
class Classes:
    by_name: Mapping[str, PriorityClass]
    default: str

    def grace_of(self, name: str) -> int:
        """The preemption grace of class ``name`` (the default grace for a class no longer defined)."""
        klass = self.by_name.get(name)
        return klass.grace_s if klass else DEFAULT_GRACE_S

    def resolve(self, name: str) -> PriorityClass:
        klass = name or self.default
        found = self.by_name.get(klass)
        if found is None:
            known = ", ".join(f"{c.name} ({c.value})" for c in sorted(self.by_name.values(), key=lambda c: -c.value))
            raise InvalidRequest(f"priority class {klass[:64]!r} is not defined; the classes are: {known}")
        return found


def merged(configured: Mapping[str, int], configured_default: str, stored: Mapping[str, bytes]) -> Classes:
    """The configured classes, then the stored ones over them; a stored class marked default wins."""
    out = {name: PriorityClass(name, value) for name, value in configured.items()}
    default = configured_default
    for name, raw in sorted(stored.items()):
        try:
            out[name] = decode(name, raw)
        except (ValueError, KeyError, TypeError):
            continue
        if out[name].is_default:
            default = name
    out = {n: PriorityClass(c.name, c.value, n == default, c.grace_s, c.min_runtime_s) for n, c in out.items()}
    return Classes(out, default)
