"""agent/linux.py: the kernel's text formats, parsed from text written here.

Each parser gets a table of lines as the kernel writes them, including the awkward ones (a
command name with spaces and parentheses, a cgroup path with ':'), and of malformed text it must
refuse. The readers run on a /proc and /sys/fs/cgroup tree built in a tmp dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpulease.agent.linux import (
    CgroupEntry,
    cgroup_pids,
    format_cpulist,
    memtotal_bytes,
    parent_pid,
    parse_cgroup_file,
    parse_cpulist,
    parse_meminfo_total,
    parse_stat_ppid,
    process_tree,
    read_kernel_file,
)

# -- cpulists --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3,8,10-11", {0, 1, 2, 3, 8, 10, 11}),
        ("0", {0}),
        ("7-7", {7}),
        ("0-1\n", {0, 1}),  # as read from sysfs, with its newline
        (" 2 , 4-5 ", {2, 4, 5}),
        ("1,,3", {1, 3}),  # an empty part is skipped, not an error
        ("0-3,2-5", {0, 1, 2, 3, 4, 5}),  # overlapping ranges
        ("65536", {65536}),  # the largest CPU number accepted
    ],
)
def test_parse_cpulist(text: str, cpus: set[int]) -> None:
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize(
    "text",
    ["", "\n", ",", "3-1", "-1", "a", "0-x", "1-2-3", "0-65537", "0x3"],
)
def test_parse_cpulist_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)


@pytest.mark.parametrize(
    ("cpus", "text"),
    [
        ({0, 1, 2, 3, 8, 10, 11}, "0-3,8,10-11"),
        (set(), ""),
        ({5}, "5"),
        ([3, 1, 2], "1-3"),  # any order
        ([0, 0, 1, 1], "0-1"),  # repeats
        ({0, 2, 4}, "0,2,4"),
        ({*range(0, 16), *range(64, 80)}, "0-15,64-79"),
    ],
)
def test_format_cpulist(cpus: set[int] | list[int], text: str) -> None:
    assert format_cpulist(cpus) == text


@pytest.mark.parametrize("cpus", [{0}, {1, 2, 3}, {0, 2, 3, 5, 6, 7, 100}, set(range(0, 192, 3))])
def test_cpulist_round_trip(cpus: set[int]) -> None:
    assert parse_cpulist(format_cpulist(cpus)) == cpus


# -- /proc/<pid>/stat ------------------------------------------------------------------------

STAT_TAIL = "8 8 0 -1 4194560 1279 0 0 0 3 1 0 0 20 0 1 0 1234567 10264576 873 18446744073709551615"


@pytest.mark.parametrize(
    ("line", "ppid"),
    [
        (f"1234 (bash) S 1 {STAT_TAIL}", 1),
        (f"1 (systemd) S 0 {STAT_TAIL}", 0),
        (f"4321 (tmux: server) S 977 {STAT_TAIL}", 977),  # spaces in comm
        (f"555 ((sd-pam)) S 554 {STAT_TAIL}", 554),  # parentheses in comm
        (f"666 (a) 7 (b) R 42 {STAT_TAIL}", 42),  # ") 7 (" in comm: only the last ')' ends it
        (f"777 () S 3 {STAT_TAIL}", 3),  # empty comm
        ("888 (kworker/0:1H-kblockd) I 2", 2),  # no fields after ppid
        (f"999 (x) Z 12 {STAT_TAIL}\n", 12),  # a zombie, with the file's newline
    ],
)
def test_parse_stat_ppid(line: str, ppid: int) -> None:
    assert parse_stat_ppid(line) == ppid


@pytest.mark.parametrize(
    "line",
    [
        "",
        "1234 bash S 1",  # no parentheses
        "1234 (bash) S",  # no ppid
        "1234 (bash)",
        "1234 (bash) S x 5",  # ppid not a number
        "1234 bash) S 1",  # no opening parenthesis
    ],
)
def test_parse_stat_ppid_refuses_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError):
        parse_stat_ppid(line)


class Proc:
    """A fake /proc: processes with a stat line, and task/<tid>/children files where asked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "self").mkdir()  # not a process: a name that is not a number is skipped

    def process(self, pid: int, ppid: int, comm: str = "sh", children: list[int] | None = None) -> None:
        directory = self.root / str(pid)
        directory.mkdir()
        (directory / "stat").write_text(f"{pid} ({comm}) S {ppid} {STAT_TAIL}\n")
        if children is not None:
            task = directory / "task" / str(pid)
            task.mkdir(parents=True)
            (task / "children").write_text("".join(f"{c} " for c in children))


