"""Shared output helpers: one table printer, one JSON printer, and the client library's warnings
as gpuctl's own stderr lines."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    """Left-aligned columns separated by two spaces, headers first."""
    out = out or sys.stdout
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)


def print_json(data: Any, out: TextIO | None = None) -> None:
    print(json.dumps(data, indent=2), file=out or sys.stdout)


def ratio(free: int, total: int) -> str:
    return f"{free}/{total}"


class _Once(logging.Filter):
    """Each message once: a lost allocation is reported by the keepalive thread and again when the
    ``with`` block ends; a keepalive that keeps failing the same way says so once."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


@contextmanager
def client_log_to_stderr() -> Iterator[None]:
    """The client library's warnings (a token file others may read, a keepalive that failed and
    will retry, a lost allocation) as gpuctl's own lines: `gpuctl: <message>`, each once."""
    logger = logging.getLogger("gpulease.client")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gpuctl: %(message)s"))
    handler.addFilter(_Once())
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
