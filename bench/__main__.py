"""python -m bench [--quick] [--concurrency 1,16,64,256] [--nodes N] [--duration S] [--only PHASES] [--json]

Measures, in one run on this machine with etcd on loopback (tmpfs when available):
raw etcd transactions/s through our client stack; allocations/s and latency through the real
coordinator and client library at each concurrency; their ratio; the waiting queue (admissions/s
of 1,000 pending requests, release-to-admission latency, each against the old path in the same
run); what TLS and tokens cost (allocations/s against clear text at concurrency 64); and scale at
10,000 nodes. Every run checks its own grants for double allocations; a non-zero count fails the run.

`--only queue` (or any of load, queue, security, scale, comma-separated) runs those phases only
and replaces just their sections in the results file, keeping the others from the last run; a
section carries its own time when it has one (the queue's `measured_unix`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.cluster import GPUS_PER_NODE, register_nodes, start_cluster, wait_nodes
from bench.load import run_load
from bench.raw import noop_rpc, raw_txn
from bench.scale import run_scale
from bench.security import run_security
from bench.tombstones import run_tombstones
from bench.waiting import QueueSettings, run_queue
from gpulease.common import eventloop
from gpulease.dev.cluster import LocalCluster

RESULTS_DIR = Path(__file__).parent / "results"
PHASES = ("load", "queue", "security", "scale", "tombstones")
SECTION_PHASE = {"runs": "load", "queue": "queue", "security": "security", "scale": "scale",
                 "tombstones": "tombstones"}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small and fast: a smoke run for CI (no timing targets)")
    p.add_argument("--concurrency", default=None, help="comma-separated client concurrency levels (1,16,64,256)")
    p.add_argument("--nodes", type=int, default=None, help="simulated nodes x 8 GPUs for the load runs (1000)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measurement (5)")
    p.add_argument("--scale-nodes", type=int, default=None, help="nodes for the scale run (10000)")
    p.add_argument("--scale-heartbeat-interval", type=int, default=None,
                   help="agents' heartbeat interval in the scale run, s (default: what the default heartbeat cap "
                        "gives at --scale-nodes; node TTL 10 s more)")  # fmt: skip
    p.add_argument("--no-scale", action="store_true", help="skip the scale run")
    p.add_argument("--no-security", action="store_true", help="skip the TLS + tokens against clear text run")
    p.add_argument("--no-queue", action="store_true", help="skip the waiting queue run")
    p.add_argument("--queue-pending", type=int, default=None, help="requests pending in the queue run (1000)")
    p.add_argument("--queue-ttl", type=int, default=None, help="the queue run's coordinator --queue-ttl in s (its own)")
    p.add_argument("--only", default=None, help=f"comma-separated phases to run, of {','.join(PHASES)}")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if only is not None and not only <= set(PHASES):
        p.error(f"--only takes phases of {', '.join(PHASES)}")
    args.only = only
    args.phases = {
        ph for ph in PHASES if (only is None or ph in only) and not getattr(args, f"no_{ph}", False)
    }  # fmt: skip
    if args.queue_pending is not None and args.queue_pending < 1:
        p.error("--queue-pending must be positive")
    quick = args.quick
    args.concurrency = [int(c) for c in (args.concurrency or ("1,16" if quick else "1,16,64,256")).split(",")]
    args.nodes = args.nodes or (100 if quick else 1000)
    args.duration = args.duration or (1.0 if quick else 5.0)
    args.scale_nodes = args.scale_nodes or (500 if quick else 10000)
    if any(c < 1 for c in args.concurrency) or args.nodes < 1 or args.duration <= 0:
        p.error("concurrency, nodes and duration must be positive")
    return args


async def main_async(args: argparse.Namespace, cluster: LocalCluster) -> dict[str, object]:
    def log(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    runs = []
    if "load" in args.phases:
        runs = await run_concurrency(args, cluster, log)
    queue = None
    if "queue" in args.phases:
        settings = QueueSettings.quick() if args.quick else QueueSettings()
        if args.queue_pending:
            settings = replace(settings, pending=args.queue_pending)
        if args.queue_ttl:
            settings = replace(settings, queue_ttl=args.queue_ttl)
        log(f"queue: {settings.pending} pending requests on {settings.nodes} nodes x 8 GPUs ...")
        queue = asdict(await run_queue(cluster, settings, log))
    security = None
    if "security" in args.phases:
        c = 16 if args.quick else 64
        log(f"security: allocations with TLS and tokens against clear text, concurrency {c} ...")
        security = asdict(await run_security(cluster.etcd_url, args.nodes, c, args.duration))
    scale = None
    if "scale" in args.phases:
        log(f"scale: {args.scale_nodes} nodes ...")
        scale = asdict(await run_scale(cluster, args.scale_nodes, 100, 64 if not args.quick else 16,
                                       args.duration, heartbeat_interval=args.scale_heartbeat_interval))  # fmt: skip
    tombstone = None
    if "tombstones" in args.phases:
        c = 16 if args.quick else 64
        log(f"tombstones: releases with and without the request-id tombstone, concurrency {c} ...")
        tombstone = asdict(await run_tombstones(cluster.etcd_url, c, args.duration))
    body: dict[str, object] = {"runs": runs, "queue": queue, "security": security, "scale": scale,
                               "tombstones": tombstone}  # fmt: skip
    # With --only, the sections of the phases that did not run stay as the results file has them.
    return {k: v for k, v in body.items() if args.only is None or SECTION_PHASE[k] in args.phases}


async def run_concurrency(
    args: argparse.Namespace, cluster: LocalCluster, log: Callable[[str], None]
) -> list[dict[str, object]]:
    runs: list[dict[str, object]] = []
    log(f"registering {args.nodes} simulated nodes x 8 GPUs through RegisterNode ...")
    address = cluster.add_coordinator(prefix="/bench/").address
    await register_nodes(address, [f"node-{i:05d}" for i in range(args.nodes)])
    await wait_nodes(address, args.nodes, 120)
    for c in args.concurrency:
        log(f"concurrency {c}: raw etcd txn ...")
        raw_per_s, raw_lat = await raw_txn(cluster.etcd_url, c, args.duration)
        log(f"concurrency {c}: no-op gRPC calls ...")
        noop_per_s, noop_lat = await noop_rpc(address, c, min(args.duration, 3))
        log(f"concurrency {c}: allocations ...")
        # Each allocation takes 1 GPU; stop at 90 % of the cluster's GPUs (see run_load).
        load = await run_load(address, c, args.duration, max_allocations=args.nodes * GPUS_PER_NODE * 9 // 10)
        runs.append({
            "concurrency": c,
            "raw_txn_per_s": round(raw_per_s, 1),
            "raw_p50_ms": raw_lat.ms(0.5),
            "raw_p99_ms": raw_lat.ms(0.99),
            "alloc_per_s": round(load.alloc_per_s, 1),
            "alloc_p50_ms": load.alloc_lat.ms(0.5),
            "alloc_p99_ms": load.alloc_lat.ms(0.99),
            "alloc_release_cycles_per_s": round(load.cycles_per_s, 1),
            "ratio": round(load.alloc_per_s / raw_per_s, 3) if raw_per_s else 0.0,
            "noop_rpc_per_s": round(noop_per_s, 1),
            "noop_p50_ms": noop_lat.ms(0.5),
            "noop_p99_ms": noop_lat.ms(0.99),
            "allocations_per_txn": round(load.allocations / load.commits, 2) if load.commits else 0.0,
            "retries_per_alloc": round(load.rejected_commits / load.allocations, 4) if load.allocations else 0.0,
            "double_allocations": load.double_allocations,
            "errors": load.errors,
        })  # fmt: skip
    cluster.stop_coordinator(address)
    return runs


def machine(cluster: LocalCluster) -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "etcd_version": cluster.etcd_version(),
        "platform": platform.platform(),
        "etcd_data": "tmpfs" if str(cluster.data_dir).startswith("/dev/shm") else "disk",
    }


def print_tables(result: dict[str, object]) -> None:
    cols = [
        "concurrency", "raw_txn_per_s", "raw_p99_ms", "alloc_per_s", "alloc_p50_ms", "alloc_p99_ms",
        "alloc_release_cycles_per_s", "ratio", "noop_rpc_per_s", "noop_p50_ms", "allocations_per_txn",
        "retries_per_alloc", "double_allocations", "errors",
    ]  # fmt: skip
    rows = [[str(sum(r[c].values()) if c == "errors" else r[c]) for c in cols] for r in result.get("runs") or []]  # type: ignore[attr-defined]
    if rows:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if result.get("security"):
        print("\nsecurity (TLS + tokens against clear text):")
        for k, v in result["security"].items():  # type: ignore[attr-defined]
            print(f"  {k:32} {v}")
    if result.get("queue"):
        print("\nqueue (WaitAllocate: admissions and release-to-admission latency, against the old path):")
        for k, v in result["queue"].items():  # type: ignore[attr-defined]
            print(f"  {k:32} {v}")
    if result.get("tombstones"):
        print("\nrelease with the request-id tombstone against without (same run):")
        for k, v in result["tombstones"].items():  # type: ignore[attr-defined]
            print(f"  {k:32} {v}")
    if result.get("scale"):
        print("\nscale:")
        for k, v in result["scale"].items():  # type: ignore[attr-defined]
            print(f"  {k:32} {v}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = start_cluster()
    try:
        started = time.time()
        # The load generator runs on uvloop when it can, as the coordinator does: the bench
        # shares this machine's cores with what it measures, so a cheaper client measures more.
        body = eventloop.run(main_async(args, cluster))
        run = {"machine": machine(cluster), "quick": args.quick, "started_unix": int(started),
               "seconds": round(time.time() - started, 1)}  # fmt: skip
    finally:
        cluster.stop()
    out = RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {**run, **body}
    if args.only is not None and out.exists():
        # Only some phases ran: their sections replace the file's, the rest stay from the last run.
        result = json.loads(out.read_text())
        result.update(body)
        partial = result.setdefault("partial_runs", [])
        assert isinstance(partial, list)
        partial.append({"phases": sorted(args.phases), **run})
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print_tables(result)
    return verdict(body)


def verdict(body: dict[str, Any]) -> int:
    """Non-zero when a phase run now found a double allocation or had a call fail."""
    runs = body.get("runs") or []
    sections = {k: body[k] for k in ("queue", "security", "scale") if body.get(k)}
    doubles = sum(r["double_allocations"] for r in runs) + sum(v["double_allocations"] for v in sections.values())
    if doubles:
        print(f"FAILED: {doubles} double allocations", file=sys.stderr)
        return 1
    # Every allocation in these runs has room (or waits for it): a failed call means a broken run,
    # not a slow one.
    errors = {f"concurrency {r['concurrency']}": r["errors"] for r in runs if r["errors"]}
    errors |= {k: v["errors"] for k, v in sections.items() if v.get("errors")}
    if errors:
        print(f"FAILED: calls failed: {errors}", file=sys.stderr)
        return 1
    if body.get("queue") and body["queue"]["lapsed_waits"]:
        # Measured, not a broken run: the coordinator let waiting requests lapse (docs/performance.md).
        print(f"WARNING: {body['queue']['lapsed_waits']} waiting requests left the queue while their clients "
              "waited (waiting leases lapsed)", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
