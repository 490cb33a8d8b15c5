"""The web dashboard and the JSON it reads (issue 16, section 4), on the coordinator's HTTP side.

    /                       the page (coordinator/web/: plain HTML, CSS and JavaScript, no build
                            step, nothing loaded from another host)
    /api/v1/whoami          who the credential is, and whether one is required
    /api/v1/summary         cluster totals
    /api/v1/nodes           every node with its GPUs (state, holder, owner, tenant, age, TTL)
    /api/v1/nodes/{name}    one node, same shape (the page re-fetches a node an event named)
    /api/v1/allocations     live allocations (?owner= ?tenant=)
    /api/v1/queue           pending requests with their position and reason
    /api/v1/quotas          tenants' quotas and usage
    /api/v1/events          recent events (?since=REV ?limit=N)
    /api/v1/stream          server-sent events from view.events.subscribe: ``id`` is the etcd
                            revision, so a reconnect resumes with Last-Event-ID (or ?since=REV)

Auth mirrors the gRPC side (coordinator/guard.py): a coordinator with TLS wants a bearer token
from its own token store (``Tokens.lookup``; any role: viewer, user, admin) on every /api/v1/
call; a user (role user) sees its own tenant's queue, quotas and events, as ListPending,
ListQuotas and WatchEvents show them. A clear-text coordinator (loopback, or --insecure, where
gRPC trusts every caller as the local admin) asks for none. The page and its static files hold
no data and are open; the page asks for a token once when the API answers 401 and keeps it in
sessionStorage. The stream is read with fetch() (not EventSource, which cannot send headers), so
the token travels in the Authorization header and never in a URL or an access log.

GPU utilization, memory used, temperature and power come from the heartbeats' telemetry, which
this replica keeps in memory only (coordinator/telemetry.py); null where there is none (simulated
GPUs, a node that heartbeats another replica, a down node, a summary older than three intervals).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from importlib import resources
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from gpulease.common.identity import Role
from gpulease.coordinator.domain import Allocation, NodeView
from gpulease.coordinator.events import EventType, to_dict
from gpulease.coordinator.policies import Policies
from gpulease.coordinator.servicer import _pending_pb, _tenant_pb
from gpulease.coordinator.store import StoreUnavailable
from gpulease.coordinator.telemetry import GpuSample, Telemetry
from gpulease.coordinator.tokens import TokenRecord, Tokens
from gpulease.coordinator.view import ClusterView
from gpulease.coordinator.waiting import WaitingQueue

_STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
_KEEPALIVE_S = 15.0
_EVENTS_LIMIT = 500
_STREAMS = web.AppKey("dashboard_streams", set[asyncio.Task[Any]])


class Dashboard:
    def __init__(
        self,
        view: ClusterView,
        *,
        tokens: Tokens | None = None,
        tls: bool = False,
        queue: WaitingQueue | None = None,
        policies: Policies | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._view = view
        self._telemetry = telemetry
        self._tokens = tokens
        self._tls = tls
        self._queue = queue
        self._policies = policies

    def add_routes(self, app: web.Application) -> None:
        app[_STREAMS] = set()
        app.on_shutdown.append(_close_streams)
        r = app.router
        r.add_get("/", self._static("index.html"))
        for name in _STATIC:
            r.add_get("/" + name, self._static(name))
        api = {
            "whoami": self.whoami, "summary": self.summary, "nodes": self.nodes, "nodes/{name}": self.node,
            "allocations": self.allocations, "queue": self.queue, "quotas": self.quotas, "events": self.events,
        }  # fmt: skip
        for path, handler in api.items():
            r.add_get("/api/v1/" + path, self._guarded(handler))
        r.add_get("/api/v1/stream", self.stream)

    # --- plumbing --------------------------------------------------------------------------

    def _static(self, name: str) -> Any:
        body = resources.files("gpulease.coordinator").joinpath("web", name).read_bytes()
        ctype = _STATIC[name]

        async def serve(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=ctype, charset="utf-8",
                                headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})  # fmt: skip

        return serve

    def _who(self, request: web.Request) -> TokenRecord | bool | None:
        """True: no credential needed (clear text); a record: a valid token; None: refused."""
        if not self._tls:
            return True
        scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or self._tokens is None:
            return None
        return self._tokens.lookup(secret.strip())

    def _guarded(self, handler: Any) -> Any:
        async def guarded(request: web.Request) -> web.StreamResponse:
            who = self._who(request)
            if who is None:
                return _unauthorized()
            try:
                if handler is not self.whoami:
                    self._view.ensure_synced()
                return web.json_response(handler(request, who), dumps=_dumps)
            except StoreUnavailable as exc:
                return web.json_response({"error": str(exc)}, status=503)

        return guarded

    # --- the API ---------------------------------------------------------------------------

    def whoami(self, request: web.Request, who: Any) -> dict[str, Any]:
        if who is True:
            return {"auth_required": False, "principal": "local admin (clear-text coordinator)", "role": "admin",
                    "tenant": ""}  # fmt: skip
        return {"auth_required": True, "principal": who.principal().id, "role": who.role.value, "tenant": who.tenant}

    def summary(self, request: web.Request, who: Any) -> dict[str, Any]:
        views = self._view.nodes()
        states = ("free", "allocated", "draining", "unhealthy", "foreign", "simulated", "cordoned", "down")
        gpus = dict.fromkeys(states, 0)
        nodes = {"up": 0, "down": 0, "cordoned": 0}
        cpus_total = cpus_used = 0
        for v in views:
            nodes[v.state.value if v.state.value in nodes else "up"] += 1
            cpus_total += v.info.cpus_total
            cpus_used += v.cpus_used
            for g in _gpus(v, self._holders(v), {}):
                gpus[g["state"]] += 1
        return {
            "revision": self._view.revision, "now_unix_ms": _now_ms(), "nodes": nodes, "nodes_total": len(views),
            "gpus": gpus, "gpus_total": sum(gpus.values()), "cpus_total": cpus_total, "cpus_allocated": cpus_used,
            "allocations": len(self._view.allocations()),
            "pending": len(self._queue.pending()) if self._queue is not None else 0,
            "utilization_available": self._telemetry is not None and len(self._telemetry) > 0,
        }  # fmt: skip

    def nodes(self, request: web.Request, who: Any) -> dict[str, Any]:
        holders = self._all_holders()
        return {"revision": self._view.revision, "now_unix_ms": _now_ms(),
                "nodes": [_node(v, holders.get(v.name, {}), self._samples(v)) for v in self._view.nodes()]}  # fmt: skip

    def node(self, request: web.Request, who: Any) -> dict[str, Any]:
        v = self._view.node(request.match_info["name"])
        if v is None:
            raise web.HTTPNotFound(text=json.dumps({"error": "no such node"}), content_type="application/json")
        return {
            "revision": self._view.revision,
            "now_unix_ms": _now_ms(),
            "node": _node(v, self._holders(v), self._samples(v)),
        }

    def allocations(self, request: web.Request, who: Any) -> dict[str, Any]:
        owner, tenant = request.query.get("owner", ""), request.query.get("tenant", "")
        found = [a for a in self._view.allocations()
                 if (not owner or owner in a.owner) and (not tenant or a.tenant == tenant)]  # fmt: skip
        found.sort(key=lambda a: (a.created_unix_ms, a.id))
        return {"revision": self._view.revision, "now_unix_ms": _now_ms(), "allocations": [_alloc(a) for a in found]}

    def queue(self, request: web.Request, who: Any) -> dict[str, Any]:
        statuses = self._queue.statuses() if self._queue is not None else []
        mine = _tenant_only(who)
        return {"revision": self._view.revision, "pending": [
            _msg(_pending_pb(s)) for s in statuses if mine is None or s.entry.tenant == mine]}  # fmt: skip

    def quotas(self, request: web.Request, who: Any) -> dict[str, Any]:
        if self._queue is None or self._policies is None:
            return {"tenants": []}
        pending: dict[str, int] = {}
        for e in self._queue.pending():
            pending[e.tenant] = pending.get(e.tenant, 0) + 1
        mine = _tenant_only(who)
        statuses = self._policies.statuses(pending, self._queue.fair_usage())
        return {"tenants": [_msg(_tenant_pb(t)) for t in statuses if mine is None or t.tenant in (mine, "*")]}

    def events(self, request: web.Request, who: Any) -> dict[str, Any]:
        since = _int(request.query.get("since", "0"))
        limit = max(1, min(_int(request.query.get("limit", "200")) or 200, _EVENTS_LIMIT))
        mine = _tenant_only(who)
        found = [to_dict(ev) for ev in self._view.events.recent()
                 if ev.revision > since and (mine is None or not ev.tenant or ev.tenant == mine)]  # fmt: skip
        return {"revision": self._view.events.revision, "events": found[-limit:]}

    async def stream(self, request: web.Request) -> web.StreamResponse:
        who = self._who(request)
        if who is None:
            return _unauthorized()
        try:
            self._view.ensure_synced()
        except StoreUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)
        since = _int(request.headers.get("Last-Event-ID", "") or request.query.get("since", "0"))
        types = set()
        for t in request.query.get("type", "").split(","):
            with contextlib.suppress(ValueError):
                types.add(EventType(t.strip()))
        mine = _tenant_only(who)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})  # fmt: skip
        await resp.prepare(request)
        streams: set[asyncio.Task[Any]] = request.app[_STREAMS]
        task = asyncio.current_task()
        assert task is not None
        streams.add(task)
        events = self._view.events.subscribe(since, types, follow=True).__aiter__()
        try:
            await resp.write(b"retry: 1000\n: gpulease events\n\n")
            nxt: asyncio.Task[Any] | None = None
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(events.__anext__())
                done, _ = await asyncio.wait({nxt}, timeout=_KEEPALIVE_S)
                if not done:
                    await resp.write(b": keepalive\n\n")
                    continue
                try:
                    ev = nxt.result()
                except StopAsyncIteration:
                    break
                nxt = None
                if mine is not None and ev.tenant and ev.tenant != mine:
                    continue
                data = json.dumps(to_dict(ev), separators=(",", ":"))
                await resp.write(f"id: {ev.revision}\nevent: {ev.type.value}\ndata: {data}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            streams.discard(task)
            if nxt is not None:
                nxt.cancel()
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
        return resp

    def _samples(self, v: NodeView) -> dict[int, GpuSample]:
        return self._telemetry.of(v.name, v.up) if self._telemetry is not None else {}

    # --- who holds what --------------------------------------------------------------------

    def _holders(self, v: NodeView) -> dict[int, Allocation]:
        out: dict[int, Allocation] = {}
        for a in self._view.allocations_on(v.name):
            with contextlib.suppress(KeyError):
                for g in a.on(v.name).gpus:
                    out[g.index] = a
        return out

    def _all_holders(self) -> dict[str, dict[int, Allocation]]:
        out: dict[str, dict[int, Allocation]] = {}
        for a in self._view.allocations():
            for m in a.members:
                for g in m.gpus:
                    out.setdefault(m.node, {})[g.index] = a
        return out


async def _close_streams(app: web.Application) -> None:
    """At shutdown: end the open streams, or the runner would wait for them."""
    streams = app[_STREAMS]
    for task in list(streams):
        task.cancel()


def _unauthorized() -> web.Response:
    return web.json_response({"error": "a viewer token is required (Authorization: Bearer <token>)"}, status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="gpulease"'})  # fmt: skip


def _tenant_only(who: Any) -> str | None:
    """The tenant a caller is confined to (role user), else None (viewer, admin, clear text)."""
    if isinstance(who, bool):
        return None
    return who.tenant if who.role is Role.USER else None


def _gpus(v: NodeView, holders: dict[int, Allocation], samples: dict[int, GpuSample]) -> list[dict[str, Any]]:
    node_state = v.state.value
    out = []
    for g in v.info.gpus:
        a = holders.get(g.index)
        t = samples.get(g.index)
        if node_state == "down":
            state = "down"
        elif a is not None:
            state = "allocated"
        elif g.index in v.gpus_held:
            state = "draining"  # its allocation ended; its containers are not known stopped yet
        elif not g.healthy:
            state = "unhealthy"
        elif g.foreign:
            state = "foreign"
        elif node_state == "cordoned":
            state = "cordoned"
        elif g.simulated:
            state = "simulated"
        else:
            state = "free"
        gpu: dict[str, Any] = {
            "index": g.index, "uuid": g.uuid, "model": g.model, "memory_total_bytes": g.memory_total_bytes,
            "state": state, "healthy": g.healthy, "simulated": g.simulated, "health_detail": g.health_detail,
            "foreign": g.foreign, "foreign_detail": g.foreign_detail,
            "utilization_percent": t and t.utilization_percent, "memory_used_bytes": t and t.memory_used_bytes,
            "temperature_c": t and t.temperature_c, "power_draw_mw": t and t.power_draw_mw,
            "allocation_id": "", "owner": "", "tenant": "", "principal": "", "created_unix_ms": 0,
            "ttl_seconds": 0, "max_runtime_seconds": 0,
        }  # fmt: skip
        if a is not None:
            gpu.update(allocation_id=a.id, owner=a.owner, tenant=a.tenant, principal=a.principal,
                       created_unix_ms=a.created_unix_ms, ttl_seconds=a.ttl_seconds,
                       max_runtime_seconds=a.max_runtime_s)  # fmt: skip
        out.append(gpu)
    return out


def _node(v: NodeView, holders: dict[int, Allocation], samples: dict[int, GpuSample]) -> dict[str, Any]:
    return {
        "name": v.name, "state": v.state.value, "address": v.info.address, "hostname": v.info.hostname,
        "reconciling": v.info.reconciling, "source": v.info.source, "cpus_total": v.info.cpus_total,
        "cpus_allocated": v.cpus_used, "memory_total_bytes": v.info.memory_total_bytes,
        "memory_allocated_bytes": v.memory_used, "labels": dict(v.info.labels), "gpus": _gpus(v, holders, samples),
    }  # fmt: skip


def _alloc(a: Allocation) -> dict[str, Any]:
    return {
        "id": a.id, "owner": a.owner, "tenant": a.tenant, "principal": a.principal,
        "created_unix_ms": a.created_unix_ms, "ttl_seconds": a.ttl_seconds, "max_runtime_seconds": a.max_runtime_s,
        "priority_class": a.priority_class,
        "preemptible": a.preemptible, "cpus": sum(m.cpus for m in a.members),
        "memory_bytes": sum(m.memory_bytes for m in a.members),
        "gpus": [{"node": m.node, "index": g.index, "uuid": g.uuid, "model": g.model}
                 for m in a.members for g in m.gpus],
        "nodes": list(a.nodes),
    }  # fmt: skip


def _msg(m: Any) -> dict[str, Any]:
    return json_format.MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _int(text: str) -> int:
    try:
        return max(0, int(text))
    except ValueError:
        return 0


def _now_ms() -> int:
    return int(time.time() * 1000)
