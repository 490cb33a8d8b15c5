"""`gpuctl top`: a live terminal view of the cluster, like htop.

Every --interval seconds it reads ListNodes and ListAllocations through the client library and
redraws one frame in place (ANSI home + clear): a header with the totals, then one line per GPU
with its node, model, state, telemetry and holder. Telemetry (utilization, memory used,
temperature, power) is what the answering coordinator holds in memory from the node's
heartbeats; "-" where there is none (simulated GPUs, a down node, a node that heartbeats another
coordinator replica). ``--once`` prints one frame without escape codes and exits.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from gpulease.cli.output import print_table
from gpulease.cli.views import AnyAllocation
from gpulease.client.models import Gpu, Node
from gpulease.common.units import format_size
from gpulease.errors import GpuLeaseError

CLEAR = "\x1b[H\x1b[2J"
STATES = ("free", "allocated", "unhealthy", "foreign", "cordoned", "down")
HEADERS = ["NODE", "GPU", "MODEL", "STATE", "UTIL", "MEM", "TEMP", "POWER", "ALLOCATION", "OWNER", "TENANT"]


def short_model(model: str, width: int = 18) -> str:
    name = model.removeprefix("NVIDIA ").strip()
    return name if len(name) <= width else name[: width - 1] + "…"


def gpu_state(n: Node, g: Gpu) -> str:
    if n.state == "down":
        return "down"
    if g.index in n.allocated_gpu_indexes:
        return "allocated"
    if not g.healthy:
        return "unhealthy"
    if g.foreign_processes:
        return "foreign"
    if n.state == "cordoned" or n.cordoned:
        return "cordoned"
    return "free"


def util_cell(percent: int | None, bar: int = 10) -> str:
    """'37% ███▋      ' style: the number and a bar of ``bar`` cells; '-' when unknown."""
    if percent is None:
        return "-"
    filled = round(max(0, min(100, percent)) * bar / 100)
    return f"{percent:3d}% " + "█" * filled + "·" * (bar - filled)


def _holders(allocations: Sequence[AnyAllocation]) -> dict[tuple[str, int], AnyAllocation]:
    out: dict[tuple[str, int], AnyAllocation] = {}
    for a in allocations:
        members = [(m.node, m.gpus) for m in a.members] or [(a.node, a.gpus)]
        for node, gpus in members:
            for g in gpus:
                out[(node, g.index)] = a
    return out


def frame(nodes: Sequence[Node], allocations: Sequence[AnyAllocation], *, title: str = "") -> str:
    """One screen: totals, then one row per GPU (nodes by name, GPUs by index)."""
    holders = _holders(allocations)
    counts = dict.fromkeys(STATES, 0)
    node_states = dict.fromkeys(("up", "down", "cordoned"), 0)
    rows: list[list[str]] = []
    for n in sorted(nodes, key=lambda n: n.name):
        node_states[n.state if n.state in node_states else "up"] += 1
        for g in sorted(n.gpus, key=lambda g: g.index):
            state = gpu_state(n, g)
            counts[state] += 1
            a = holders.get((n.name, g.index))
            mem = (
                "-"
                if g.memory_used_bytes is None
                else f"{format_size(g.memory_used_bytes)}/{format_size(g.memory_total_bytes)}"
            )
            rows.append([
                n.name, str(g.index), short_model(g.model), state, util_cell(g.utilization_percent), mem,
                "-" if g.temperature_c is None else f"{g.temperature_c}C",
                "-" if g.power_draw_mw is None else f"{g.power_draw_mw / 1000:.0f}W",
                a.id[:8] if a is not None else "", (a.owner or "-") if a is not None else "",
                (a.tenant or "-") if a is not None else "",
            ])  # fmt: skip
    out = io.StringIO()
    if title:
        print(title, file=out)
    total = sum(counts.values())
    print(f"nodes {len(nodes)}: up {node_states['up']}, down {node_states['down']}, "
          f"cordoned {node_states['cordoned']}   allocations {len(allocations)}", file=out)  # fmt: skip
    print(f"GPUs {total}: " + ", ".join(f"{s} {counts[s]}" for s in STATES), file=out)
    print(file=out)
    if rows:
        print_table(HEADERS, rows, out)
    else:
        print("no nodes registered", file=out)
    return out.getvalue()


def run(
    fetch: Callable[[], tuple[Sequence[Node], Sequence[AnyAllocation]]],
    *,
    interval: float,
    once: bool,
    source: str,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Draw frames until Ctrl-C (exit 0); ``once``: one plain frame. A failed refresh is shown in
    the frame and retried at the next tick (with ``once`` it is raised)."""
    out = out or sys.stdout
    if once:
        nodes, allocs = fetch()
        out.write(frame(nodes, allocs))
        out.flush()
        return 0
    try:
        while True:
            title = f"gpuctl top — {source} — {time.strftime('%H:%M:%S')} — every {interval:g}s, Ctrl-C quits"
            try:
                nodes, allocs = fetch()
                text = frame(nodes, allocs, title=title)
            except GpuLeaseError as e:
                text = f"{title}\n\ncannot read the cluster: {e}\n"
            out.write(CLEAR + text)
            out.flush()
            sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
        return 0
