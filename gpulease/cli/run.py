"""`gpuctl run`: allocate, start a container, stream its logs, exit with its exit code, and
release the allocation on every path (normal exit, errors, Ctrl-C, SIGTERM).

The allocation is the library's handle, used as a context manager: its keepalive thread renews
the lease while the container runs (if that fails for longer than the TTL the allocation is
lost, and the agent stops the container by itself), and it is released on the way out. Ctrl-C
and SIGTERM are raised in the main thread wherever it is, also inside a gRPC call: that is safe
(see gpulease/client/_allocation.py and tests/etcd/test_client_sigterm.py).
"""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
from types import FrameType, TracebackType

from gpulease.cli import commands
from gpulease.cli.config import CliConfig
from gpulease.client import Allocation, ContainerHandle, LogChunk, Terminated
from gpulease.common.units import parse_duration
from gpulease.errors import GpuLeaseError, InvalidRequest


class _Signals:
    """Ctrl-C and SIGTERM for the whole command: KeyboardInterrupt and Terminated in the main thread.
    From ``hold()`` they are held back, then raised by ``raise_held()``: while the allocation is
    being made, so that it is known when the signal is raised, inside its ``with`` block."""

    def __init__(self) -> None:
        self._holding = False
        self._pending: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._holding:
            self._pending = signum
        else:
            _raise(signum)

    def hold(self) -> None:
        self._holding = True

    def raise_held(self) -> None:
        self._holding = False
        if self._pending is not None:
            _raise(self._pending)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def run(cfg: CliConfig, args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl) if args.ttl else 60
    env = dict(_pair(e, "--env") for e in args.env)
    with cfg.client() as client, _Signals() as signals:
        signals.hold()
        alloc = client.allocate(
            gpus=args.gpus,
            cpus=args.cpus,
            memory=args.memory,
            gpu_model=args.gpu_model,
            ttl=ttl,
            owner=args.owner or f"gpuctl-run:{getpass.getuser()}",
            **commands.tenant_options(args),
        )
        gpus = ",".join(str(g.index) for g in alloc.gpus)
        _note(f"allocated {alloc.id} on {alloc.node}: GPUs {gpus}, {alloc.cpus} CPUs, ttl {alloc.ttl_seconds}s")
        job: ContainerHandle | None = None
        with alloc:  # keepalive meanwhile; SIGTERM raises Terminated here; released on every way out
            try:
                signals.raise_held()
                job = alloc.run_container(
                    args.image, args.command, env=env, volumes=args.volume, shm_size=args.shm_size
                )
                _note(f"container {job.id[:12]} running on {alloc.node}")
                code = _follow(job)
            except (KeyboardInterrupt, Terminated) as exc:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the release
                signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
                _note(f"{signal.Signals(signum).name}: stopping the container and releasing the allocation")
                if job is not None:
                    _quietly(lambda: job.stop(grace=10))
                return 128 + signum
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                _release(alloc)
    _note(f"container exited with code {code}")
    return code


def _follow(job: ContainerHandle) -> int:
    """Stream the container's output until it exits; its exit code. When its logs cannot be
    streamed (the node's or the allocation's limit of log streams, a stream that broke), wait for
    it to exit instead: the job is never given up because of its logs."""

    def write(chunk: LogChunk) -> None:
        out = sys.stdout if chunk.stream == "stdout" else sys.stderr
        out.buffer.write(chunk.data)
        out.flush()

    def fallback(exc: GpuLeaseError) -> None:
        _note(f"cannot stream the container's output ({exc.message}); waiting for it to exit")

    status = job.follow(write, on_fallback=fallback)
    if status.exit_code is None:
        raise GpuLeaseError(f"container {job.id[:12]} did not exit; state {status.state}")
    return status.exit_code


def _release(alloc: Allocation) -> None:
    try:
        released = alloc.release()
        _note(f"released {alloc.id}" if released else f"{alloc.id} had already ended")
    except GpuLeaseError as exc:
        _note(f"could not release {alloc.id} ({exc.message}); it expires within {alloc.ttl_seconds}s")


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
