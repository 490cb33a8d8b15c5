"""Host facts: usable CPUs and memory respect cgroup limits (v2, v1, hybrid) and the affinity mask.

Every test builds a fake /sys/fs/cgroup and /proc/self/cgroup in a tmp dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpulease.agent.inventory.host import HostOnlyInventory, total_memory_bytes, usable_cpus
from gpulease.agent.linux import cgroup_cpu_limit, cgroup_memory_limit

GiB = 2**30
AFFINITY = len(os.sched_getaffinity(0))


class Host:
    """A fake cgroup tree (root) and /proc/self/cgroup (self_cgroup) and /proc/meminfo."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "sys/fs/cgroup"
        self.root.mkdir(parents=True)
        self.self_cgroup = tmp / "proc/self/cgroup"
        self.self_cgroup.parent.mkdir(parents=True)
        self.meminfo = tmp / "proc/meminfo"
        self.meminfo.write_text("MemTotal:       67108864 kB\nMemFree:         1024 kB\n")  # 64 GiB

    def cgroup(self, text: str) -> None:
        self.self_cgroup.write_text(text)

    def file(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    def cpus(self) -> float | None:
        return cgroup_cpu_limit(self.root, self.self_cgroup)

    def memory(self) -> int | None:
        return cgroup_memory_limit(self.root, self.self_cgroup)

    def usable(self) -> int:
        return usable_cpus(self.root, self.self_cgroup)

    def total_memory(self) -> int:
        return total_memory_bytes(self.meminfo, self.root, self.self_cgroup)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def v2(host: Host, path: str = "/system.slice/agent.service") -> None:
    host.cgroup(f"0::{path}\n")
    host.file("cgroup.controllers", "cpuset cpu io memory pids")


def test_v2_quota_and_memory_max(host: Host) -> None:
    v2(host)
    host.file("system.slice/agent.service/cpu.max", "250000 100000")
    host.file("system.slice/agent.service/memory.max", str(8 * GiB))
    assert host.cpus() == 2.5
    assert host.memory() == 8 * GiB
    assert host.usable() == min(AFFINITY, 2)  # whole CPUs: 2.5 rounds down
    assert host.total_memory() == 8 * GiB


def test_v2_unlimited(host: Host) -> None:
    v2(host)
    host.file("system.slice/agent.service/cpu.max", "max 100000")
    host.file("system.slice/agent.service/memory.max", "max")
    assert host.cpus() is None and host.memory() is None
    assert host.usable() == AFFINITY
    assert host.total_memory() == 64 * GiB


def test_v2_an_ancestor_limit_applies(host: Host) -> None:
    v2(host)
    host.file("system.slice/cpu.max", "100000 100000")
    host.file("system.slice/memory.max", str(4 * GiB))
    host.file("system.slice/agent.service/cpu.max", "max 100000")
    host.file("system.slice/agent.service/memory.max", str(16 * GiB))
    assert host.cpus() == 1.0
    assert host.memory() == 4 * GiB
    assert host.usable() == 1


def test_v2_in_a_container_with_a_cgroup_namespace(host: Host) -> None:
    v2(host, "/")
    host.file("cpu.max", "50000 100000")  # half a CPU
    host.file("memory.max", str(512 * 2**20))
    assert host.cpus() == 0.5
    assert host.usable() == 1  # never below one CPU
    assert host.total_memory() == 512 * 2**20


def test_v2_host_path_missing_in_the_container_means_the_mount_itself(host: Host) -> None:
    # No cgroup namespace: /proc/self/cgroup names a host path that the container cannot see.
    v2(host, "/kubepods/burstable/pod1234/abcdef")
    host.file("cpu.max", "300000 100000")
    assert host.cpus() == 3.0


def test_v1_cfs_quota_and_memory_limit(host: Host) -> None:
    host.cgroup(
        "12:memory:/docker/abc\n"
        "4:cpu,cpuacct:/docker/abc\n"
        "3:cpuset:/docker/abc\n"
        "1:name=systemd:/docker/abc\n"
        "0::/docker/abc\n"
    )
    host.file("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "150000")
    host.file("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000")
    host.file("memory/docker/abc/memory.limit_in_bytes", str(2 * GiB))
    assert host.cpus() == 1.5
    assert host.memory() == 2 * GiB
    assert host.usable() == 1
    assert host.total_memory() == 2 * GiB


def test_v1_unlimited_values(host: Host) -> None:
    host.cgroup("4:cpu,cpuacct:/\n2:memory:/user.slice\n")
    host.file("cpu/cpu.cfs_quota_us", "-1")
    host.file("cpu/cpu.cfs_period_us", "100000")
    host.file("memory/user.slice/memory.limit_in_bytes", "9223372036854771712")
    assert host.cpus() is None
    assert host.memory() is None
    assert host.total_memory() == 64 * GiB


def test_hybrid_host_uses_the_v1_controllers(host: Host) -> None:
    # systemd's hybrid layout: v1 controllers, plus an empty unified hierarchy at /sys/fs/cgroup/unified.
    host.cgroup("5:cpu,cpuacct:/app\n4:memory:/app\n0::/app\n")
    host.file("unified/cgroup.controllers", "")
    host.file("cpu,cpuacct/app/cpu.cfs_quota_us", "400000")
    host.file("cpu,cpuacct/app/cpu.cfs_period_us", "100000")
    host.file("memory/app/memory.limit_in_bytes", str(3 * GiB))
    assert host.cpus() == 4.0 and host.memory() == 3 * GiB


def test_a_quota_above_the_affinity_mask_changes_nothing(host: Host) -> None:
    v2(host, "/")
    host.file("cpu.max", f"{(AFFINITY + 8) * 100000} 100000")
    assert host.usable() == AFFINITY


def test_no_cgroup_information_at_all(host: Host) -> None:
    # No /proc/self/cgroup (or an unreadable one): only the affinity mask and MemTotal count.
    assert host.cpus() is None and host.memory() is None
    assert host.usable() == AFFINITY
    assert host.total_memory() == 64 * GiB


def test_garbage_is_ignored(host: Host) -> None:
    v2(host, "/")
    host.file("cpu.max", "lots")
    host.file("memory.max", "")
    host.cgroup("0::/\nnot a cgroup line\n")
    assert host.cpus() is None and host.memory() is None


def test_meminfo_without_memtotal_falls_back_to_sysconf(host: Host) -> None:
    host.meminfo.write_text("MemFree: 1 kB\n")
    assert host.total_memory() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_host_only_inventory_uses_the_real_host() -> None:
    inv = HostOnlyInventory(labels={"zone": "a"}).collect()
    assert inv.source == "none" and len(inv.gpus) == 0
    assert 1 <= inv.cpus_total <= AFFINITY
    assert 0 < inv.memory_total_bytes <= total_memory_bytes()
    assert dict(inv.labels) == {"zone": "a"} and inv.hostname
