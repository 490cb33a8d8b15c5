"""An unexpected exception reaches the caller as INTERNAL with an error id only; its text, which may
name files, hosts or secrets, goes to the server's log under the same id (issue 13)."""

from __future__ import annotations

import logging
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpulease.common.grpc_errors import grpc_errors


class Exploding(health_pb2_grpc.HealthServicer):
    @grpc_errors
    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        raise RuntimeError("cannot open /etc/gpulease/secret.key for gpl_topsecret")


async def test_internal_answer_carries_an_id_not_the_text(caplog: pytest.LogCaptureFixture) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Exploding(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with caplog.at_level(logging.ERROR):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await server.stop(0)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details() or ""
    assert "secret" not in details and "/etc" not in details and "RuntimeError" not in details
    found = re.search(r"error id ([0-9a-f]{12})", details)
    assert found, details
    logged = [r for r in caplog.records if found.group(1) in r.getMessage()]
    assert logged and "secret.key" in (logged[0].exc_text or str(logged[0].exc_info))