def test_parent_pid_reads_stat(tmp_path: Path) -> None:
    proc = Proc(tmp_path / "proc")
    proc.process(10, 1, comm="python3 my (odd) script")
    (proc.root / "11").mkdir()
    (proc.root / "11" / "stat").write_text("garbage\n")
    (proc.root / "12").mkdir()
    (proc.root / "12" / "stat").write_text("")
    assert parent_pid(10, proc.root) == 1
    assert parent_pid(11, proc.root) is None  # malformed
    assert parent_pid(12, proc.root) is None  # empty
    assert parent_pid(13, proc.root) is None  # gone


def test_process_tree_from_stat_lines(tmp_path: Path) -> None:
    # No task/*/children files (a kernel without CONFIG_PROC_CHILDREN): parents come from stat.
    proc = Proc(tmp_path / "proc")
    proc.process(1, 0, comm="init")
    proc.process(100, 1, comm="containerd-shim")
    proc.process(101, 100, comm="my job (rank 0)")
    proc.process(102, 101, comm="worker) 1 (x")  # a comm that would fool a split on the first ')'
    proc.process(103, 100)
    proc.process(200, 1)  # not in the tree
    (proc.root / "300").mkdir()  # exited between listing and reading: no stat
    assert process_tree(100, proc.root) == {100, 101, 102, 103}
    assert process_tree(102, proc.root) == {102}
    assert process_tree(999, proc.root) == set()


def test_process_tree_from_children_files(tmp_path: Path) -> None:
    # With task/*/children the stat lines are not read: here they would name other parents.
    proc = Proc(tmp_path / "proc")
    proc.process(100, 1, children=[101, 103])
    proc.process(101, 7, children=[102])
    proc.process(102, 7, children=[])
    proc.process(103, 7, children=[])
    proc.process(104, 100, children=[])  # its stat says child of 100, the children files do not
    assert process_tree(100, proc.root) == {100, 101, 102, 103}


# -- /proc/<pid>/cgroup ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "entries"),
    [
        ("0::/system.slice/docker-abc.scope\n", [CgroupEntry((), "/system.slice/docker-abc.scope")]),
        ("0::/\n", [CgroupEntry((), "/")]),
        (
            "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n",
            [
                CgroupEntry(("pids",), "/docker/abc"),
                CgroupEntry(("cpu", "cpuacct"), "/docker/abc"),
                CgroupEntry(("name=systemd",), "/docker/abc"),
                CgroupEntry((), "/docker/abc"),
            ],
        ),
        ("0::/a:b:c\n", [CgroupEntry((), "/a:b:c")]),  # ':' in the path stays in the path
        ("0::/with space\n", [CgroupEntry((), "/with space")]),
        ("garbage\n3:cpu\n\n0::/ok\n", [CgroupEntry((), "/ok")]),  # lines without two ':' are skipped
        ("", []),
    ],
)
def test_parse_cgroup_file(text: str, entries: list[CgroupEntry]) -> None:
    assert parse_cgroup_file(text) == entries


