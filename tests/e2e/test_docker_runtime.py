"""DockerRuntime against a real, private dockerd (tests/support/dockerd.py): GPUs, limits, logs, stop, errors.

No GPU is needed: a stand-in nvidia-container-runtime-hook lets dockerd accept nvidia
DeviceRequests, and the container then sees NVIDIA_VISIBLE_DEVICES. Every container runs with
network "none" and is removed at the end of its test, pass or fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import psutil
import pytest

from gpulease.agent.linux import process_tree
from gpulease.agent.runtime import (
    LABEL_ALLOCATION,
    LABEL_GPUS,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_OWNER,
    LABEL_REVISION,
    LABEL_TENANT,
    ContainerInfo,
    ContainerLaunch,
    Volume,
    default_name,
)
from gpulease.agent.runtime.docker_runtime import DockerRuntime, container_info, unix_ms
from gpulease.errors import ContainerNotFound, ImageUnavailable, InvalidRequest, Unavailable
from tests.support.dockerd import Dockerd, busybox_image, start_dockerd

# The session fixtures (until conftest imports them for every module).

MiB = 2**20
WAIT_S = 30.0


@pytest.fixture(scope="module")
def runtime(dockerd: Dockerd) -> Iterator[DockerRuntime]:
    rt = DockerRuntime(dockerd.base_url, pull_timeout=60)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def docker_client(dockerd: Dockerd) -> Iterator[Any]:
    client = dockerd.client()
    yield client
    client.close()


@pytest.fixture
def alloc(docker_client: Any) -> Iterator[str]:
    """A fresh allocation id; every container labelled with it is removed afterwards."""
    allocation_id = f"t{uuid.uuid4().hex[:10]}"
    yield allocation_id
    for c in docker_client.api.containers(all=True, filters={"label": f"{LABEL_ALLOCATION}={allocation_id}"}):
        with contextlib.suppress(Exception):
            docker_client.api.remove_container(c["Id"], force=True)


def make_launch(alloc: str, image: str, *command: str, **kw: Any) -> ContainerLaunch:
    fields: dict[str, Any] = {
        "allocation_id": alloc,
        "revision": 42,
        "node": "node-a",
        "gpu_uuids": ("GPU-11111111-aaaa", "GPU-22222222-bbbb"),
        "gpu_indexes": (1, 3),
        "cpus": 1,
        "memory_bytes": 128 * MiB,
        "image": image,
        "command": tuple(command),
        "network": "none",
        "owner": "user:alice",
        "tenant": "ml",
    }
    fields.update(kw)
    return ContainerLaunch(**fields)


def run_to_exit(runtime: DockerRuntime, launch: ContainerLaunch) -> tuple[ContainerInfo, str, str]:
    """Start, wait (bounded) for exit, return (info, stdout, stderr)."""
    info = runtime.start(launch)
    info = runtime.wait(info.id, WAIT_S)
    assert info.state == "exited", info
    out: list[bytes] = []
    err: list[bytes] = []
    for stream, chunk in runtime.logs(info.id, follow=False):
        (out if stream == "stdout" else err).append(chunk)
    return info, b"".join(out).decode(), b"".join(err).decode()


def env_of(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def wait_for(predicate: Any, what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def logs_text(runtime: DockerRuntime, container_id: str) -> str:
    return b"".join(chunk for _, chunk in runtime.logs(container_id, follow=False)).decode()


# --------------------------------------------------------------------------- GPUs


def test_container_sees_exactly_its_gpus_by_uuid(
    runtime: DockerRuntime, busybox: str, alloc: str, dockerd: Dockerd, docker_client: Any
) -> None:
    info, out, _ = run_to_exit(runtime, make_launch(alloc, busybox, "env"))
    env = env_of(out)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-11111111-aaaa,GPU-22222222-bbbb"
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert info.gpu_indexes == (1, 3)
    assert info.exit_code == 0

    attrs = docker_client.api.inspect_container(info.id)
    (request,) = attrs["HostConfig"]["DeviceRequests"]
    assert request["Driver"] == "nvidia"
    assert request["DeviceIDs"] == ["GPU-11111111-aaaa", "GPU-22222222-bbbb"]
    assert request["Capabilities"] == [["gpu"]]
    # dockerd's nvidia driver ran its prestart hook (our stand-in) for this very container.
    hook_calls = [line for line in dockerd.hook_log.read_text().splitlines() if info.id in line]
    assert hook_calls and hook_calls[0].startswith("prestart ")

    labels = attrs["Config"]["Labels"]
    assert labels[LABEL_MANAGED] == "true"
    assert labels[LABEL_ALLOCATION] == alloc
    assert labels[LABEL_REVISION] == "42"
    assert labels[LABEL_NODE] == "node-a"
    assert labels[LABEL_GPUS] == "1,3"
    assert (labels[LABEL_OWNER], labels[LABEL_TENANT]) == ("user:alice", "ml")
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] in ("no", "")
    assert attrs["HostConfig"]["AutoRemove"] is False
    assert info.name.startswith(f"gpulease-{alloc}-")


def test_gpus_by_index_when_uuids_unknown(runtime: DockerRuntime, busybox: str, alloc: str, docker_client: Any) -> None:
    info, out, _ = run_to_exit(runtime, make_launch(alloc, busybox, "env", gpu_uuids=(), gpu_indexes=(0, 2)))
    assert env_of(out)["NVIDIA_VISIBLE_DEVICES"] == "0,2"
    (request,) = docker_client.api.inspect_container(info.id)["HostConfig"]["DeviceRequests"]
    assert request["DeviceIDs"] == ["0", "2"]


def test_no_gpus_means_none_visible(runtime: DockerRuntime, busybox: str, alloc: str, docker_client: Any) -> None:
    info, out, _ = run_to_exit(runtime, make_launch(alloc, busybox, "env", gpu_uuids=(), gpu_indexes=()))
    assert env_of(out)["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert not docker_client.api.inspect_container(info.id)["HostConfig"]["DeviceRequests"]


@pytest.mark.parametrize("key", ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"])
def test_user_gpu_env_is_refused_and_nothing_created(
    runtime: DockerRuntime, busybox: str, alloc: str, docker_client: Any, key: str
) -> None:
    launch = make_launch(alloc, busybox, "env", env={"A": "1", key: "all"})
    with pytest.raises(InvalidRequest, match=f"{key} is set by gpulease from the allocation; remove it"):
        runtime.start(launch)
    assert runtime.list(alloc) == []
    assert docker_client.api.containers(all=True, filters={"label": f"{LABEL_ALLOCATION}={alloc}"}) == []


def test_user_env_reaches_the_container(runtime: DockerRuntime, busybox: str, alloc: str) -> None:
    launch = make_launch(
        alloc, busybox, "sh", "-c", "env; echo PWD=$(pwd)", env={"MY_VAR": "a b=c", "OTHER": ""}, working_dir="/tmp"
    )
    _, out, _ = run_to_exit(runtime, launch)
    env = env_of(out)
    assert env["MY_VAR"] == "a b=c"
    assert env["OTHER"] == ""
    assert env["PWD"] == "/tmp"


# --------------------------------------------------------------------------- limits

CGROUP_SCRIPT = r"""
if [ -f /sys/fs/cgroup/cpu.max ]; then
  echo "v2"
  echo "cpu $(cat /sys/fs/cgroup/cpu.max)"
  echo "mem $(cat /sys/fs/cgroup/memory.max)"
  echo "swap $(cat /sys/fs/cgroup/memory.swap.max 2>/dev/null || echo none)"
  echo "cpuset $(cat /sys/fs/cgroup/cpuset.cpus.effective)"
