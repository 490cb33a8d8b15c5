"""--log-format json (issue 16, section 6): every line the coordinator writes is one JSON object, and
lines about a node or an allocation carry it as a field (not only in the message)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import grpc
import pytest

from gpulease.common.logs import JsonFormatter, log_fields
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness

GiB = 2**30


def test_a_json_coordinator_writes_one_object_per_line_with_context_fields(
    start_coordinator: Callable[..., harness.Coordinator],
) -> None:
    c = start_coordinator(extra=["--log-format", "json", "--queue-ttl", "3s"])
    harness.register(c.stub, "n1", gpus=1, cpus=4)
    harness.wait_nodes_up(c.stub, {"n1"})
    small = {"cpus": 1, "memory_bytes": GiB, "ttl_seconds": 30}
    c.stub.Allocate(pb.AllocateRequest(gpus=1, **small), timeout=10)
    stream = c.stub.WaitAllocate(pb.AllocateRequest(gpus=1, wait_seconds=3, request_id="logged", **small), timeout=10)
    pending = next(stream).pending
    with pytest.raises(grpc.RpcError):
        list(stream)  # the wait runs out: nothing frees
    lines = [line for line in c.proc.log_path.read_text().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "level", "logger", "message"} <= d.keys() for d in docs)
    assert any(d.get("node") == "n1" and "registered" in d["message"] for d in docs), lines
    queued = [d for d in docs if d["message"].startswith("queued ")]
    assert queued and queued[0]["allocation_id"] == pending.id, queued
    assert queued[0]["request_id"].endswith("/logged")


def test_the_formatter_keeps_fields_and_exceptions() -> None:
    record = logging.LogRecord("gpulease.x", logging.WARNING, __file__, 1, "held %s", ("a1",), None)
    for k, v in log_fields(allocation_id="a1", node="n1", request_id=None).items():
        setattr(record, k, v)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "held a1" and doc["allocation_id"] == "a1" and doc["node"] == "n1"
    assert "request_id" not in doc and doc["level"] == "WARNING"
    with pytest.raises(ValueError, match="unknown log fields"):
        log_fields(tenant="t")
