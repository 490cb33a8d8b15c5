"""Parsing and printing of sizes ("16GiB") and durations ("60s"), shared by gpuctl and the client."""

from __future__ import annotations

import datetime
import re

from gpulease.errors import InvalidRequest

# Kubernetes convention: a trailing "i" means binary (Gi = 2**30), none means decimal (G = 10**9).
_SIZE_FACTORS = {
    "": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?)?b?\s*$", re.IGNORECASE)
_DURATION_FACTORS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'16GiB' -> 17179869184; '500M' -> 500000000; '1024' -> 1024 bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidRequest(f"cannot parse size {text!r}: use a number with an optional unit, e.g. 16GiB, 512Mi, 2G")
    value = float(m.group(1)) * _SIZE_FACTORS[(m.group(2) or "").lower()]
    return int(value)


def parse_duration(text: str) -> int:
    """'60s' / '5m' / '1h' / '90' -> whole seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise InvalidRequest(f"cannot parse duration {text!r}: use whole seconds or a unit, e.g. 60s, 5m, 1h")
    return int(m.group(1)) * _DURATION_FACTORS[m.group(2).lower()]


def format_size(n: int) -> str:
    """Bytes as a short binary size: 17179869184 -> '16.0GiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_instant(text: str, now_s: float) -> int:
    """A point in time as Unix milliseconds: 'now', '+2h' / '+30m' (from ``now_s``), or ISO-8601
    ('2026-12-01T18:00Z', '2026-12-01 18:00:00+02:00'; without a zone: UTC)."""
    t = text.strip()
    if t.lower() == "now":
        return int(now_s * 1000)
    if t.startswith("+"):
        return int(now_s * 1000) + parse_duration(t[1:]) * 1000
    try:
        when = datetime.datetime.fromisoformat(t)
    except ValueError:
        raise InvalidRequest(f"cannot parse time {text!r}: use ISO-8601 (2026-12-01T18:00Z), 'now' or +DURATION "
                             "(+2h)") from None  # fmt: skip
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)