class Cgroups:
    """A fake /proc/<pid>/cgroup and /sys/fs/cgroup tree with cgroup.procs files."""

    def __init__(self, tmp: Path) -> None:
        self.proc = tmp / "proc"
        self.root = tmp / "sys/fs/cgroup"
        self.root.mkdir(parents=True)

    def member(self, pid: int, cgroup_file: str) -> None:
        (self.proc / str(pid)).mkdir(parents=True)
        (self.proc / str(pid) / "cgroup").write_text(cgroup_file)

    def procs(self, rel: str, pids: list[int]) -> None:
        directory = self.root / rel
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))


def test_cgroup_pids_v2(tmp_path: Path) -> None:
    c = Cgroups(tmp_path)
    c.member(500, "0::/system.slice/docker-abc.scope\n")
    c.procs("system.slice/docker-abc.scope", [500, 501, 777])  # 777: a `docker exec` process
    assert cgroup_pids(500, c.proc, c.root) == {500, 501, 777}


def test_cgroup_pids_v2_on_a_hybrid_host(tmp_path: Path) -> None:
    c = Cgroups(tmp_path)
    c.member(500, "1:name=systemd:/docker/abc\n0::/docker/abc\n")
    c.procs("unified/docker/abc", [500, 502])
    assert cgroup_pids(500, c.proc, c.root) == {500, 502}


def test_cgroup_pids_v1_pids_or_memory_controller(tmp_path: Path) -> None:
    c = Cgroups(tmp_path)
    c.member(500, "7:cpu,cpuacct:/docker/abc\n5:memory:/docker/abc\n1:name=systemd:/docker/abc\n")
    c.procs("cpu,cpuacct/docker/abc", [1, 2, 3])  # not a controller it looks at
    c.procs("memory/docker/abc", [500, 503])
    assert cgroup_pids(500, c.proc, c.root) == {500, 503}


def test_cgroup_pids_is_empty_when_the_cgroup_says_nothing(tmp_path: Path) -> None:
    c = Cgroups(tmp_path)
    c.member(600, "0::/\n")  # the root cgroup would be every process on the host
    c.procs("", [1, 600, 601])
    c.member(601, "0::/elsewhere\n")
    c.procs("elsewhere", [1, 2])  # a cgroup.procs without the pid: not its cgroup (another namespace)
    c.member(602, "0::/not-mounted-here\n")
    assert cgroup_pids(600, c.proc, c.root) == set()
    assert cgroup_pids(601, c.proc, c.root) == set()
    assert cgroup_pids(602, c.proc, c.root) == set()
    assert cgroup_pids(603, c.proc, c.root) == set()  # no such process


# -- /proc/meminfo and reading -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "total"),
    [
        ("MemTotal:       65794388 kB\nMemFree:         1024 kB\n", 65794388 * 1024),
        ("MemFree:         1024 kB\nMemTotal: 16 kB\n", 16 * 1024),  # not the first line
    ],
)
def test_parse_meminfo_total(text: str, total: int) -> None:
    assert parse_meminfo_total(text) == total


@pytest.mark.parametrize("text", ["", "MemFree: 1 kB\n", "MemTotal:\n", "MemTotal: lots kB\n"])
def test_parse_meminfo_total_refuses_text_without_it(text: str) -> None:
    with pytest.raises(ValueError):
        parse_meminfo_total(text)


def test_memtotal_falls_back_to_sysconf(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1 kB\n")
    assert memtotal_bytes(meminfo) == 1024
    meminfo.write_text("nothing useful\n")
    assert memtotal_bytes(meminfo) > 1024  # this machine's memory, from sysconf
    assert memtotal_bytes(tmp_path / "missing") == memtotal_bytes(meminfo)


def test_read_kernel_file(tmp_path: Path) -> None:
    (tmp_path / "cpulist").write_text("0-3\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\n")
    assert read_kernel_file(tmp_path / "cpulist") == "0-3"
    assert read_kernel_file(tmp_path / "binary") is None
    assert read_kernel_file(tmp_path / "missing") is None
    assert read_kernel_file(tmp_path) is None  # a directory
