"""Heartbeat load in its own process (python -m bench.heartbeats): 10,000 agents' worth of
Heartbeat RPCs must not share a GIL with the allocation load they are measured against.

With --noop it sends gRPC health checks at the same pace instead: what the same number of
empty unary calls costs the coordinator, the floor under any heartbeat's cost."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpulease.common import eventloop
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc


async def heartbeat(
    address: str,
    leases: dict[str, int],
    interval: float,
    stop: asyncio.Event,
    noop: bool = False,
    running: asyncio.Event | None = None,
) -> tuple[int, int]:
    """Every node heartbeats once per interval, spread evenly over it, as real agents would
    (`noop`: a health check in place of each Heartbeat). While `running` is clear, heartbeats wait
    (none is skipped): once it is set again the overdue ones go at once, as agents whose network
    came back would, so a pause shorter than the node TTL's margin marks no node down."""
    sent = errors = 0
    names = sorted(leases)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        check = health_pb2_grpc.HealthStub(channel).Check
        sem = asyncio.Semaphore(256)
        tasks: set[asyncio.Task[None]] = set()

        async def beat(name: str) -> None:
            nonlocal sent, errors
            async with sem:
                try:
                    if noop:
                        await check(health_pb2.HealthCheckRequest(), timeout=30)
                    else:
                        resp = await stub.Heartbeat(pb.HeartbeatRequest(node=name, lease_id=leases[name]), timeout=30)
                        leases[name] = resp.lease_id
                    sent += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        while not stop.is_set():
            start = time.perf_counter()
            for i, name in enumerate(names):
                if stop.is_set():
                    break
                delay = start + interval * i / len(names) - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if running is not None and not running.is_set():
                    await running.wait()
                task = asyncio.create_task(beat(name))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            # The next round starts one interval after this one (and the loop always yields).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, start + interval - time.perf_counter()))
        await asyncio.gather(*tasks, return_exceptions=True)
    return sent, errors


async def _stop_when_orphaned(stop: asyncio.Event, parent: int) -> None:
    """A bench killed before it could stop this process must not leave it beating forever."""
    while not stop.is_set():
        if os.getppid() != parent:
            stop.set()
        await asyncio.sleep(1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("leases", help="JSON file: node -> lease id")
    p.add_argument("--interval", type=float, default=10)
    p.add_argument("--noop", action="store_true", help="send health checks instead of heartbeats")
    p.add_argument("--parent-pid", type=int, default=0, help="stop when this process is gone (default: the parent)")
    args = p.parse_args()
    with open(args.leases) as fh:
        leases = {k: int(v) for k, v in json.load(fh).items()}

    async def run() -> tuple[int, int]:
        stop = asyncio.Event()
        running = asyncio.Event()
        running.set()
        loop = asyncio.get_running_loop()

        def terminate() -> None:
            stop.set()
            running.set()  # a paused sender ends too

        loop.add_signal_handler(signal.SIGTERM, terminate)
        # SIGUSR1 pauses the heartbeats, SIGUSR2 resumes them (see heartbeat()).
        loop.add_signal_handler(signal.SIGUSR1, running.clear)
        loop.add_signal_handler(signal.SIGUSR2, running.set)
        print("ready", flush=True)  # the handlers are in place: signals no longer kill this process
        orphan_check = asyncio.create_task(_stop_when_orphaned(stop, args.parent_pid or os.getppid()))
        try:
            return await heartbeat(args.address, leases, args.interval, stop, args.noop, running)
        finally:
            orphan_check.cancel()

    sent, errors = eventloop.run(run())
    print(json.dumps({"sent": sent, "errors": errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
