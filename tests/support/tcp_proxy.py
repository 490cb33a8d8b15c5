"""A TCP proxy on loopback for fault tests: cut every connection at a chosen moment, or refuse new
ones for a while, between a client (the coordinator's etcd client) and a real server.

Threads rather than asyncio, so that a test can cut from inside an event loop's callback (the
moment a hook fires) without awaiting anything.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._refusing = False
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Reset every open connection (both sides see the stream break)."""
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            # shutdown() wakes the pump threads blocked in recv(); close() alone would not.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def refuse(self) -> None:
        """Cut everything and close new connections at once until `allow()`: the server is 'down'."""
        with self._lock:
            self._refusing = True
        self.cut()

    def allow(self) -> None:
        with self._lock:
            self._refusing = False

    @contextlib.contextmanager
    def refused(self) -> Iterator[None]:
        self.refuse()
        try:
            yield
        finally:
            self.allow()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
            if refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns |= {client, server}
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client), daemon=True).start()

    def _answers(self, src: socket.socket, dst: socket.socket) -> None:
        """The server-to-client direction: what a subclass changes to act on answers only."""
        self._pump(src, dst)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._end(src, dst)

    def _end(self, src: socket.socket, dst: socket.socket) -> None:
        """Both sides see the connection break."""
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._conns.discard(src)
            self._conns.discard(dst)
