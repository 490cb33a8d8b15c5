"""Namespaces for tests that need a real firewall: a dockerd with iptables on, the agent's own chains.

Nothing here may touch the host's network. ``run_isolated`` runs a scenario module as
``unshare --net --pid --mount-proc --fork --kill-child -- python -m <module>``: a network namespace
of its own (its own loopback, its own iptables), a PID namespace whose end kills every process
started in it (dockerd, containerd, shims, containers, etcd, coordinator, agent: the kernel
SIGKILLs them all when the scenario's process, its init, exits or is killed), and a mount namespace
(for the PID namespace's /proc, and so that whatever dockerd mounts goes with it).

``require_private_netns`` is the guard every firewall-touching helper calls first: it refuses
unless this process is in a network namespace other than the host's. ``RemoteHost`` is a second
namespace, joined to the scenario's by a veth pair, that stands for another machine (a remote
coordinator's host).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# The inode of the network namespace the test run started in, passed down by run_isolated: the
# scenario compares its own against it (and against PID 1's, when that can be read).
HOST_NETNS_ENV = "GPULEASE_TEST_HOST_NETNS"
# Linux numbers the initial network namespace with this fixed inode (PROC_NET_INIT_INO) on recent
# kernels; older ones number it like any other, hence the two other comparisons.
NET_INIT_INO = 0xEFFFFFF9
CLONE_NEWNET = 0x40000000
UNSHARE = "unshare"


class HostNetnsError(RuntimeError):
    """This process is (or may be) in the host's network namespace: no firewall change is made."""


def netns_inode(path: str = "/proc/self/ns/net") -> int:
    return os.stat(path).st_ino


def _init_netns_inode() -> int | None:
    """PID 1's network namespace, when PID 1 is another process (not this one, as the init of a PID
    namespace of its own) and its namespaces can be read (they may not: no ptrace access to it)."""
    if os.getpid() == 1:
        return None
    try:
        return netns_inode("/proc/1/ns/net")
    except OSError:
        return None


def host_netns_inodes() -> set[int]:
    """Inodes that name the host's network namespace, as far as this process can tell."""
    known = {NET_INIT_INO}
    init = _init_netns_inode()
    if init is not None:
        known.add(init)
    if os.environ.get(HOST_NETNS_ENV, "").isdigit():
        known.add(int(os.environ[HOST_NETNS_ENV]))
    return known


def require_private_netns(what: str) -> None:
    """HostNetnsError unless this process is surely in a network namespace of its own: not PID 1's,
    not the one run_isolated was called from, not the kernel's initial one."""
    mine = netns_inode()
    if mine in host_netns_inodes():
        raise HostNetnsError(f"refusing to {what}: this process is in the host's network namespace ({mine})")
    if _init_netns_inode() is None and not os.environ.get(HOST_NETNS_ENV, "").isdigit():
        raise HostNetnsError(
            f"refusing to {what}: cannot tell the host's network namespace (PID 1's cannot be read, and "
            f"{HOST_NETNS_ENV} is not set: run the scenario through tests.support.netns.run_isolated)"
        )


def check_prerequisites() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in (UNSHARE, "ip", "iptables", "nsenter"):
        if shutil.which(tool, path=_sbin_path()) is None:
            return f"no {tool} on PATH (apt-get install util-linux iproute2 iptables)"
    return None


def _sbin_path() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join([*parts, *(p for p in ("/usr/sbin", "/sbin") if p not in parts)])


def isolated_argv(module: str, args: Sequence[str]) -> list[str]:
    """The command line run_isolated runs: ``python -m module args`` in new net, PID and mount namespaces."""
    unshare = shutil.which(UNSHARE, path=_sbin_path()) or UNSHARE
    return [unshare, "--net", "--pid", "--mount-proc", "--fork", "--kill-child", "--", sys.executable, "-m", module,
            *args]  # fmt: skip


def run_isolated(
    module: str, args: Sequence[str], *, timeout: float, log_path: Path, env: dict[str, str] | None = None
) -> tuple[int | None, str]:
    """Run the scenario; (exit status, stdout), or (None, stdout so far) when it ran past timeout.

    Past the timeout unshare is killed, and with it (--kill-child) the scenario: the PID namespace
    ends and the kernel kills every process in it. stderr goes to log_path."""
    child_env = dict(os.environ if env is None else env)
    child_env[HOST_NETNS_ENV] = str(netns_inode())
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env["PATH"] = _sbin_path()  # ip, iptables, dockerd: sbin tools
    root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH", "")) if p)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            isolated_argv(module, args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            env=child_env,
            cwd=root,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out.decode(errors="replace")
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
            return None, out.decode(errors="replace")


