"""Wires the agent together: inventory, containers, gRPC server, registration, reconciliation,
enforcement, transport security and signal handling.

Two event loops (agent/control.py): the gRPC server and the container service run on the main
one; the heartbeats, restart reconciliation and enforcement on a control loop with a thread, a
channel to the coordinator and a Docker connection of their own, so that no amount of container
traffic delays a heartbeat or a stop.

Start-up order matters for containers: the node registers with ``reconciling=true`` (the
coordinator offers none of its GPUs), the reconciler adopts or stops the containers a previous
agent left running, and only then does the node offer its GPUs, StartContainer accept work, and
the enforcer begin its periodic checks. Stopping the agent leaves containers running: the next
agent adopts them.

Transport security (gpulease.agent.security): with TLS files the server and the channel to the
coordinator share one ``TlsFiles``; SIGHUP, or a change of the files, makes new connections use
the new certificate while open ones stay up. With ``--insecure`` and no TLS a warning is logged at
start and every hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from gpulease.agent.address import advertised_address
from gpulease.agent.channel import COORDINATOR_CHANNEL_OPTIONS, CoordinatorChannel
from gpulease.agent.config import AgentConfig
from gpulease.agent.containers import ContainerService, Limits, ReadyGate, RuntimeHandle
from gpulease.agent.control import ControlLoop, on_loop
from gpulease.agent.enforcer import Enforcer
from gpulease.agent.fencing import CoordinatorClient, Fence, Vouchers
from gpulease.agent.firewall import NetworkGuard
from gpulease.agent.host_mounts import check_bind_source
from gpulease.agent.inventory import InventoryContext
from gpulease.agent.inventory.select import select_source
from gpulease.agent.metrics import AgentCollector, IdleTracker, new_registry
from gpulease.agent.reconcile import Reconciler
from gpulease.agent.registration import AgentInventory, Registrar
from gpulease.agent.runtime import LOG_MAX_FILES, ContainerInfo, ContainerRuntime
from gpulease.agent.security import certificate_problem, load_tls
from gpulease.agent.server import start_server
from gpulease.common import httpserve
from gpulease.common.container_policy import ContainerPolicy
from gpulease.common.sdnotify import sd_notify
from gpulease.common.settings import split_host_port
from gpulease.common.tls import TlsFiles
from gpulease.common.transport import is_loopback, warn_while_insecure
from gpulease.errors import GpuLeaseError

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
__all__ = ["COORDINATOR_CHANNEL_OPTIONS", "run_agent"]


def _log_policy(policy: ContainerPolicy) -> None:
    log.info(
        "container policy: bind mounts (read-only) under %s; shared volumes (read-only) %s; tenant volumes "
        "t-<tenant>-<name>; images from %s",
        ", ".join(policy.bind_allowlist) or "nothing",
        ", ".join(policy.volume_allowlist) or "none",
        ", ".join(policy.registry_allowlist) or "nowhere",
    )
    for root in policy.bind_allowlist:
        # Sources are walked with no symlink in any component, the allowlisted part included.
        try:
            check_bind_source("bind_allowlist", root)
        except GpuLeaseError as e:
            log.warning("nothing under bind allowlist entry %s can be mounted as it is now: %s", root, e.message)


def _log_hardening(cfg: AgentConfig) -> None:
    h = cfg.hardening
    log.info(
        "containers run with profile %s (%s), not privileged, no-new-privileges, at most %d processes, logs of "
        "%d x %d bytes; limits: %d pull(s) in flight on the node (deadline %.0fs), per allocation 1 start, "
        "%d log stream(s), %d wait(s)",
        h.profile,
        "no capabilities, user nobody" if h.profile == "restricted" else "Docker's default capabilities minus NET_RAW",
        h.pids_limit,
        LOG_MAX_FILES,
        h.log_max_size,
        cfg.max_concurrent_pulls,
        cfg.pull_timeout_seconds,
        cfg.max_log_streams_per_allocation,
        cfg.max_waits_per_allocation,
    )


def docker_runtime_factory(
    docker_host: str | None, *, pull_timeout: float | None = None, network_guard: NetworkGuard | None = None
) -> Callable[[], ContainerRuntime]:
    """Creates the Docker runtime on first use (imported late: only agent/runtime imports docker)."""

    def create() -> ContainerRuntime:
        from gpulease.agent.runtime.docker_runtime import DEFAULT_PULL_TIMEOUT_S, DockerRuntime

        timeout = DEFAULT_PULL_TIMEOUT_S if pull_timeout is None else pull_timeout
        runtime: ContainerRuntime = DockerRuntime(docker_host, pull_timeout=timeout, network_guard=network_guard)
        return runtime

    return create


async def _open_channel(targets: Sequence[str], tls: TlsFiles | None) -> CoordinatorChannel:
    """The heartbeats' (and enforcement's) channel, made on (and so bound to) the loop this runs on."""
    return CoordinatorChannel(targets, tls, purpose="heartbeats")


async def run_agent(cfg: AgentConfig, tls: TlsFiles | None = None, network_guard: NetworkGuard | None = None) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean shutdown, 1 if the agent could not run.

    ``tls``: the files ``load_tls(cfg)`` read (read here when the configuration names them and
    none are given; a ConfigError then propagates). ``network_guard``: what ``firewall.start(cfg)``
    returned (the entry point installs the firewall before this runs); None: the runtime's own,
    which checks dockerd's rules but installs nothing.
    """
    if tls is None and cfg.tls_enabled:
        tls = load_tls(cfg)
    _log_transport(cfg, tls)

    def reloaded() -> None:
        # The files were rotated: they are in use already (the server reads them per handshake),
        # so a certificate that no longer names this node can only be reported, loudly.
        assert tls is not None and tls.cert is not None and tls.key is not None
        problem = certificate_problem(tls.cert, tls.key, cfg.node_id)
        if problem is not None:
            log.error("the rotated TLS certificate %s %s", cfg.tls_cert, problem)

    # Every connection to a coordinator fails over between cfg.coordinators (agent/channel.py).
    coordinators = ", ".join(cfg.coordinators)
    async with CoordinatorChannel(cfg.coordinators, tls, on_reload=reloaded, purpose="fencing checks") as channel:
        gate = ReadyGate(reconciling=True)
        vouchers = Vouchers()
        coordinator = CoordinatorClient(channel, coordinators)
        docker_description = f"Docker ({cfg.docker_host or 'the default socket'})"
        factory = docker_runtime_factory(
            cfg.docker_host, pull_timeout=cfg.pull_timeout_seconds, network_guard=network_guard
        )
        runtime = RuntimeHandle(factory, description=docker_description)
        # The enforcer's own Docker connection: container traffic never holds it up.
        control_runtime = RuntimeHandle(factory, description=docker_description)
        enforcer: Enforcer | None = None

        def context() -> InventoryContext | None:
            return enforcer.inventory_context() if enforcer is not None else None

        def started(info: ContainerInfo) -> None:
            if enforcer is not None:
                enforcer.note_started(info)

        def recheck() -> None:
            if enforcer is not None:
                enforcer.recheck()

        inventory = AgentInventory(select_source(cfg), reconciling=lambda: gate.reconciling, context=context)
        containers = ContainerService(
            node=cfg.node_id,
            runtime=runtime,
            fence=Fence(coordinator, cfg.node_id, vouchers),
            gate=gate,
            latest_inventory=lambda: inventory.latest,
            network=cfg.container_network,
            stop_grace_seconds=cfg.stop_grace_seconds,
            on_started=started,
            recheck=recheck,
            policy=cfg.container_policy,
            hardening=cfg.hardening,
            limits=Limits(
                max_concurrent_pulls=cfg.max_concurrent_pulls,
                max_log_streams_per_allocation=cfg.max_log_streams_per_allocation,
                max_waits_per_allocation=cfg.max_waits_per_allocation,
            ),
        )
        control = ControlLoop()
        control.start()
        try:
            control_channel = await control.run(_open_channel(cfg.coordinators, tls))
            try:
                enforcer = Enforcer(
                    node=cfg.node_id,
                    coordinator=CoordinatorClient(control_channel, coordinators),
                    containers=containers,
                    vouchers=vouchers,
                    interval=cfg.enforce_interval_seconds,
                    grace=cfg.enforce_grace_seconds,
                    retention=cfg.container_retention_seconds,
                    runtime=control_runtime,
                    image_retention=cfg.image_retention_seconds,
                    image_disk_limit=cfg.image_disk_limit,
                )
                return await _serve(cfg, tls, channel, control, control_channel, containers, enforcer, inventory, gate)
            finally:
                await control.run(control_channel.close())
        finally:
            await control.stop()
            containers.close()
            if enforcer is not None:
                enforcer.close()


