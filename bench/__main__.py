"""python -m bench [--quick] [--concurrency 1,16,64,256] [--nodes N] [--duration S] [--json]

Measures, in one run on this machine with etcd on loopback (tmpfs when available):
raw etcd transactions/s through our client stack; allocations/s and latency through the real
coordinator and client library at each concurrency; their ratio; what TLS and tokens cost
(allocations/s against clear text at concurrency 64); and scale at 10,000 nodes.
Every run checks its own grants for double allocations; a non-zero count fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.cluster import GPUS_PER_NODE, register_nodes, start_cluster, wait_nodes
from bench.load import run_load
from bench.raw import noop_rpc, raw_txn
from bench.scale import run_scale
from bench.security import run_security
from gpulease.common import eventloop
from gpulease.dev.cluster import LocalCluster

RESULTS_DIR = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small and fast: a smoke run for CI (no timing targets)")
    p.add_argument("--concurrency", default=None, help="comma-separated client concurrency levels (1,16,64,256)")
    p.add_argument("--nodes", type=int, default=None, help="simulated nodes x 8 GPUs for the load runs (1000)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measurement (5)")
    p.add_argument("--scale-nodes", type=int, default=None, help="nodes for the scale run (10000)")
    p.add_argument("--no-scale", action="store_true", help="skip the scale run")
    p.add_argument("--no-security", action="store_true", help="skip the TLS + tokens against clear text run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = p.parse_args(argv)
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
    security = None
    if not args.no_security:
        c = 16 if args.quick else 64
        log(f"security: allocations with TLS and tokens against clear text, concurrency {c} ...")
        security = asdict(await run_security(cluster.etcd_url, args.nodes, c, args.duration))
    scale = None
    if not args.no_scale:
        log(f"scale: {args.scale_nodes} nodes ...")
        scale = asdict(await run_scale(cluster, args.scale_nodes, 100, 64 if not args.quick else 16,
                                       args.duration, heartbeat_interval=10))  # fmt: skip
    return {"runs": runs, "security": security, "scale": scale}


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
    rows = [[str(sum(r[c].values()) if c == "errors" else r[c]) for c in cols] for r in result["runs"]]  # type: ignore[attr-defined]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if result.get("security"):
        print("\nsecurity (TLS + tokens against clear text):")
        for k, v in result["security"].items():  # type: ignore[attr-defined]
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
        result = {"machine": machine(cluster), "quick": args.quick, "started_unix": int(started),
                  "seconds": round(time.time() - started, 1), **body}  # fmt: skip
    finally:
        cluster.stop()
    out = RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print_tables(result)
    doubles = sum(r["double_allocations"] for r in result["runs"])
    if result.get("scale"):
        doubles += result["scale"]["double_allocations"]
    if result.get("security"):
        doubles += result["security"]["double_allocations"]
    if doubles:
        print(f"FAILED: {doubles} double allocations", file=sys.stderr)
        return 1
    # Every allocation in these runs has room: a failed call means a broken run, not a slow one.
    errors = {f"concurrency {r['concurrency']}": r["errors"] for r in result["runs"] if r["errors"]}
    if result.get("security") and result["security"]["errors"]:
        errors["security"] = result["security"]["errors"]
    if errors:
        print(f"FAILED: calls failed: {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
