"""The control loop: heartbeats, restart reconciliation and enforcement on a thread and event loop
of their own (issue 14, part B: one tenant cannot starve the agent).

The gRPC server and the container service run on the main event loop, and whatever a tenant does
there (hundreds of waits, log streams, stuck pulls) costs that loop and its thread pool. The
registrar and the enforcer run here instead, with their own channel to the coordinator, their own
Docker connection and their own threads, so that none of it delays a heartbeat or a stop. What
crosses between the loops is small and thread-safe: the enforcer's wake-ups and the ready gate
(``call_soon_threadsafe``), the vouchers (copy on write, under a lock), the container service's
stop reasons and starting volumes (under locks), and the agent's readiness (a coroutine run on the
main loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long stop() waits for the thread to end once its loop was told to.
JOIN_TIMEOUT_S = 10.0


class ControlLoop:
    """An event loop on a daemon thread of its own; coroutines are submitted to it from the main loop."""

    def __init__(self, name: str = "agent-control") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "start() first"
        return self._loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(JOIN_TIMEOUT_S) or self._loop is None:
            raise RuntimeError(f"the {self._name} thread did not start: {self._failure!r}")

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported by start() or stop()
            self._failure = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._ready.set()
        await self._stopped.wait()
        # Whatever is still running here is cancelled by asyncio.run on the way out.

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the control loop; cancelling the returned future cancels it there."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the control loop and wait (on the caller's loop) for its result."""
        return await asyncio.wrap_future(self.submit(coro))

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn(*args)`` on the control loop, from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closing meanwhile
                loop.call_soon_threadsafe(fn, *args)

    async def stop(self) -> None:
        """End the loop (cancelling what runs on it) and wait, bounded, for its thread."""
        stopped = self._stopped
        if stopped is not None:
            self.call_soon(stopped.set)
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, JOIN_TIMEOUT_S)
            if thread.is_alive():
                log.warning("the %s thread did not end within %.0fs", self._name, JOIN_TIMEOUT_S)


def on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """An async callable that runs ``make()`` on ``loop`` (another thread's) and waits for it."""

    async def call() -> None:
        async def run() -> None:
            await make()

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), loop))

    return call
