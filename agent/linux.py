"""What the Linux kernel says about processes, cgroups and CPUs, read and parsed in one place.

The agent reads kernel text files for three jobs: what a node may offer (the cgroup CPU quota
and memory limit, MemTotal), which host PIDs belong to a container (its process tree and its
cgroup), and whether a GPU process descends from one of them (the parent PID in
/proc/<pid>/stat). Each format has one parser here, because copies drift: the command name in
/proc/<pid>/stat may hold spaces and ')', and a cgroup line's path may hold ':'.

Parsers take text and raise ValueError when it is malformed. Readers take their roots as
parameters (tests point them at a tree they build) and answer None, or an empty set, where the
kernel does not say: a process that exits while it is read is normal, not an error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PROC_ROOT = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = PROC_ROOT / "self" / "cgroup"
MEMINFO = PROC_ROOT / "meminfo"
# cgroup v1 writes "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX * page size).
_V1_UNLIMITED = 2**62
# The kernel caps CPU numbers far below this; a larger one means the text is not a cpulist.
_MAX_CPU = 1 << 16


def read_kernel_file(path: Path) -> str | None:
    """A /proc, /sys or cgroup file's text, stripped; None when it cannot be read.

    Such files vanish with their process or device, and some are unreadable without privileges:
    callers treat all of that as "the kernel does not say".
    """
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


# -- cpulists ------------------------------------------------------------------------------


def parse_cpulist(text: str) -> set[int]:
    """Linux cpulist ("0-3,8,10-11") -> {0, 1, 2, 3, 8, 10, 11}. ValueError if malformed or empty."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        first, last = int(low), int(high) if sep else int(low)
        if first < 0 or last < first or last > _MAX_CPU:
            raise ValueError(f"bad cpulist range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError("empty cpulist")
    return cpus


def format_cpulist(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 3, 8} -> "0-3,8": runs of consecutive CPUs as ranges, in order; "" for none."""
    ranges: list[str] = []
    start = prev = None
    for cpu in sorted(set(cpus)):
        if prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            ranges.append(f"{start}-{prev}" if start != prev else f"{start}")
        start = prev = cpu
    if start is not None:
        ranges.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(ranges)


# -- processes -----------------------------------------------------------------------------


def parse_stat_ppid(stat: str) -> int:
    """The parent PID (field 4) of a /proc/<pid>/stat line. ValueError if malformed.

    "pid (comm) state ppid ...": comm is the command name as the process set it, so it may hold
    spaces and parentheses. Only the last ')' ends it; split after that one.
    """
    head, paren, rest = stat.rpartition(")")
    if not paren or "(" not in head:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    fields = rest.split()
    if len(fields) < 2:
        raise ValueError(f"no parent PID in /proc/<pid>/stat line: {stat[:80]!r}")
    return int(fields[1])


def parent_pid(pid: int, proc: Path = PROC_ROOT) -> int | None:
    """pid's parent PID, or None when the process is gone or its stat unreadable."""
    text = read_kernel_file(proc / str(pid) / "stat")
    if not text:
        return None
    try:
        return parse_stat_ppid(text)
    except ValueError:
        return None


def process_tree(root: int, proc: Path = PROC_ROOT) -> set[int]:
    """root and all its descendants: /proc/<pid>/task/*/children when the kernel has it, else PPids."""
    if not (proc / str(root)).exists():
        return set()
    task_files = any((proc / str(root) / "task").glob("*/children"))
    # Without CONFIG_PROC_CHILDREN, every process's stat is read, once, up front.
    by_parent = {} if task_files else _children_from_stat(proc)
    found = {root}
    todo = [root]
    while todo:
        pid = todo.pop()
        for child in _children_from_task_files(pid, proc) if task_files else by_parent.get(pid, []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _children_from_task_files(pid: int, proc: Path) -> list[int]:
    """pid's children, from the children file of each of its threads (CONFIG_PROC_CHILDREN)."""
    kids: list[int] = []
    for f in (proc / str(pid) / "task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            kids += [int(k) for k in f.read_text().split()]
    return kids


def _children_from_stat(proc: Path) -> dict[int, list[int]]:
    """Parent -> children from every process's stat: the slow way, for kernels without children files."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = parse_stat_ppid((entry / "stat").read_text())
        except (OSError, ValueError):
            continue  # exited meanwhile, or not a process
        children.setdefault(ppid, []).append(int(entry.name))
    return children


# -- cgroups -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupEntry:
    """One line of /proc/<pid>/cgroup: "hierarchy-ID:controller-list:cgroup-path"."""

    controllers: tuple[str, ...]  # () for the cgroup v2 line "0::/path"
    path: str


def parse_cgroup_file(text: str) -> list[CgroupEntry]:
    """The lines of a /proc/<pid>/cgroup file; lines without two ':' are skipped.

    The path is the rest of the line after the second ':', so a path holding ':' stays whole.
    v1 named hierarchies ("1:name=systemd:/...") keep their "name=..." as the controller.
    """
    entries: list[CgroupEntry] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        entries.append(CgroupEntry(tuple(c for c in controllers.split(",") if c), path))
    return entries


def cgroup_pids(pid: int, proc: Path = PROC_ROOT, cgroup_root: Path = CGROUP_ROOT) -> set[int]:
    """Every PID in pid's cgroup (catches `docker exec` processes, which are not descendants of init).

    Best effort: empty when the cgroup is not visible from here (e.g. another cgroup namespace).
    """
    text = read_kernel_file(proc / str(pid) / "cgroup")
    if text is None:
        return set()
    candidates: list[Path] = []
    for entry in parse_cgroup_file(text):
        rel = entry.path.lstrip("/")
        if not rel:
            continue  # the root cgroup: everything on the host, not the container
        if not entry.controllers:
            candidates += [cgroup_root / rel, cgroup_root / "unified" / rel]
        elif "pids" in entry.controllers or "memory" in entry.controllers:
            candidates.append(cgroup_root / ",".join(entry.controllers) / rel)
    for directory in candidates:
        procs_file = directory / "cgroup.procs"
        try:
            found = {int(p) for p in procs_file.read_text().split()}
        except (OSError, ValueError):
            continue
        if pid in found:
            return found
    return set()


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
    entries = parse_cgroup_file(read_kernel_file(self_cgroup) or "")
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
            quota = read_kernel_file(directory / "cpu.cfs_quota_us")
            period = read_kernel_file(directory / "cpu.cfs_period_us")
        else:
            text = read_kernel_file(directory / "cpu.max")
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
        text = read_kernel_file(directory / ("memory.limit_in_bytes" if is_v1 else "memory.max"))
        try:
            value = int(text or "x")
        except ValueError:
            continue  # "max" or no file
        if 0 < value < _V1_UNLIMITED:
            limits.append(value)
    return min(limits) if limits else None


# -- memory --------------------------------------------------------------------------------


def parse_meminfo_total(text: str) -> int:
    """MemTotal of a /proc/meminfo text, in bytes. ValueError when it has no MemTotal line."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            # "MemTotal:       65794388 kB": the kernel's kB are KiB.
            fields = line.split()
            if len(fields) < 2:
                break
            return int(fields[1]) * 1024
    raise ValueError("no MemTotal line in /proc/meminfo")


def memtotal_bytes(meminfo: Path = MEMINFO) -> int:
    """MemTotal from /proc/meminfo; the page count times the page size where procfs is absent."""
    try:
        return parse_meminfo_total(meminfo.read_text())
    except (OSError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