async def _serve(
    cfg: AgentConfig,
    tls: TlsFiles | None,
    channel: CoordinatorChannel,
    control: ControlLoop,
    control_channel: CoordinatorChannel,
    containers: ContainerService,
    enforcer: Enforcer,
    inventory: AgentInventory,
    gate: ReadyGate,
) -> int:
    """Serve until SIGTERM/SIGINT: the server here, heartbeats and enforcement on the control loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        server = await start_server(cfg.listen, cfg.node_id, inventory, containers, tls=tls)
    except OSError as e:
        log.error("%s", e)
        return 1
    http = _http_side(cfg, inventory, enforcer)
    if http is not None:
        try:
            await http.start()
        except OSError as e:
            log.error("%s", e.strerror or e)
            await server.stop(0)
            return 1
        log.info("HTTP on %s: /metrics%s, /healthz", cfg.http_listen,
                 " (bearer token)" if cfg.metrics_token_file else "")  # fmt: skip
    _log_policy(containers.policy)
    _log_hardening(cfg)
    listen_host, _ = split_host_port(cfg.listen)
    address = cfg.advertise or advertised_address(listen_host, server.port, cfg.coordinators)
    coordinators = ", ".join(cfg.coordinators)
    log.info(
        "agent for node %s listening on %s (advertised as %s, %s); coordinator%s %s",
        cfg.node_id,
        cfg.listen,
        address,
        "mutual TLS" if tls is not None else "clear text",
        "s" if len(cfg.coordinators) > 1 else "",
        coordinators,
    )
    if is_loopback(address) and not all(is_loopback(c) for c in cfg.coordinators):
        log.warning(
            "this agent advertises the loopback address %s to the coordinator at %s, which cannot reach it "
            "there: set --listen to this server's management address (or --advertise)",
            address,
            coordinators,
        )

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, _request_stop, stop, sig)
    # SIGHUP re-reads the TLS files (also read when they change); without this handler it would kill us.
    loop.add_signal_handler(signal.SIGHUP, _reload_tls, tls, channel)

    async def ready() -> None:
        # Registered with reconciliation done: healthy, and ready for systemd (Type=notify).
        await server.set_serving()
        sd_notify("READY=1")

    try:
        # On the control loop: its own channel; readiness is set on this loop.
        registrar = Registrar(
            node=cfg.node_id,
            address=address,
            channel=control_channel,
            source=inventory,
            on_registered=on_loop(loop, ready),
            on_allocations_revision=enforcer.note_allocations_revision,
            exits=enforcer.exits,
            enforced_revision=lambda: enforcer.enforced_revision,
        )
        enforcer.on_enforced = registrar.wake

        async def wake_registrar() -> None:
            registrar.wake()  # tell the coordinator at once that the node's GPUs are usable

        reconciler = Reconciler(enforcer=enforcer, gate=gate, on_done=wake_registrar)

        async def reconcile_then_enforce() -> None:
            await reconciler.run()
            await enforcer.run()

        tasks: set[asyncio.Future[Any]] = {
            asyncio.wrap_future(control.submit(registrar.run())),
            asyncio.wrap_future(control.submit(reconcile_then_enforce())),
        }
        names = dict(zip(tasks, ("registration", "containers"), strict=False))
        if tls is None and cfg.insecure:
            what = f"the agent of node {cfg.node_id} on {cfg.listen}"
            tasks.add(asyncio.create_task(warn_while_insecure(log, what), name="insecure-warning"))
        stopping: asyncio.Task[object] = asyncio.create_task(stop.wait(), name="stop-signal")
        await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        for task in tasks:
            if task.done():
                # These loops only return by cancellation, so this is a bug; say so and shut down.
                failure = task.exception() if not task.cancelled() else None
                name = names.get(task) or getattr(task, "get_name", lambda: "a")()
                log.error("%s loop ended unexpectedly: %r", name, failure)
                exit_code = 1
        for task in (*tasks, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        sd_notify("STOPPING=1")
        await server.stop(SHUTDOWN_GRACE_S)
        if http is not None:
            await http.stop()
    finally:
        for sig in (*_STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("agent for node %s stopped (its containers keep running)", cfg.node_id)
    return exit_code


def _http_side(cfg: AgentConfig, inventory: AgentInventory, enforcer: Enforcer) -> httpserve.HttpServer | None:
    """/metrics and /healthz on cfg.http_listen (None when it is '')."""
    if not cfg.http_listen:
        return None
    idle = IdleTracker(cfg.idle_window_seconds)
    vouchers = enforcer.vouchers
    inventory.on_collect = lambda inv: idle.observe(inv, frozenset(vouchers.holders()))
    collector = AgentCollector(lambda: inventory.latest, vouchers.holders, lambda: enforcer.container_states, idle)
    app = httpserve.new_app(new_registry(collector), token=httpserve.read_token(cfg.metrics_token_file))
    return httpserve.HttpServer(app, cfg.http_listen)


def _log_transport(cfg: AgentConfig, tls: TlsFiles | None) -> None:
    if tls is not None:
        log.info(
            "mutual TLS: certificate %s, CA %s; AgentService takes calls from coordinator certificates only",
            cfg.tls_cert,
            cfg.tls_ca,
        )
        if cfg.insecure:
            log.info("--insecure has no effect: TLS files are configured and used")
    elif not cfg.insecure:
        log.info("clear text on loopback (%s): no TLS files configured", cfg.listen)


def _reload_tls(tls: TlsFiles | None, channel: CoordinatorChannel) -> None:
    if tls is None:
        log.info("received SIGHUP: no TLS files to re-read (clear text)")
        return
    log.info("received SIGHUP: re-reading the TLS files")
    tls.request_reload()
    if tls.refresh():
        channel.node_service()  # renew the coordinator channel now rather than at the next call


def _request_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        log.info("received %s: stopping heartbeats and the server", sig.name)
    stop.set()
