"""Which asyncio event loop a gpulease process runs on.

uvloop (libuv) schedules callbacks and does socket I/O in C; gRPC's asyncio stack wakes the
loop for every completion, so a busy coordinator spends much of its time there. uvloop is
optional: "auto" uses it when it is installed and falls back to the standard loop otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gpulease.errors import InvalidRequest

T = TypeVar("T")
CHOICES = ("auto", "uvloop", "asyncio")


def resolve(choice: str) -> str:
    """The loop that `choice` means on this machine: "uvloop" or "asyncio"."""
    if choice not in CHOICES:
        raise InvalidRequest(f"event loop must be one of {', '.join(CHOICES)}, got {choice!r}")
    available = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not available:
        raise InvalidRequest("event loop 'uvloop' was asked for but uvloop is not installed (pip install uvloop)")
    if choice == "auto":
        return "uvloop" if available else "asyncio"
    return choice


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """asyncio.run(main) on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
