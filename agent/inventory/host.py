"""Host facts shared by every inventory source: usable CPUs, total memory, and a GPU-less source.

"Usable" means what this process (and the containers it starts under the same limits) can really
get: the CPU affinity mask and the cgroup CPU quota, and the smaller of MemTotal and the cgroup
memory limit. os.cpu_count() and MemTotal alone overstate both inside a container or a systemd
slice with limits.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.inventory import InventoryContext
from gpulease.v1.types_pb2 import NodeInventory

MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX * page size).
_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class _CgroupEntry:
    controllers: tuple[str, ...]  # () for the cgroup v2 line "0::/path"
    path: str


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _self_cgroups(self_cgroup: Path) -> list[_CgroupEntry]:
    text = _read(self_cgroup)
    entries: list[_CgroupEntry] = []
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        entries.append(_CgroupEntry(tuple(c for c in controllers.split(",") if c), path))
    return entries


def _v1_mount(root: Path, controller: str) -> Path | None:
    """The v1 hierarchy holding `controller`: /sys/fs/cgroup/cpu, .../cpu,cpuacct, ..."""
    exact = root / controller
    if exact.is_dir():
        return exact
    try:
        for child in sorted(root.iterdir()):
            if child.is_dir() and controller in child.name.split(","):
                return child
    except OSError:
        pass
    return None


def _cgroup_dirs(controller: str, root: Path, self_cgroup: Path) -> Iterator[tuple[Path, bool]]:
    """This process's cgroup directory for `controller` and every ancestor up to the mount.

    Yields (directory, is_v1). Limits of ancestors apply too, so callers take the minimum. Inside a
    container without a cgroup namespace, /proc/self/cgroup names a host path that does not exist
    under the container's mount: the mount itself is then the container's cgroup.
    """
    entries = _self_cgroups(self_cgroup)
    mount: Path | None = None
    rel = "/"
    is_v1 = False
    for entry in entries:
        if controller in entry.controllers:
            mount, rel, is_v1 = _v1_mount(root, controller), entry.path, True
            break
    else:
        for entry in entries:
            if not entry.controllers:
                # Unified hierarchy: /sys/fs/cgroup itself, or /sys/fs/cgroup/unified on hybrid hosts.
                mount = root if (root / "cgroup.controllers").exists() else root / "unified"
                rel = entry.path
                break
    if mount is None or not mount.is_dir():
        return
    start = mount / rel.strip("/") if rel.strip("/") else mount
    if not start.is_dir():
        start = mount
    current = start
    while True:
        yield current, is_v1
        if current == mount or mount not in current.parents:
            return
        current = current.parent


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs the cgroup CPU quota allows (quota / period, e.g. 2.5), or None when unlimited/unknown."""
    limits: list[float] = []
    for directory, is_v1 in _cgroup_dirs("cpu", root, self_cgroup):
        if is_v1:
            quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
        else:
            text = _read(directory / "cpu.max")
            quota, _, period = (text or "").partition(" ")
            period = period or "100000"
        try:
            q, p = int(quota or "x"), int(period or "x")
        except ValueError:
            continue  # "max", -1 or no file: no limit at this level
        if q > 0 and p > 0:
            limits.append(q / p)
    return min(limits) if limits else None


def cgroup_memory_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> int | None:
    """The cgroup memory limit in bytes (memory.max / memory.limit_in_bytes), or None when unlimited."""
    limits: list[int] = []
    for directory, is_v1 in _cgroup_dirs("memory", root, self_cgroup):
        text = _read(directory / ("memory.limit_in_bytes" if is_v1 else "memory.max"))
        try:
            value = int(text or "x")
        except ValueError:
            continue  # "max" or no file
        if 0 < value < _V1_UNLIMITED:
            limits.append(value)
    return min(limits) if limits else None


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
    total = _meminfo_total(meminfo)
    limit = cgroup_memory_limit(root, self_cgroup)
    return min(total, limit) if limit is not None else total


def _meminfo_total(meminfo: Path) -> int:
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

    def collect(self, ctx: InventoryContext | None = None) -> NodeInventory:
        return NodeInventory(
            cpus_total=self._cpus,
            memory_total_bytes=self._memory_bytes,
            labels=self._labels,
            hostname=self._hostname,
            source="none",
        )
