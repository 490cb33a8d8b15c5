"""Wires the agent together: inventory source, gRPC server, registration loop, signal handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc

from agent.address import advertised_address, split_host_port
from agent.config import AgentConfig
from agent.inventory.select import select_source
from agent.registration import Registrar
from agent.server import start_server

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run_agent(cfg: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean shutdown, 1 if the agent could not run."""
    source = select_source(cfg)
    try:
        server = await start_server(cfg.listen, cfg.node_id, source)
    except OSError as e:
        log.error("%s", e)
        return 1
    listen_host, _ = split_host_port(cfg.listen)
    address = cfg.advertise or advertised_address(listen_host, server.port, cfg.coordinator)
    log.info(
        "agent for node %s listening on %s (advertised as %s); coordinator %s",
        cfg.node_id,
        cfg.listen,
        address,
        cfg.coordinator,
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, _request_stop, stop, sig)
    try:
        async with grpc.aio.insecure_channel(cfg.coordinator) as channel:
            registrar = Registrar(
                node=cfg.node_id,
                address=address,
                channel=channel,
                source=source,
                on_registered=server.set_serving,
            )
            registration = asyncio.create_task(registrar.run(), name="registration")
            stopping = asyncio.create_task(stop.wait(), name="stop-signal")
            await asyncio.wait({registration, stopping}, return_when=asyncio.FIRST_COMPLETED)
            exit_code = 0
            if registration.done():
                # run() only returns by cancellation, so this is a bug; say so and shut down.
                log.error("registration loop ended unexpectedly: %r", registration.exception())
                exit_code = 1
            for task in (registration, stopping):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await server.stop(SHUTDOWN_GRACE_S)
    finally:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    log.info("agent for node %s stopped", cfg.node_id)
    return exit_code


def _request_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        log.info("received %s: stopping heartbeats and the server", sig.name)
    stop.set()