def reap_by_marker(marker: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process (but this one) whose command line mentions marker; their pids."""
    found = []
    me = os.getpid()
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != me and any(marker in arg for arg in p.info["cmdline"] or ()):
                found.append(p)
    for p in found:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(found, timeout=timeout)
    return [p.pid for p in found]


def remove_cgroups(name: str, root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    """Kill whatever is left in the cgroups /<name> of every hierarchy (a dockerd's --cgroup-parent)
    and remove them, deepest first; the paths that could not be removed."""
    unified = (root / "cgroup.controllers").exists()
    hierarchies = [root] if unified else sorted(p for p in root.iterdir() if p.is_dir())
    left = []
    for hierarchy in hierarchies:
        top = hierarchy / name
        if not top.is_dir():
            continue
        below = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for group in [*below, top]:
            with contextlib.suppress(OSError, ValueError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            if not _rmdir(group):
                left.append(str(group))
    return left


def _rmdir(path: Path, timeout: float = 5.0) -> bool:
    """rmdir, retried while the kernel still counts a dying process in the cgroup."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def sh(*argv: str, check: bool = True, timeout: float = 20.0) -> str:
    """Run a command here (in the scenario's namespace), its stdout; CalledProcessError with stderr."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, list(argv), done.stdout, done.stderr)
    return done.stdout


def loopback_up() -> None:
    require_private_netns("configure interfaces")
    sh("ip", "link", "set", "lo", "up")


# -- a second machine --------------------------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def socket_in(netns_path: str, make: Callable[[], socket.socket]) -> socket.socket:
    """A socket made in another network namespace (it stays there), by a thread that joins it."""
    made: list[socket.socket | BaseException] = []

    def run() -> None:  # setns changes the calling thread's namespace only: a thread of its own
        try:
            with open(netns_path, "rb") as ns:
                _setns(ns.fileno())
            made.append(make())
        except BaseException as e:
            made.append(e)

    t = threading.Thread(target=run, name="netns-socket")
    t.start()
    t.join(timeout=10)
    if not made:
        raise TimeoutError(f"no socket made in {netns_path}")
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


@dataclass
class RemoteHost:
    """Another machine: a network namespace held by a sleeping child, joined to this namespace by a
    veth pair (``node_ip`` here, ``ips`` there), with a route back to ``routes_back``.

    Servers there are sockets made in its namespace (``socket_in``) and served by threads here."""

    node_ip: str
    ips: tuple[str, ...]
    prefix: int
    proc: subprocess.Popen[bytes]
    servers: list[socket.socket] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    _closed: threading.Event = field(default_factory=threading.Event)

    @property
    def netns(self) -> str:
        return f"/proc/{self.proc.pid}/ns/net"

    def ip(self, *argv: str) -> str:
        return sh("nsenter", f"--net={self.netns}", "--", "ip", *argv)

    def banner_server(self, port: int, banner: bytes) -> None:
        """On every address of the remote host: each connection gets banner, then is closed."""
        server = socket_in(self.netns, lambda: socket.create_server(("0.0.0.0", port), backlog=64))
        server.settimeout(0.2)
        self.servers.append(server)

        def serve() -> None:
            while not self._closed.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                with conn, contextlib.suppress(OSError):
                    conn.sendall(banner)

        t = threading.Thread(target=serve, name=f"banner-{port}", daemon=True)
        t.start()
        self.threads.append(t)

    def forward(self, port: int, target: tuple[str, int]) -> None:
        """On every address of the remote host: port forwarded to target, as this namespace sees it
        (a coordinator on this namespace's loopback answers at the remote host's address)."""
        server = socket_in(self.netns, lambda: socket.create_server(("0.0.0.0", port), backlog=64))
        server.settimeout(0.2)
        self.servers.append(server)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        def serve() -> None:
            while not self._closed.is_set():
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                try:
                    upstream = socket.create_connection(target, timeout=5)
                except OSError:
                    client.close()
                    continue
                client.settimeout(None)
                upstream.settimeout(None)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pump, args=(a, b), daemon=True).start()

        t = threading.Thread(target=serve, name=f"forward-{port}", daemon=True)
        t.start()
        self.threads.append(t)

    def close(self) -> None:
        self._closed.set()
        for s in self.servers:
            with contextlib.suppress(OSError):
                s.close()
        for t in self.threads:
            t.join(timeout=2)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def remote_host(
    node_ip: str, ips: Sequence[str], prefix: int, routes_back: Sequence[str], extra_routes: Sequence[str] = ()
) -> Iterator[RemoteHost]:
    """A RemoteHost reached from here through node_ip/prefix; routes_back (CIDRs of this namespace,
    e.g. a Docker bridge's subnet) go back through node_ip; extra_routes (CIDRs, e.g. an address
    given to the remote host outside its subnet) are routed there from here."""
    require_private_netns("make a veth pair")
    proc = subprocess.Popen(
        [shutil.which(UNSHARE, path=_sbin_path()) or UNSHARE, "--net", "--", "sleep", "3600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = RemoteHost(node_ip, tuple(ips), prefix, proc)
    try:
        deadline = time.monotonic() + 10
        while netns_inode(host.netns) == netns_inode():  # unshare has not unshared yet
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the remote host's namespace did not appear")
            time.sleep(0.02)
        sh("ip", "link", "add", "gl-node", "type", "veth", "peer", "name", "gl-remote", "netns", str(proc.pid))
        sh("ip", "addr", "add", f"{node_ip}/{prefix}", "dev", "gl-node")
        sh("ip", "link", "set", "gl-node", "up")
        host.ip("link", "set", "lo", "up")
        for i, address in enumerate(ips):
            host.ip("addr", "add", f"{address}/{prefix if i == 0 else 32}", "dev", "gl-remote")
        host.ip("link", "set", "gl-remote", "up")
        for cidr in routes_back:
            host.ip("route", "add", cidr, "via", node_ip)
        for cidr in extra_routes:
            sh("ip", "route", "add", cidr, "via", ips[0])
        yield host
    finally:
        host.close()
