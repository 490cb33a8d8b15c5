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


def set_from_any_thread(event: asyncio.Event, loop: asyncio.AbstractEventLoop | None) -> None:
    """Set ``event``, which belongs to ``loop`` (None: not bound yet), from whatever thread calls:
    directly on the loop's own thread, through call_soon_threadsafe from another (asyncio events
    are not thread-safe), not at all once the loop has closed."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is None or loop is running:
        event.set()
    elif not loop.is_closed():
        loop.call_soon_threadsafe(event.set)
