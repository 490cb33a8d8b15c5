"""Host facts shared by every inventory source: usable CPUs, total memory, and a GPU-less source.

"Usable" means what this process (and the containers it starts under the same limits) can really
get: the CPU affinity mask and the cgroup CPU quota, and the smaller of MemTotal and the cgroup
memory limit. os.cpu_count() and MemTotal alone overstate both inside a container or a systemd
slice with limits. The kernel files behind them are read and parsed in agent/linux.py.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from gpulease.agent.inventory import InventoryContext
from gpulease.agent.linux import (
    CGROUP_ROOT,
    MEMINFO,
    PROC_SELF_CGROUP,
    cgroup_cpu_limit,
    cgroup_memory_limit,
    memtotal_bytes,
)
from gpulease.v1.types_pb2 import NodeInventory


def usable_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """Whole CPUs usable here: the affinity mask (taskset, cpusets), capped by the cgroup CPU quota.

    A fractional quota rounds down (2.5 CPUs of quota -> 2 whole CPUs), but never below 1.
    """
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return cpus


def total_memory_bytes(meminfo: Path = MEMINFO, root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """MemTotal from /proc/meminfo (sysconf where procfs is absent), capped by the cgroup memory limit."""
    total = memtotal_bytes(meminfo)
    limit = cgroup_memory_limit(root, self_cgroup)
    return min(total, limit) if limit is not None else total


def hostname() -> str:
    return socket.gethostname()


class HostOnlyInventory:
    """A node without a GPU source: its CPUs, memory and labels, and no GPUs."""

    def __init__(
        self,
        cpus: int | None = None,
        memory_bytes: int | None = None,
        labels: Mapping[str, str] | None = None,
        host: str | None = None,
    ) -> None:
        self._cpus = cpus if cpus is not None else usable_cpus()
        self._memory_bytes = memory_bytes if memory_bytes is not None else total_memory_bytes()
        self._labels = dict(labels or {})
        self._hostname = host if host is not None else hostname()

    def collect(self, ctx: InventoryContext | None = None) -> NodeInventory:
        return NodeInventory(
            cpus_total=self._cpus,
            memory_total_bytes=self._memory_bytes,
            labels=self._labels,
            hostname=self._hostname,
            source="none",
        )
