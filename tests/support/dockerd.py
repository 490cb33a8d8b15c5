"""Test harness: a private Docker daemon (and the containerd it starts) plus an offline busybox image.

``start_dockerd(tmp)`` runs Debian's dockerd as root on a unix socket under ``tmp`` with vfs
storage, no bridge and no iptables, so it touches nothing of the host's own Docker (if any).
``start_dockerd(tmp, network=True)`` turns iptables on (bridges whose inter-container traffic is
really dropped, DOCKER-USER): only in a network namespace of the test's own (tests/support/netns.py),
which it checks first, so that the host's firewall is never touched.
A stand-in ``nvidia-container-runtime-hook`` on dockerd's PATH makes dockerd register its
"nvidia" device driver, so DeviceRequests for GPUs work on machines without GPUs: the container
gets NVIDIA_VISIBLE_DEVICES=<ids> and the stand-in records each call in ``Dockerd.hook_log``.

``busybox_image(dockerd)`` imports a one-binary image (Debian's busybox-static plus a symlink per
applet) with ``docker import``: no registry, no network.

Without dockerd, root or a static busybox the fixtures skip, unless GPULEASE_REQUIRE_DOCKER=1,
in which case they fail with the reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpulease.dev import procs
from gpulease.dev.cluster import Child, LocalCluster
from tests.support import netns

DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"
BUSYBOX_IMAGE = "gpulease-test/busybox:latest"
REQUIRE_ENV = "GPULEASE_REQUIRE_DOCKER"
STARTUP_TIMEOUT_S = 60.0
# sun_path is 108 bytes; containerd adds its own names under exec-root.
MAX_SOCKET_PATH = 90

HOOK_SCRIPT = """#!/bin/sh
# Stand-in for NVIDIA's OCI prestart hook: dockerd registers its "nvidia" device driver only when
# this name is on its PATH. Reads the container state from stdin and records the call.
state=$(cat)
printf '%s %s\\n' "$*" "$state" >> '{log}'
exit 0
"""


class DockerUnavailable(RuntimeError):
    """This machine cannot run the private dockerd (not root, no dockerd, no static busybox)."""


@dataclass
class Dockerd:
    root: Path
    socket: Path
    base_url: str
    proc: procs.ManagedProcess
    hook_log: Path
    exec_root: Path = field(repr=False)
    data_root: Path = field(repr=False)

    def add_agent(
        self, cluster: LocalCluster, name: str, gpus: int, *extra: str, network: str = "none", **kw: Any
    ) -> Child:
        """An agent of cluster with simulated GPUs, 4 CPUs and 8 GiB, that runs its containers on
        this daemon (on no network, unless told); kw go to LocalCluster.add_agent."""
        args = ["--docker-host", self.base_url, "--container-network", network, *extra]
        # The host's DOCKER_* (a DOCKER_HOST, TLS settings) must not point it elsewhere.
        env = cluster.child_env(drop=("DOCKER_",))
        return cluster.add_agent(
            name, gpus, cpus=4, memory="8GiB", extra_args=args, env=env, timeout=STARTUP_TIMEOUT_S, **kw
        )

    def client(self, timeout: int = 60) -> Any:
        """A docker.DockerClient on this daemon (typed loosely: docker ships no type hints)."""
        import docker

        return docker.DockerClient(base_url=self.base_url, version="auto", timeout=timeout)

    def stop(self, grace: float = 20.0) -> None:
        """Remove every container, stop dockerd (it stops its containerd), then reap any straggler.

        Stragglers are only processes that are ours: descendants of dockerd, and processes whose
        command line names this daemon's exec-root (containerd shims re-parent themselves).
        """
        ours = self._our_processes()
        if self.proc.alive():
            with contextlib.suppress(Exception):
                _remove_all_containers(self.base_url)
            self.proc.stop(grace=grace)
        ours |= self._our_processes()
        _kill_and_reap(ours, timeout=5.0)
        _unmount_under(self.root)

    def _our_processes(self) -> set[psutil.Process]:
        found: set[psutil.Process] = set()
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.proc.pid)
            if self.proc.alive():
                found.add(parent)
                found.update(parent.children(recursive=True))
        marker = str(self.exec_root)
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(marker in arg for arg in p.info["cmdline"] or ()):
                    found.add(p)
        found.discard(_self_process())
        return found


def _self_process() -> psutil.Process:
    return psutil.Process(os.getpid())


def _kill_and_reap(processes: set[psutil.Process], timeout: float) -> None:
    alive = [p for p in processes if _running(p)]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(alive, timeout=timeout)


def _running(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _unmount_under(root: Path) -> None:
    """Lazily unmount anything dockerd left mounted under root (netns, shm), deepest first."""
    prefix = str(root.resolve()) + "/"
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    targets = []
    for line in lines:
        parts = line.split()
        if len(parts) > 1:
            target = parts[1].replace("\\040", " ")
            if target.startswith(prefix):
                targets.append(target)
    for target in sorted(targets, key=len, reverse=True):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=10, check=False)


def _remove_all_containers(base_url: str) -> None:
    import docker

    client = docker.DockerClient(base_url=base_url, version="auto", timeout=30)
    try:
        for c in client.api.containers(all=True, quiet=True):
            with contextlib.suppress(docker.errors.APIError):
                client.api.remove_container(c["Id"], force=True, v=True)
    finally:
        client.close()


def check_prerequisites() -> None:
    """DockerUnavailable with the reason when this machine cannot run the private dockerd."""
    if os.geteuid() != 0:
        raise DockerUnavailable("dockerd needs root")
    if not os.access(DOCKERD, os.X_OK):
        raise DockerUnavailable(f"no {DOCKERD} (apt-get install docker.io)")
    for tool in ("containerd", "runc"):
        if shutil.which(tool, path=_daemon_path("")) is None:
            raise DockerUnavailable(f"no {tool} on PATH (apt-get install docker.io)")
    try:
        import docker  # noqa: F401
    except ImportError as e:
        raise DockerUnavailable("the docker SDK is not installed (pip install 'gpulease[agent]')") from e


def _daemon_path(bin_dir: str) -> str:
    base = os.environ.get("PATH", "") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    parts = [bin_dir] if bin_dir else []
    parts += base.split(os.pathsep)
    # dockerd, containerd and runc live in sbin on Debian; a non-login PATH may lack it.
    parts += [p for p in ("/usr/sbin", "/sbin") if p not in parts]
    return os.pathsep.join(parts)


def start_dockerd(tmp: Path, *, network: bool = False, cgroup_parent: str | None = None) -> Dockerd:
    """Start a private dockerd under tmp and wait (bounded) until it answers a ping.

    network=True: with iptables on (icc=false enforced, DOCKER-USER), which changes the firewall of
    the network namespace it runs in: refused (netns.HostNetnsError) unless that is not the host's.
    cgroup_parent: its containers' cgroups go under /<cgroup_parent> (cgroupfs) rather than /docker,
    so that what a killed daemon leaves there can be found (netns.remove_cgroups).
    """
    if network:
        netns.require_private_netns("start dockerd with iptables on")
    check_prerequisites()
    tmp.mkdir(parents=True, exist_ok=True)
    root = tmp.resolve()
    if len(str(root / "exec" / "containerd" / "containerd.sock.ttrpc")) > MAX_SOCKET_PATH:
        # Unix socket paths are short; pytest's tmp paths can be long.
        root = Path(tempfile.mkdtemp(prefix="gld-", dir="/tmp"))
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    hook_log = root / "nvidia-hook.log"
    hook_log.touch()
    hook = bin_dir / "nvidia-container-runtime-hook"
    hook.write_text(HOOK_SCRIPT.format(log=hook_log))
    hook.chmod(0o755)

    sock = root / "docker.sock"
    exec_root = root / "exec"
    data_root = root / "data"
    argv = [
        DOCKERD,
        "--storage-driver=vfs",
        f"--iptables={'true' if network else 'false'}",
        "--ip6tables=false",
        "--ip-masq=false",
        "--bridge=none",
        "--userland-proxy=false",
        "-H", f"unix://{sock}",
        "--data-root", str(data_root),
        "--exec-root", str(exec_root),
        "--pidfile", str(root / "docker.pid"),
        # No swarm/registry mirrors/proxies from a host /etc/docker/daemon.json.
        "--config-file", str(_empty_config(root)),
        *(["--cgroup-parent", f"/{cgroup_parent}"] if cgroup_parent else []),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env["PATH"] = _daemon_path(str(bin_dir))
    proc = procs.start_process("dockerd", argv, root / "dockerd.log", env=env)
    daemon = Dockerd(root, sock, f"unix://{sock}", proc, hook_log, exec_root, data_root)
    try:
        _wait_ping(daemon, STARTUP_TIMEOUT_S)
    except BaseException:
        daemon.stop(grace=5)
        raise
    return daemon


def _empty_config(root: Path) -> Path:
    path = root / "daemon.json"
    path.write_text("{}\n")
    return path


def _wait_ping(daemon: Dockerd, timeout: float) -> None:
    import docker

    def probe() -> str | None:
        if not daemon.socket.exists():
            return f"no socket {daemon.socket} yet"
        try:
            client = docker.APIClient(base_url=daemon.base_url, version="auto", timeout=5)
            try:
                return None if client.ping() else "ping failed"
            finally:
                client.close()
        except Exception as e:  # the SDK raises DockerException, requests errors, OSError
            return str(e)

    procs.wait_ready("dockerd", probe, timeout, daemon.proc)


def _is_static_elf(path: str) -> bool:
    """True when path is an ELF executable without a PT_INTERP (dynamic loader) program header."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        order = "<" if head[5] == 1 else ">"
        phoff = struct.unpack_from(order + "Q", head, 0x20)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        (p_type,) = struct.unpack_from(order + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _busybox_rootfs() -> bytes:
    if not os.access(BUSYBOX, os.X_OK):
        raise DockerUnavailable(f"no {BUSYBOX} (apt-get install busybox-static)")
    if not _is_static_elf(BUSYBOX):
        raise DockerUnavailable(f"{BUSYBOX} is not a static 64-bit executable (apt-get install busybox-static)")
    listed = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, timeout=10, check=True)
    applets = sorted({a.strip() for a in listed.stdout.split() if a.strip() and "/" not in a} - {"busybox"})

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "etc", "proc", "sys", "dev", "root", "var", "usr", "usr/bin"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        for applet in applets:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            info.mode = 0o777
            tar.addfile(info)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def busybox_image(dockerd: Dockerd) -> str:
    """Import (once per daemon) an offline busybox image; returns its tag."""
    import docker

    client = docker.APIClient(base_url=dockerd.base_url, version="auto", timeout=120)
    try:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.inspect_image(BUSYBOX_IMAGE)
            return BUSYBOX_IMAGE
        repository, tag = BUSYBOX_IMAGE.rsplit(":", 1)
        client.import_image_from_data(
            _busybox_rootfs(), repository=repository, tag=tag, changes=['CMD ["sh"]', "ENV PATH=/bin:/usr/bin"]
        )
        client.inspect_image(BUSYBOX_IMAGE)  # raises if the import did not produce it
    finally:
        client.close()
    return BUSYBOX_IMAGE


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the Docker tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"Docker tests skipped: {reason}")


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A private dockerd for the whole session; skips (or fails, with GPULEASE_REQUIRE_DOCKER=1)."""
    try:
        daemon = start_dockerd(tmp_path_factory.mktemp("dockerd"))
    except DockerUnavailable as e:
        _unavailable(str(e))
        raise  # unreachable: _unavailable raises
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def busybox(dockerd: Dockerd) -> str:
    """The offline busybox image's tag on the session's dockerd."""
    try:
        return busybox_image(dockerd)
    except DockerUnavailable as e:
        _unavailable(str(e))
        raise
