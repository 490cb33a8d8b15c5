"""The dashboard's JSON (/api/v1/) and its event stream (SSE), on a real coordinator and etcd
(issue 16, section 4), read with aiohttp's client: what the page reads after known actions, the
stream's ids resuming with Last-Event-ID, and the viewer token a coordinator with TLS asks for."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness
from tests.support.secure import make_token, token_caller

GiB = 2**30


async def _json(s: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with s.get(url, **kw) as r:
        assert r.status == 200, (url, r.status, await r.text())
        return await r.json()


async def _next_event(resp: aiohttp.ClientResponse, want: str, timeout: float = 10) -> tuple[int, dict[str, Any]]:
    """The next SSE message of type ``want`` (others skipped): (its id, its data)."""

    async def read() -> tuple[int, dict[str, Any]]:
        ident, event, data = 0, "", ""
        while True:
            line = (await resp.content.readline()).decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if line.startswith("id: "):
                ident = int(line[4:])
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                if event == want:
                    return ident, json.loads(data)
                ident, event, data = 0, "", ""

    return await asyncio.wait_for(read(), timeout)


async def test_api_and_stream_follow_an_allocation(
    local_cluster: LocalCluster, coordinator: harness.Coordinator
) -> None:
    url = local_cluster.coordinator(coordinator.address).http_url
    api = f"{url}/api/v1"
    s = coordinator.stub
    harness.register(s, "node-a", gpus=4)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            page = await r.text()
            assert "app.js" in page and "http://" not in page and "https://" not in page, "nothing from another host"
        for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
            async with http.get(f"{url}/{name}") as r:
                assert r.status == 200 and r.content_type == ctype, name
        assert (await _json(http, f"{api}/whoami"))["auth_required"] is False

        async def free() -> int:
            return int((await _json(http, f"{api}/summary"))["gpus"]["free"])

        for _ in range(100):
            if await free() == 4:
                break
            await asyncio.sleep(0.1)
        summary = await _json(http, f"{api}/summary")
        assert summary["nodes"]["up"] == 1 and summary["gpus_total"] == 4 and summary["allocations"] == 0

        async with http.get(f"{api}/stream", timeout=aiohttp.ClientTimeout(total=60)) as stream:
            assert stream.status == 200 and stream.content_type == "text/event-stream"
            alloc = s.Allocate(pb.AllocateRequest(gpus=2, cpus=1, memory_bytes=GiB, owner="alice-job")).allocation
            rev, ev = await _next_event(stream, "allocated")
            assert ev["allocation_id"] == alloc.id and ev["node"] == "node-a" and rev == ev["revision"] > 0

            nodes = (await _json(http, f"{api}/nodes"))["nodes"]
            assert [n["name"] for n in nodes] == ["node-a"] and nodes[0]["state"] == "up"
            held = [g for g in nodes[0]["gpus"] if g["state"] == "allocated"]
            assert sorted(g["index"] for g in held) == sorted(g.index for g in alloc.gpus)
            assert {g["allocation_id"] for g in held} == {alloc.id} and {g["owner"] for g in held} == {"alice-job"}
            assert all(g["created_unix_ms"] > 0 and g["ttl_seconds"] > 0 for g in held)
            assert all(g["utilization_percent"] is None for g in nodes[0]["gpus"]), "no telemetry at the coordinator"
            one = (await _json(http, f"{api}/nodes/node-a"))["node"]
            assert one == nodes[0]
            async with http.get(f"{api}/nodes/nope") as r:
                assert r.status == 404

            allocs = (await _json(http, f"{api}/allocations", params={"owner": "alice"}))["allocations"]
            assert [a["id"] for a in allocs] == [alloc.id] and allocs[0]["owner"] == "alice-job"
            assert (await _json(http, f"{api}/allocations", params={"owner": "bob"}))["allocations"] == []
            assert (await _json(http, f"{api}/allocations", params={"tenant": "nobody"}))["allocations"] == []
            assert (await _json(http, f"{api}/summary"))["gpus"]["allocated"] == 2
            assert (await _json(http, f"{api}/queue"))["pending"] == []
            assert "tenants" in await _json(http, f"{api}/quotas")
            recent = (await _json(http, f"{api}/events", params={"since": str(rev - 1)}))["events"]
            assert [e["type"] for e in recent] == ["allocated"] and recent[0]["allocation_id"] == alloc.id

            s.Release(pb.ReleaseRequest(allocation_id=alloc.id))
            released_rev, ev = await _next_event(stream, "released")
            assert ev["allocation_id"] == alloc.id and released_rev > rev

        # A reconnect with Last-Event-ID resumes right after it: the release comes first.
        async with http.get(f"{api}/stream", headers={"Last-Event-ID": str(rev)}) as again:
            assert await _next_event(again, "released") == (released_rev, ev)
        gpus = (await _json(http, f"{api}/nodes/node-a"))["node"]["gpus"]
        assert {g["state"] for g in gpus} == {"free"} and {g["allocation_id"] for g in gpus} == {""}


async def test_a_coordinator_with_tls_wants_a_viewer_token(secure_cluster: LocalCluster) -> None:
    url = secure_cluster.coordinator(secure_cluster.coordinator_address).http_url
    admin, ch = token_caller(secure_cluster, "admin", secure_cluster.admin_token())
    try:
        viewer = make_token(admin, "vic", "viewer", "ml")
        user = make_token(admin, "alice", "user", "ml")
    finally:
        ch.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/") as r:
            assert r.status == 200, "the page holds no data: it asks for a token itself"
        for path in ("summary", "nodes", "allocations", "queue", "quotas", "events", "stream", "whoami"):
            async with http.get(f"{url}/api/v1/{path}") as r:
                assert r.status == 401, path
            async with http.get(f"{url}/api/v1/{path}", headers={"Authorization": "Bearer gpl_not-a-token"}) as r:
                assert r.status == 401, path
        auth = {"Authorization": f"Bearer {viewer}"}
        me = await _json(http, f"{url}/api/v1/whoami", headers=auth)
        assert me == {"auth_required": True, "principal": "user:vic", "role": "viewer", "tenant": "ml"}
        assert (await _json(http, f"{url}/api/v1/summary", headers=auth))["nodes_total"] == 0
        async with http.get(f"{url}/api/v1/stream", headers=auth) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            assert (await asyncio.wait_for(r.content.readline(), 5)).startswith(b"retry:")
        me = await _json(http, f"{url}/api/v1/whoami", headers={"Authorization": f"Bearer {user}"})
        assert me["role"] == "user" and me["tenant"] == "ml"
