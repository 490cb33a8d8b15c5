"""Host facts shared by every inventory source: usable CPUs, total memory, and a GPU-less source."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

from gpulease.v1.types_pb2 import NodeInventory

MEMINFO = Path("/proc/meminfo")


def usable_cpus() -> int:
    # The affinity mask, not os.cpu_count(): under taskset/cgroup cpusets only these CPUs are usable.
    return len(os.sched_getaffinity(0))


def total_memory_bytes(meminfo: Path = MEMINFO) -> int:
    """MemTotal from /proc/meminfo, falling back to sysconf where procfs is absent."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                # "MemTotal:       65794388 kB": the kernel's kB are KiB.
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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

    def collect(self) -> NodeInventory:
        return NodeInventory(
            cpus_total=self._cpus,
            memory_total_bytes=self._memory_bytes,
            labels=self._labels,
            hostname=self._hostname,
        )
