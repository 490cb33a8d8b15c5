"""Every RPC of every coordinator service x every kind of caller, over real TLS connections.

The rows come from the service descriptors (coordinator/authz.py's all_rpcs): an RPC added
without a request here, or without a rule there, fails this test. Callers:

    none        the TLS port, no credential                   -> UNAUTHENTICATED
    other-ca    a user certificate from another CA (mTLS port) -> the handshake fails: nothing served
    expired     an expired certificate of our CA (mTLS port)   -> the handshake fails: nothing served
    agent-2     node-2's agent certificate, about node-1       -> PERMISSION_DENIED
    agent-1     node-1's agent certificate                     -> NodeService only
    viewer      a viewer token                                 -> reads only
    owner       alice's user token, on alice's allocation      -> reads, use, her allocation
    stranger    bob's user token, on alice's allocation        -> reads and use; not her allocation
    admin       the bootstrap admin token                      -> everything but NodeService

"Allowed" means the call got past authentication and authorization (it may still fail for its
own reasons, e.g. NOT_FOUND or an agent that is not running). After every refused call, alice's
allocation is still live: a refusal changes nothing.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from gpulease.common import pki
from gpulease.common.identity import Kind, Role
from gpulease.coordinator import authz
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.secure import Caller, bearer, channel

ALLOWED, UNAUTH, DENIED, HANDSHAKE = "allowed", "UNAUTHENTICATED", "PERMISSION_DENIED", "handshake refused"
REFUSALS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def expected(caller: str, rule: authz.Rule) -> str:
    if caller == "none":
        return UNAUTH
    if caller in ("other-ca", "expired"):
        return HANDSHAKE
    if caller in ("agent-1", "agent-2"):
        return ALLOWED if rule is authz.Rule.NODE and caller == "agent-1" else DENIED
    if rule is authz.Rule.NODE:
        return DENIED
    if caller == "admin":
        return ALLOWED
    if rule is authz.Rule.ADMIN:
        return DENIED
    if caller == "viewer":
        return ALLOWED if rule is authz.Rule.READ else DENIED
    if caller == "stranger" and rule is authz.Rule.OWNER:
        return DENIED
    return ALLOWED  # owner: read, use, owner


def callers(cluster: LocalCluster, tmp: Path, closers: list[Callable[[], None]]) -> dict[str, Caller]:
    coordinator = next(iter(cluster.coordinators.values()))
    admin = cluster.admin_token()
    token_channel = channel(cluster, coordinator.address)
    closers.append(token_channel.close)
    stub = harness.AnyService(token_channel)

    made = {}
    for name, role in (("viewer", "viewer"), ("alice", "user"), ("bob", "user")):
        made[name] = stub.CreateToken(pb.CreateTokenRequest(name=name, role=role), metadata=bearer(admin)).token
    other = tmp / "other-ca"
    pki.init_ca(other)
    certs = {
        "other-ca": (pki.issue(other, Kind.USER, "mallory"), other / pki.CA_CERT),
        "expired": (pki.issue(cluster.pki_dir, Kind.USER, "old", role=Role.ADMIN, days=1, basename="expired",
                              not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)), None),
        "agent-1": (cluster.issue(Kind.AGENT, "node-1"), None),
        "agent-2": (cluster.issue(Kind.AGENT, "node-2"), None),
    }  # fmt: skip
    out = {
        "none": Caller("none", stub),
        "viewer": Caller("viewer", stub, bearer(made["viewer"])),
        "owner": Caller("owner", stub, bearer(made["alice"])),
        "stranger": Caller("stranger", stub, bearer(made["bob"])),
        "admin": Caller("admin", stub, bearer(admin)),
    }
    for name, (cert, ca) in certs.items():
        mtls = channel(cluster, coordinator.mtls_address, cert, ca)
        closers.append(mtls.close)
        out[name] = Caller(name, harness.AnyService(mtls))
    return out


def requests(alloc_id: str, node_address: str, row: int) -> dict[str, Any]:
    ref = tpb.ContainerRef(allocation_id=alloc_id, container_id="c0")
    day = int(time.time() * 1000) + 86_400_000
    return {
        "Allocate": pb.AllocateRequest(gpus=1, ttl_seconds=60),
        "WaitAllocate": pb.AllocateRequest(gpus=1, ttl_seconds=60, wait_seconds=5),
        "ListPending": pb.ListPendingRequest(),
        "WatchEvents": pb.WatchEventsRequest(follow=False),
        "Release": pb.ReleaseRequest(allocation_id=alloc_id),
        "CancelRequest": pb.CancelRequestRequest(request_id=f"never-made-{row}"),
        "KeepAlive": pb.KeepAliveRequest(allocation_id=alloc_id),
        "GetAllocation": pb.GetAllocationRequest(allocation_id=alloc_id),
        "ListAllocations": pb.ListAllocationsRequest(),
        "ListNodes": pb.ListNodesRequest(),
        "GetClusterSummary": pb.GetClusterSummaryRequest(),
        "WhoAmI": pb.WhoAmIRequest(),
        "RunContainer": pb.RunContainerRequest(allocation_id=alloc_id, spec=tpb.ContainerSpec(image="busybox")),
        "WaitContainer": tpb.WaitContainerRequest(ref=ref, timeout_seconds=1),
        "StreamLogs": tpb.StreamLogsRequest(ref=ref),
        "StopContainer": tpb.StopContainerRequest(ref=ref),
        "ListContainers": tpb.ListContainersRequest(allocation_id=alloc_id),
        "RegisterNode": pb.RegisterNodeRequest(
            node="node-1", address=node_address, inventory=harness.inventory(8, node="node-1")
        ),
        "Heartbeat": pb.HeartbeatRequest(node="node-1"),
        "ListNodeAllocations": pb.ListAllocationsRequest(node="node-1"),
        "GetNodeAllocation": pb.GetAllocationRequest(allocation_id=alloc_id),
        "CordonNode": pb.CordonNodeRequest(node="node-1", cordoned=False),
        "DeleteNode": pb.DeleteNodeRequest(node="ghost"),
        "GetStats": pb.GetStatsRequest(),
        "CreateToken": pb.CreateTokenRequest(name=f"t{row}", role="viewer"),
        "ListTokens": pb.ListTokensRequest(),
        "RevokeToken": pb.RevokeTokenRequest(name="nobody"),
        "ReadAudit": pb.ReadAuditRequest(),
        "ListQuotas": pb.ListQuotasRequest(),
        "ListPriorityClasses": pb.ListPriorityClassesRequest(),
        # Harmless when allowed: a quota and a class nobody uses, removals of ones that never existed.
        "SetQuota": pb.SetQuotaRequest(quota=pb.Quota(tenant=f"matrix-{row}", gpus=100)),
        "DeleteQuota": pb.DeleteQuotaRequest(tenant="nobody"),
        "SetPriorityClass": pb.SetPriorityClassRequest(priority_class=pb.PriorityClass(name=f"matrix-{row}", value=1)),
        "DeletePriorityClass": pb.DeletePriorityClassRequest(name="nobody"),
        "ListReservations": pb.ListReservationsRequest(),
        # A reservation of a tenant nobody uses, in a window a day ahead; a removal of one that never existed.
        "CreateReservation": pb.CreateReservationRequest(
            name=f"matrix-{row}", tenant="nobody", gpus=1, start_unix_ms=day, end_unix_ms=day + 3_600_000
        ),
        "DeleteReservation": pb.DeleteReservationRequest(name="nobody"),
    }


def outcome(caller: Caller, rpc: str, request: Any) -> tuple[str, grpc.StatusCode | None, str]:
    method = getattr(caller.stub, rpc.rsplit("/", 1)[1])
    try:
        answer = method(request, metadata=caller.metadata, timeout=10)
        if rpc.endswith(("/StreamLogs", "/WaitAllocate", "/WatchEvents")):
            list(answer)
        return ALLOWED, None, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""  # type: ignore[attr-defined]
        if code in REFUSALS:
            return code.name, code, details
        if code is grpc.StatusCode.UNAVAILABLE and harness.reason(err) == "":
            # gRPC's own UNAVAILABLE (no gpulease reason): the TLS handshake failed, nothing was served.
            return HANDSHAKE, code, details
        return ALLOWED, code, details


def test_every_rpc_for_every_caller(secure_cluster: LocalCluster, tmp_path: Path) -> None:
    closers: list[Callable[[], None]] = []
    try:
        who = callers(secure_cluster, tmp_path, closers)
        node_address = f"127.0.0.1:{procs.free_port()}"
        agent1 = who["agent-1"].stub
        agent1.RegisterNode(requests("", node_address, 0)["RegisterNode"], timeout=10)
        alice, admin = who["owner"], who["admin"]

        made: list[str] = []

        def alices_allocation() -> str:
            """Her live allocation; a new one, under a new request id, once a call released it (a
            released request id is a tombstone for a while: issue 17)."""
            if made and live(made[-1]):
                return made[-1]
            answer = alice.stub.Allocate(pb.AllocateRequest(gpus=1, ttl_seconds=60, request_id=f"target-{len(made)}"),
                                         metadata=alice.metadata, timeout=10)  # fmt: skip
            made.append(str(answer.allocation.id))
            return made[-1]

        def live(alloc_id: str) -> bool:
            try:
                admin.stub.GetAllocation(pb.GetAllocationRequest(allocation_id=alloc_id), metadata=admin.metadata)
                return True
            except grpc.RpcError:
                return False

        rpcs = authz.all_rpcs()
        assert {r.rsplit("/", 1)[1] for r in rpcs} == set(requests("", "", 0)), "a request for every RPC"
        failures = []
        row = 0
        for rpc in rpcs:
            rule = authz.RULES[rpc]
            for name, caller in who.items():
                row += 1
                agent1.Heartbeat(pb.HeartbeatRequest(node="node-1"), timeout=10)
                target = alices_allocation()
                got, code, details = outcome(caller, rpc, requests(target, node_address, row)[rpc.rsplit("/", 1)[1]])
                want = expected(name, rule)
                if got != want:
                    failures.append(f"{rpc} as {name}: expected {want}, got {got} ({code}: {details[:120]})")
                elif want != ALLOWED and not live(target):
                    failures.append(f"{rpc} as {name}: refused, yet alice's allocation {target} is gone")
                elif want == DENIED and f"rule '{rule}'" not in details:
                    failures.append(f"{rpc} as {name}: the refusal does not name rule '{rule}': {details}")
        assert not failures, "\n".join(failures)
    finally:
        for close in closers:
            close()
