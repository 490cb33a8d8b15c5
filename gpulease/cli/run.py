"""`gpuctl run`: allocate, start a container, stream its logs, exit with its exit code, and
release the allocation on every path (normal exit, errors, Ctrl-C, SIGTERM).

While the container runs, a background thread keeps the allocation's lease alive; if that
fails for longer than the TTL the allocation is lost (the agent stops the container by itself).
"""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
import threading
from types import FrameType

from gpulease.cli.config import CliConfig
from gpulease.client import Client
from gpulease.errors import AllocationNotFound, GpuLeaseError, InvalidRequest
from gpulease.units import parse_duration


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _KeepAlive(threading.Thread):
    """Renews the lease every ttl/3 seconds; records when the allocation is gone for good."""

    def __init__(self, client: Client, allocation_id: str, ttl: int) -> None:
        super().__init__(name="gpuctl-keepalive", daemon=True)
        self._client, self._id, self._interval = client, allocation_id, max(1.0, ttl / 3)
        self._stop_event = threading.Event()
        self.lost: str = ""

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            try:
                self._client.keep_alive(self._id)
            except AllocationNotFound as exc:
                self.lost = exc.message
                print(f"gpuctl: allocation lost: {exc.message}", file=sys.stderr, flush=True)
                return
            except GpuLeaseError as exc:  # transient: the next tick retries well within the TTL
                print(f"gpuctl: keepalive failed (will retry): {exc.message}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop_event.set()


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise _Terminated(signum)


def run(cfg: CliConfig, args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl) if args.ttl else 60
    env = dict(_pair(e, "--env") for e in args.env)
    previous = signal.signal(signal.SIGTERM, _terminate)
    with cfg.client() as client:
        alloc = client.allocate(
            gpus=args.gpus,
            cpus=args.cpus,
            memory=args.memory,
            gpu_model=args.gpu_model,
            ttl=ttl,
            owner=args.owner or f"gpuctl-run:{getpass.getuser()}",
        )
        gpus = ",".join(str(g.index) for g in alloc.gpus)
        _note(f"allocated {alloc.id} on {alloc.node}: GPUs {gpus}, {alloc.cpus} CPUs, ttl {alloc.ttl_seconds}s")
        keeper = _KeepAlive(client, alloc.id, alloc.ttl_seconds)
        keeper.start()
        container_id = ""
        try:
            container = client.run_container(
                alloc.id, args.image, args.command, env=env, volumes=args.volume, shm_size=args.shm_size
            )
            container_id = container.id
            _note(f"container {container.id[:12]} running on {alloc.node}")
            for chunk in client.logs(alloc.id, container.id, follow=True):
                out = sys.stdout if chunk.stream == "stdout" else sys.stderr
                out.buffer.write(chunk.data)
                out.flush()
            for _ in range(100):  # the log stream ends when the container exits; confirm its exit code
                status = client.wait_container(alloc.id, container.id, timeout=30)
                if status.exited:
                    break
            if status.exit_code is None:
                raise GpuLeaseError(f"container {container.id[:12]} did not exit; state {status.state}")
            _note(f"container exited with code {status.exit_code}")
            return status.exit_code
        except (KeyboardInterrupt, _Terminated) as exc:
            signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
            _note(f"{signal.Signals(signum).name}: stopping the container and releasing the allocation")
            if container_id:
                _quietly(lambda: client.stop_container(alloc.id, container_id, grace=10))
            return 128 + signum
        finally:
            keeper.stop()
            # Ignore a second Ctrl-C here: the release must go out.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                released = client.release(alloc.id)
                _note(f"released {alloc.id}" if released else f"{alloc.id} had already ended")
            except GpuLeaseError as exc:
                _note(f"could not release {alloc.id} ({exc.message}); it expires within {alloc.ttl_seconds}s")
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, previous)


def logs(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        for chunk in client.logs(args.id, args.container, follow=args.follow):
            out = sys.stdout if chunk.stream == "stdout" else sys.stderr
            out.buffer.write(chunk.data)
            out.flush()
    return 0


def _pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InvalidRequest(f"{flag} {text!r}: expected KEY=VALUE")
    return key, value


def _note(message: str) -> None:
    print(f"gpuctl: {message}", file=sys.stderr, flush=True)


def _quietly(action: object) -> None:
    try:
        action()  # type: ignore[operator]
    except GpuLeaseError as exc:
        _note(f"warning: {exc.message}")
