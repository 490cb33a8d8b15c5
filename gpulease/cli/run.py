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
from gpulease.client import Allocation, Client
from gpulease.common.units import parse_duration
from gpulease.errors import AllocationNotFound, GpuLeaseError, InvalidRequest


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


class _Job(threading.Thread):
    """Allocate, start, stream logs, get the exit code: all gRPC calls happen on this thread.

    The main thread only waits and handles Ctrl-C / SIGTERM. A signal raised inside a blocking
    gRPC call can corrupt gRPC's state (seen: an abort in malloc), so signals never reach one.
    """

    def __init__(self, client: Client, args: argparse.Namespace, ttl: int, env: dict[str, str]) -> None:
        super().__init__(name="gpuctl-run", daemon=True)
        self._client, self._args, self._ttl, self._env = client, args, ttl, env
        self.cancelled = threading.Event()
        self.alloc: Allocation | None = None
        self.keeper: _KeepAlive | None = None
        self.container_id = ""
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        args, client = self._args, self._client
        try:
            self.alloc = alloc = client.allocate(
                gpus=args.gpus,
                cpus=args.cpus,
                memory=args.memory,
                gpu_model=args.gpu_model,
                ttl=self._ttl,
                owner=args.owner or f"gpuctl-run:{getpass.getuser()}",
            )
            gpus = ",".join(str(g.index) for g in alloc.gpus)
            _note(f"allocated {alloc.id} on {alloc.node}: GPUs {gpus}, {alloc.cpus} CPUs, ttl {alloc.ttl_seconds}s")
            self.keeper = _KeepAlive(client, alloc.id, alloc.ttl_seconds)
            self.keeper.start()
            if self.cancelled.is_set():
                return
            container = client.run_container(
                alloc.id, args.image, args.command, env=self._env, volumes=args.volume, shm_size=args.shm_size
            )
            self.container_id = container.id
            if self.cancelled.is_set():
                return
            _note(f"container {container.id[:12]} running on {alloc.node}")
            for chunk in client.logs(alloc.id, container.id, follow=True):
                out = sys.stdout if chunk.stream == "stdout" else sys.stderr
                out.buffer.write(chunk.data)
                out.flush()
            for _ in range(100):  # the log stream ends when the container exits; confirm its exit code
                status = client.wait_container(alloc.id, container.id, timeout=30)
                if status.exited or self.cancelled.is_set():
                    break
            if status.exit_code is None and not self.cancelled.is_set():
                raise GpuLeaseError(f"container {container.id[:12]} did not exit; state {status.state}")
            self.exit_code = status.exit_code
        except BaseException as exc:  # handed to the main thread
            self.error = exc


def run(cfg: CliConfig, args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl) if args.ttl else 60
    env = dict(_pair(e, "--env") for e in args.env)
    previous = signal.signal(signal.SIGTERM, _terminate)
    with cfg.client() as client:
        job = _Job(client, args, ttl, env)
        job.start()
        code: int | None = None
        try:
            while job.is_alive():
                job.join(0.2)
        except (KeyboardInterrupt, _Terminated) as exc:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the release
            signum = exc.signum if isinstance(exc, _Terminated) else signal.SIGINT
            _note(f"{signal.Signals(signum).name}: stopping the container and releasing the allocation")
            job.cancelled.set()
            if job.container_id and job.alloc:
                _quietly(lambda: client.stop_container(job.alloc.id, job.container_id, grace=10))
            job.join(60)  # let an allocate or start already in flight finish, so nothing is left behind
            if job.container_id and job.alloc:
                _quietly(lambda: client.stop_container(job.alloc.id, job.container_id, grace=10))
            code = 128 + signum
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if job.keeper:
                job.keeper.stop()
            if job.alloc:
                alloc = job.alloc
                try:
                    released = client.release(alloc.id)
                    _note(f"released {alloc.id}" if released else f"{alloc.id} had already ended")
                except GpuLeaseError as exc:
                    _note(f"could not release {alloc.id} ({exc.message}); it expires within {alloc.ttl_seconds}s")
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    if code is not None:
        return code
    if job.error is not None:
        raise job.error
    assert job.exit_code is not None
    _note(f"container exited with code {job.exit_code}")
    return job.exit_code


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
