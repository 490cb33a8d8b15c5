"""Resync alone (python -m bench.resync [NODES] [ROUNDS]).

- resync_s: how long a fresh coordinator replica takes from its start until it lists every node,
  on a cluster of NODES registered nodes with no heartbeats, no allocations and no history
  (serving_s: until it serves; cpu_s: its CPU seconds by then). The scale run's resync_s measures
  the same with heartbeats and allocation load around it.
- view_load_cpu_s: the CPU seconds of the view's load of NODES node records alone, in this
  process. On a shared machine the wall clock of a whole replica varies by a second from run to
  run; this part does not, so a change to the load path is measured here against the previous
  commit (run both, alternating, with PYTHONPATH pointing at each checkout)."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import psutil

from bench.cluster import inventory, register_nodes, start_cluster, wait_nodes
from gpulease.coordinator.convert import node_info
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.records import encode_node
from gpulease.coordinator.store import KV
from gpulease.coordinator.view import ClusterView

PREFIX = "/bench-resync/"


async def measure(nodes: int, rounds: int) -> dict[str, object]:
    cluster = start_cluster()
    try:
        addr = cluster.add_coordinator(prefix=PREFIX).address
        await register_nodes(addr, [f"n{i:05d}" for i in range(nodes)], concurrency=128)
        await wait_nodes(addr, nodes, 120)
        totals, serving, cpu = [], [], []
        for _ in range(rounds):
            started = time.perf_counter()
            fresh = cluster.add_coordinator(prefix=PREFIX).address  # returns once it serves
            serving.append(round(time.perf_counter() - started, 2))
            await wait_nodes(fresh, nodes, 120)
            totals.append(round(time.perf_counter() - started, 2))
            # Its CPU seconds so far (start, load, the first ListNodes): steadier than the wall
            # clock on a shared machine.
            times = psutil.Process(cluster.coordinator(fresh).process.pid).cpu_times()
            cpu.append(round(times.user + times.system, 2))
            cluster.stop_coordinator(fresh)
        return {"nodes": nodes, "resync_s": totals, "serving_s": serving, "cpu_s": cpu}
    finally:
        cluster.stop()


def view_load_cpu(nodes: int, rounds: int) -> list[float]:
    """CPU seconds of ClusterView's load of `nodes` node records (the bench's simulated inventory)."""
    keys = Keys("/bench-load/")
    kvs = []
    for i in range(nodes):
        name = f"n{i:05d}"
        raw = encode_node(node_info(name, "127.0.0.1:1", inventory(name)))
        kvs.append(KV(keys.node(name), raw, i + 1, i + 1, 1, 0))
    out = []
    for _ in range(rounds):
        view = ClusterView(None, keys)  # type: ignore[arg-type]  # a load reads no store
        started = time.process_time()
        view._load(nodes, kvs)
        out.append(round(time.process_time() - started, 2))
    return out


def main() -> None:
    nodes = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    result = {"view_load_cpu_s": view_load_cpu(nodes, rounds), **asyncio.run(measure(nodes, rounds))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
