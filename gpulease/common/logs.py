"""Log output of the daemons: text for people, or JSON (``--log-format json``): one object per line
with ``time``, ``level``, ``logger`` and ``message``, plus the fields a log call names with
``extra=log_fields(...)`` (``allocation_id``, ``node``, ``request_id``), so a log pipeline can
select every line about one allocation without parsing messages."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The context fields a line may carry, in this order.
FIELDS = ("allocation_id", "node", "request_id")


def log_fields(**fields: str | None) -> dict[str, Any]:
    """``extra=`` for a log call: only the named context fields that are set."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields: {sorted(unknown)}")
    return {k: v for k, v in fields.items() if v}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"), default=str)


def setup(level: str, fmt: str = "text") -> None:
    """Configure the root logger once, at a daemon's entry point (stderr)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
