from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gpulease.common.sdnotify import sd_notify


def test_sends_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        sd_notify("READY=1")
        assert server.recv(64) == b"READY=1"


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    sd_notify("READY=1")  # must not raise
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/socket")
    sd_notify("READY=1")  # an unreachable socket is ignored too