else
  echo "v1"
  echo "cpu $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
  echo "mem $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
  echo "swap $(cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null || echo none)"
  echo "cpuset $(cat /sys/fs/cgroup/cpuset/cpuset.cpus)"
fi
echo "shm $(df -k /dev/shm | tail -1)"
"""


def test_cgroup_limits_inside_the_container(
    runtime: DockerRuntime, busybox: str, alloc: str, docker_client: Any
) -> None:
    launch = make_launch(
        alloc, busybox, "sh", "-c", CGROUP_SCRIPT, cpus=2, memory_bytes=96 * MiB, cpuset="0", shm_size_bytes=32 * MiB
    )
    info, out, err = run_to_exit(runtime, launch)
    assert info.exit_code == 0, err
    lines = out.splitlines()
    values = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines[1:]}
    if lines[0] == "v2":
        assert values["cpu"] == "200000 100000"
        assert values["mem"] == str(96 * MiB)
        assert values["swap"] in ("0", "none")  # memory+swap == memory: no swap on top
    else:
        assert values["cpu"] == "200000 100000"
        assert values["mem"] == str(96 * MiB)
        assert values["swap"] in (str(96 * MiB), "none")  # "none": kernel without swap accounting
    assert values["cpuset"] == "0"
    assert values["shm"].split()[1] == str(32 * 1024)  # 1K-blocks

    host = docker_client.api.inspect_container(info.id)["HostConfig"]
    assert host["NanoCpus"] == 2_000_000_000
    assert host["Memory"] == 96 * MiB
    assert host["MemorySwap"] == 96 * MiB
    assert host["CpusetCpus"] == "0"
    assert host["ShmSize"] == 32 * MiB
    assert host["NetworkMode"] == "none"


def test_bind_volumes_read_only_and_read_write(
    runtime: DockerRuntime, busybox: str, alloc: str, tmp_path: Path
) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "in.txt").write_text("hello\n")
    script = "cat /in/in.txt; touch /in/x 2>/dev/null && echo ro-writable; echo written > /out/out.txt"
    launch = make_launch(
        alloc, busybox, "sh", "-c", script,
        volumes=(Volume(str(ro), "/in", read_only=True), Volume(str(rw), "/out")),
    )  # fmt: skip
    info, out, _ = run_to_exit(runtime, launch)
    assert info.exit_code == 0
    assert out == "hello\n"
    assert (rw / "out.txt").read_text() == "written\n"
    assert not (ro / "x").exists()


def test_missing_bind_source_is_invalid(runtime: DockerRuntime, busybox: str, alloc: str, tmp_path: Path) -> None:
    launch = make_launch(alloc, busybox, "true", volumes=(Volume(str(tmp_path / "nope"), "/data"),))
    with pytest.raises(InvalidRequest, match="nope"):
        runtime.start(launch)
    assert runtime.list(alloc) == []


# --------------------------------------------------------------------------- logs / exit codes


def test_logs_in_order_with_stream_attribution(runtime: DockerRuntime, busybox: str, alloc: str) -> None:
    # Every third line to stderr; then three lines far enough apart in time to be ordered across streams.
    script = (
        'i=1; while [ $i -le 200 ]; do if [ $((i % 3)) -eq 0 ]; then echo "line $i" >&2; '
        'else echo "line $i"; fi; i=$((i + 1)); done; '
        "sleep 0.3; echo before; sleep 0.3; echo middle >&2; sleep 0.3; echo after"
    )
    info = runtime.start(make_launch(alloc, busybox, "sh", "-c", script))
    chunks = list(runtime.logs(info.id, follow=True))  # until the container exits
    assert runtime.get(info.id).state == "exited"

    lines: list[tuple[str, str]] = []
    for stream, chunk in chunks:
        lines += [(stream, text) for text in chunk.decode().splitlines()]
    stdout = [text for stream, text in lines if stream == "stdout"]
    stderr = [text for stream, text in lines if stream == "stderr"]
    assert stdout == [f"line {i}" for i in range(1, 201) if i % 3] + ["before", "after"]
    assert stderr == [f"line {i}" for i in range(1, 201) if i % 3 == 0] + ["middle"]
    assert lines[-3:] == [("stdout", "before"), ("stderr", "middle"), ("stdout", "after")]

    # Without follow: the same records, returned at once.
    assert list(runtime.logs(info.id, follow=False)) == chunks


def test_follow_streams_until_exit(runtime: DockerRuntime, busybox: str, alloc: str) -> None:
    script = "for i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done; echo done >&2"
    info = runtime.start(make_launch(alloc, busybox, "sh", "-c", script))
    received: list[tuple[float, str, bytes]] = []
    started = time.monotonic()

    def follow() -> None:
        for stream, chunk in runtime.logs(info.id, follow=True):
            received.append((time.monotonic() - started, stream, chunk))

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    t.join(WAIT_S)
    assert not t.is_alive(), "follow did not end when the container exited"
    assert [(s, c) for _, s, c in received] == [("stdout", f"tick {i}\n".encode()) for i in range(1, 6)] + [
        ("stderr", b"done\n")
    ]
    # Streamed as written, not all at the end.
    assert received[-1][0] - received[0][0] > 0.8
    assert runtime.get(info.id).state == "exited"


def test_exit_code_and_times(runtime: DockerRuntime, busybox: str, alloc: str) -> None:
    before = int(time.time() * 1000)
    info, _, _ = run_to_exit(runtime, make_launch(alloc, busybox, "sh", "-c", "exit 7"))
    assert info.state == "exited"
    assert info.exit_code == 7
    assert info.pid == 0
    assert before - 2000 <= info.started_unix_ms <= info.finished_unix_ms <= int(time.time() * 1000) + 2000
    assert info.restart_count == 0


def test_remove_deletes_an_exited_container(
    runtime: DockerRuntime, busybox: str, alloc: str, docker_client: Any
) -> None:
    info, _, _ = run_to_exit(runtime, make_launch(alloc, busybox, "sh", "-c", "exit 0"))
    runtime.remove(info.id)
    with pytest.raises(ContainerNotFound):
        runtime.get(info.id)
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(info.id)
    runtime.remove(info.id)  # already gone: a no-op
    assert runtime.list(alloc) == []


def test_command_not_found_is_invalid_and_leaves_nothing(runtime: DockerRuntime, busybox: str, alloc: str) -> None:
    with pytest.raises(InvalidRequest, match="no-such-command"):
        runtime.start(make_launch(alloc, busybox, "no-such-command"))
    assert runtime.list(alloc) == []


def test_wait_times_out_with_current_status(runtime: DockerRuntime, busybox: str, alloc: str) -> None:
    info = runtime.start(make_launch(alloc, busybox, "sleep", "60"))
    t0 = time.monotonic()
    waited = runtime.wait(info.id, 0.5)
    assert 0.4 <= time.monotonic() - t0 < 5
    assert waited.state == "running"
    assert waited.exit_code is None
    assert waited.pid > 0
    # The runtime's connection still works after the timed-out request.
    assert runtime.get(info.id).state == "running"


# --------------------------------------------------------------------------- stop


def test_stop_lets_a_term_trapping_container_exit_by_itself(runtime: DockerRuntime, busybox: str, alloc: str) -> None:
    script = 'trap "echo got-term; exit 3" TERM; echo ready; while :; do sleep 0.1; done'
    info = runtime.start(make_launch(alloc, busybox, "sh", "-c", script))
    wait_for(lambda: "ready" in logs_text(runtime, info.id), "the trap to be installed")
    t0 = time.monotonic()
    stopped = runtime.stop(info.id, grace_seconds=20)
    assert time.monotonic() - t0 < 5
    assert stopped.state == "exited"
    assert stopped.exit_code == 3
    assert "got-term" in logs_text(runtime, info.id)


def test_stop_kills_a_container_ignoring_term_after_the_grace(runtime: DockerRuntime, busybox: str, alloc: str) -> None:
    script = 'trap "" TERM; echo ready; while :; do sleep 0.1; done'
    info = runtime.start(make_launch(alloc, busybox, "sh", "-c", script))
    wait_for(lambda: "ready" in logs_text(runtime, info.id), "the trap to be installed")
    t0 = time.monotonic()
    stopped = runtime.stop(info.id, grace_seconds=2)
    elapsed = time.monotonic() - t0
    assert 1.8 <= elapsed < 10, elapsed
    assert stopped.state == "exited"
    assert stopped.exit_code == 137  # SIGKILL

    # Idempotent: stopping again changes nothing and does not wait.
    t0 = time.monotonic()
    again = runtime.stop(info.id, grace_seconds=30)
    assert time.monotonic() - t0 < 2
    assert again.exit_code == 137
    assert again.finished_unix_ms == stopped.finished_unix_ms


# --------------------------------------------------------------------------- images


def test_missing_image_that_cannot_be_pulled(runtime: DockerRuntime, alloc: str, caplog: Any) -> None:
    image = "gpulease-test/does-not-exist:1"
    caplog.set_level(logging.INFO, logger="gpulease.agent.runtime.docker_runtime")
    t0 = time.monotonic()
    with pytest.raises(ImageUnavailable) as e:
        runtime.start(make_launch(alloc, image, "true"))
    assert time.monotonic() - t0 < 60
    assert image in str(e.value)
    assert "could not be pulled" in str(e.value)
    assert f"pulling image {image}" in caplog.text
    assert runtime.list(alloc) == []
    # The caller is told in generic words; what the registry (or the network) said is in the log only.
    (failure,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"pull of image {image} failed")]
    cause = failure.split(" failed: ", 1)[1]
    assert cause and cause not in str(e.value)
    assert str(e.value) == (
        f"image {image!r} is not on this node and could not be pulled (the agent's log on this node says why)"
    )


@pytest.mark.parametrize("image", ["Bad/Name", "busybox::latest", "bad image", "UPPER:1", ""])
def test_malformed_image_reference_is_invalid(runtime: DockerRuntime, alloc: str, image: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid image reference"):
        runtime.start(make_launch(alloc, image, "true"))
    assert runtime.list(alloc) == []


# --------------------------------------------------------------------------- get / list / pids


def test_list_by_allocation_and_get(runtime: DockerRuntime, busybox: str, alloc: str, docker_client: Any) -> None:
    other = f"{alloc}-other"
    try:
        a1 = runtime.start(make_launch(alloc, busybox, "sleep", "60"))
        a2 = runtime.start(make_launch(alloc, busybox, "true", revision=43))
        b1 = runtime.start(make_launch(other, busybox, "true"))
        runtime.wait(a2.id, WAIT_S)

        mine = runtime.list(alloc)
        assert {c.id for c in mine} == {a1.id, a2.id}
        assert {c.revision for c in mine} == {42, 43}
        assert {c.id for c in runtime.list()} >= {a1.id, a2.id, b1.id}
        assert [c.id for c in runtime.list(other)] == [b1.id]

        got = runtime.get(a1.id)
        assert got.state == "running" and got.allocation_id == alloc and got.pid > 0
        assert runtime.get(got.name).id == a1.id  # by name too
        assert runtime.get(a2.id).state == "exited"
    finally:
        for c in docker_client.api.containers(all=True, filters={"label": f"{LABEL_ALLOCATION}={other}"}):
            docker_client.api.remove_container(c["Id"], force=True)


def test_unmanaged_and_missing_containers_are_not_found(
    runtime: DockerRuntime, busybox: str, docker_client: Any
) -> None:
    name = f"unmanaged-{uuid.uuid4().hex[:8]}"
    host_config = docker_client.api.create_host_config(network_mode="none")
    created = docker_client.api.create_container(busybox, command=["sleep", "60"], name=name, host_config=host_config)
    try:
        docker_client.api.start(created["Id"])
        for ident in (created["Id"], name):
            with pytest.raises(ContainerNotFound):
                runtime.get(ident)
            with pytest.raises(ContainerNotFound):
                runtime.stop(ident, 1)
            with pytest.raises(ContainerNotFound):
                runtime.logs(ident, follow=False)
            with pytest.raises(ContainerNotFound):
                runtime.pids(ident)
            runtime.remove(ident)  # not gpulease's: left alone
        assert created["Id"] not in {c.id for c in runtime.list()}
        assert docker_client.api.inspect_container(created["Id"])["State"]["Running"]  # untouched
    finally:
        docker_client.api.remove_container(created["Id"], force=True)
    for missing in ("no-such-container", "0123456789ab", ""):
        with pytest.raises(ContainerNotFound):
            runtime.get(missing)
        with pytest.raises(ContainerNotFound):
            runtime.wait(missing, 1)


def test_pids_are_the_container_processes(runtime: DockerRuntime, busybox: str, alloc: str) -> None:
    info = runtime.start(make_launch(alloc, busybox, "sh", "-c", "sleep 300 & sleep 301 & wait"))
    assert info.pid > 0

    def three_or_more() -> frozenset[int] | None:
        found = runtime.pids(info.id)
        return found if len(found) >= 3 else None

    pids = wait_for(three_or_more, "init and two children")
    assert info.pid in pids
    cmdlines = {pid: psutil.Process(pid).cmdline() for pid in pids}
    assert cmdlines[info.pid][:2] == ["sh", "-c"]
    assert sorted(c for pid, c in cmdlines.items() if pid != info.pid) == [["sleep", "300"], ["sleep", "301"]]
    assert os.getpid() not in pids

    runtime.stop(info.id, grace_seconds=0)
    assert runtime.pids(info.id) == frozenset()


def test_daemon_unreachable_is_unavailable(tmp_path: Path) -> None:
    rt = DockerRuntime(f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(Unavailable, match="is dockerd running"):
        rt.list()
    with pytest.raises(Unavailable):
        rt.get("abc")


# --------------------------------------------------------------------------- harness and pure helpers


def test_harness_stops_dockerd_without_leftovers(busybox: str) -> None:
    del busybox  # only for the skip/fail logic: this test starts its own daemon
    root = Path(f"/tmp/gld-t{uuid.uuid4().hex[:6]}")
    daemon = start_dockerd(root)
    try:
        rt = DockerRuntime(daemon.base_url)
        info = rt.start(make_launch("harness", busybox_image(daemon), "sleep", "300"))
        assert rt.get(info.id).state == "running"
        rt.close()
        tree = {daemon.proc.pid, *(p.pid for p in psutil.Process(daemon.proc.pid).children(recursive=True))}
        tree.add(info.pid)
    finally:
        daemon.stop()
    assert not daemon.proc.alive()
    left = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert left == []
    strays = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(root) in arg for arg in p.info["cmdline"] or ()):
                strays.append(p)
    assert strays == []
    assert str(root) not in Path("/proc/self/mounts").read_text()
    subprocess.run(["rm", "-rf", str(root)], check=False, timeout=60)


def test_unix_ms() -> None:
    assert unix_ms("0001-01-01T00:00:00Z") == 0
    assert unix_ms("") == 0
    assert unix_ms("1970-01-01T00:00:01.234567891Z") == 1234
    assert unix_ms("2024-05-01T12:00:00Z") == 1714564800000
    assert unix_ms("2024-05-01T14:00:00.5+02:00") == 1714564800500


def test_container_info_state_mapping() -> None:
    def attrs(status: str, exit_code: int = 0) -> dict[str, Any]:
        return {
            "Id": "c" * 64,
            "Name": "/n",
            "RestartCount": 2,
            "Config": {"Image": "img", "Labels": {LABEL_ALLOCATION: "a", LABEL_REVISION: "9", LABEL_GPUS: "0,2"}},
            "State": {"Status": status, "Pid": 77, "ExitCode": exit_code, "StartedAt": "2024-05-01T12:00:00Z",
                      "FinishedAt": "2024-05-01T12:00:01Z"},
        }  # fmt: skip

    expect = {"created": "created", "running": "running", "restarting": "running", "paused": "running",
              "exited": "exited", "dead": "exited"}  # fmt: skip
    for status, state in expect.items():
        info = container_info(attrs(status, 5))
        assert info.state == state, status
        assert info.exit_code == (5 if state == "exited" else None)
        assert info.pid == (77 if state == "running" else 0)
        assert info.finished_unix_ms == (1714564801000 if state == "exited" else 0)
    info = container_info(attrs("exited"))
    assert (info.name, info.allocation_id, info.revision, info.gpu_indexes, info.restart_count) == (
        "n", "a", 9, (0, 2), 2,
    )  # fmt: skip
    assert dataclasses.replace(info, image="x").image == "x"


def test_default_name_is_a_valid_docker_name() -> None:
    name = default_name("alloc/with:odd chars")
    assert name.startswith("gpulease-alloc-with-odd-chars-")
    assert all(c.isalnum() or c in "_.-" for c in name)
    assert default_name("x") != default_name("x")


def test_process_tree_finds_descendants() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '30'])"],
        stdin=subprocess.DEVNULL,
    )
    try:
        grandchild = wait_for(lambda: psutil.Process(child.pid).children(), "the grandchild")[0].pid
        tree = process_tree(child.pid)
        assert tree == {child.pid, grandchild}
        assert process_tree(os.getpid()) >= {os.getpid(), child.pid, grandchild}
    finally:
        for p in psutil.Process(child.pid).children(recursive=True):
            p.kill()
        child.kill()
        child.wait(timeout=10)


def test_pull_progress_logs_status_changes_and_throttles_bytes(caplog: Any) -> None:
    from gpulease.agent.runtime.docker_runtime import _PullProgress

    logger = logging.getLogger("test.pull")
    caplog.set_level(logging.INFO, logger="test.pull")
    progress = _PullProgress("img:1", logger)
    progress.update({"status": "Pulling from library/img", "id": "1"})
    progress.update({"status": "Pulling fs layer", "id": "abc"})
    progress.update({"status": "Pulling fs layer", "id": "abc"})  # repeated: not logged again
    for i in range(100):
        progress.update({"status": "Downloading", "id": "abc", "progressDetail": {"current": i}, "progress": f"{i}"})
    progress.update({"status": "Pull complete", "id": "abc"})
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["pull img:1: 1: Pulling from library/img", "pull img:1: abc: Pulling fs layer"]
    assert sum("Downloading" in m for m in messages) == 1  # throttled
    assert messages[-1] == "pull img:1: abc: Pull complete"
