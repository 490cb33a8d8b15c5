"""What each coordinator call sends, and how its answer becomes a model.

Each call is declared here once, as a function that builds an ``Op``: its parameters, defaults and
documentation are those of the public method, which ``ClientBase`` makes of it for both Client
and AsyncClient (see ``_calls``); the two differ only in how they send an Op.
Local validation (sizes, durations, volumes, protobuf ranges) raises InvalidRequest before
anything is sent; range checks that need the cluster's settings are the coordinator's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message

from gpulease.client import _convert
from gpulease.client.models import (
    AllocationInfo,
    AuditEntry,
    ClusterSummary,
    Container,
    Event,
    LogChunk,
    Node,
    PendingInfo,
    PriorityClassInfo,
    Quota,
    QuotaInfo,
    ReservationInfo,
    TokenInfo,
    WhoAmI,
)
from gpulease.common.units import parse_duration, parse_instant, parse_size
from gpulease.errors import AllocationPreempted, DeadlineExceeded, GpuLeaseError, InvalidRequest, Unavailable
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb

M = TypeVar("M", bound=Message)
T = TypeVar("T")

# The coordinator's ceiling for one WaitContainer call.
MAX_WAIT_S = 300
# RunContainer's default deadline: it covers an image pull on the node.
RUN_TIMEOUT_S = 900.0

Volume = str | tuple[str, str] | tuple[str, str, bool]


@dataclass(frozen=True)
class Rpc(Generic[M, T]):
    """What a call sends, the response type to expect, and the conversion of the answer."""

    rpc: str
    request: Message
    response_type: type[M]
    convert: Callable[[M], T]


@dataclass(frozen=True)
class Op(Rpc[M, T]):
    """One unary call."""

    # The deadline of one attempt; None: the client's timeout, plus ``waits``.
    timeout: float | None = None
    # Seconds the coordinator may spend on purpose before it answers (WaitContainer's wait,
    # StopContainer's grace), on top of the client's timeout.
    waits: float = 0.0
    # False for calls that could take effect twice if resent (RunContainer): those are retried only
    # when the failed attempt provably never reached a coordinator (see rpc_errors.should_retry).
    resend_safe: bool = True
    # The answer holds allocation records, which the client hands out as handles bound to itself.
    handles: bool = False

    def deadline(self, client_timeout: float) -> float:
        return self.timeout if self.timeout is not None else client_timeout + self.waits


@dataclass(frozen=True)
class StreamOp(Rpc[M, T]):
    """One server-streaming call (read-only); ``convert`` applies to each item."""

    # False: no deadline (a followed log stream lasts as long as the container).
    bounded: bool = True
    # Streams are read-only: resent freely until the first item arrived, never after.
    resend_safe = True

    def deadline(self, client_timeout: float) -> float | None:
        return client_timeout if self.bounded else None


def raw(rpc: str, request: Message, response_type: type[M]) -> Op[M, M]:
    """A call by name with a request message, answering the response message as is (for tools)."""
    return Op(rpc, request, response_type, _as_is)


def _as_is(message: M) -> M:
    return message


def size(value: int | str | None, what: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return parse_size(value)
    except InvalidRequest as e:
        raise InvalidRequest(f"{what}: {e.message}") from None


def volume(v: Volume) -> tpb.VolumeMount:
    if isinstance(v, tuple):
        return tpb.VolumeMount(source=v[0], target=v[1], read_only=bool(v[2]) if len(v) > 2 else False)
    parts = v.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1] or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise InvalidRequest(f"volume {v!r}: expected SRC:DST or SRC:DST:ro")
    return tpb.VolumeMount(source=parts[0], target=parts[1], read_only=len(parts) == 3 and parts[2] == "ro")


def build(factory: Callable[[], T]) -> T:
    # protobuf rejects ints that do not fit the field (e.g. gpus=2**40) with ValueError/TypeError.
    try:
        return factory()
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"invalid request: {e}") from None


def _positive(value: float, what: str) -> float:
    if not value > 0:
        raise InvalidRequest(f"{what} must be positive, got {value:g}")
    return value


def _allocation_of(response: pb.AllocateResponse) -> AllocationInfo:
    return _convert.allocation(response.allocation)


def _allocations_of(response: pb.ListAllocationsResponse) -> list[AllocationInfo]:
    return [_convert.allocation(a) for a in response.allocations]


# --- allocations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaitingAllocate(Op[pb.AllocateResponse, AllocationInfo]):
    """Allocate that waits in the queue: the stream WaitAllocate, sent again with the same request
    id (which keeps the request's place) when it breaks, until ``wait_until`` (monotonic seconds).
    The clients send it their own way (``_wait``); it answers an allocation as Allocate does."""

    stream: StreamOp[pb.AllocateProgress, AllocationInfo | PendingInfo] | None = None
    wait_until: float = 0.0
    on_pending: Callable[[PendingInfo], None] | None = None


# A broken wait is resumed this long after its deadline at most (the coordinator answers the
# deadline itself; this covers a replica that died just then).
WAIT_GRACE_S = 30.0


def _progress(msg: pb.AllocateProgress) -> AllocationInfo | PendingInfo:
    if msg.HasField("allocated"):
        return _convert.allocation(msg.allocated.allocation)
    return _convert.pending(msg.pending)


def allocate(
    gpus: int,
    cpus: int | None = None,
    memory: int | str | None = None,
    gpu_model: str = "",
    min_gpu_memory: int | str | None = None,
    node_selector: Mapping[str, str] | None = None,
    ttl: int | str | None = None,
    owner: str = "",
    request_id: str | None = None,
    wait: int | str | None = None,
    max_runtime: int | str | None = None,
    priority: str = "",
    on_pending: Callable[[PendingInfo], None] | None = None,
    tenant: str = "",
    preemptible: bool = False,
    nodes: int = 0,
    same: str = "",
) -> Op[pb.AllocateResponse, AllocationInfo]:
    """Reserve ``gpus`` GPUs (plus CPUs/memory) on one node for ``ttl`` (default: the coordinator's).

    ``nodes`` (2 or more): a gang of that many distinct nodes, each with ``gpus`` GPUs, ``cpus`` and
    ``memory`` (all per node), made whole or not at all, under one lease; ``same``: a node label
    (e.g. "rack") whose value every member node shares. ``alloc.members`` lists the nodes and
    ``alloc.run_gang(...)`` starts one container on each.

    Sizes take bytes or strings like "16GiB"; durations take seconds or "60s", "10m". Range checks
    are the coordinator's. The request id (a fresh one unless given) makes the call safe to retry:
    a repeat returns the allocation already made instead of a second one.

    ``wait`` (e.g. "10m"): when nothing fits now, wait in the coordinator's queue up to that long
    instead of failing at once (InsufficientResources, with the last pending reason, if it runs
    out). ``on_pending`` gets each status while it waits (position, reason, estimate); without it,
    they are logged. ``max_runtime``: the allocation is not renewed past it, and a declared runtime
    lets a request start ahead of a bigger one that it will not delay. ``priority``: a priority
    class the coordinator defines ("" = its default).

    ``tenant``: the tenant whose quota it counts against ("" = the caller's own; naming another is
    for admins). ``preemptible``: it may be preempted to make room for a request of a higher
    priority class (or reclaimed by a tenant below its quota when this one borrows); the lease
    then ends after the class's grace.

    Returns an allocation handle; ``with client.allocate(...) as alloc:`` (``async with await``
    for AsyncClient) keeps its lease alive and releases it on the way out.
    """
    # The request id is built here, once: every retry of this Op resends the same one, so the
    # coordinator returns the allocation already made.
    memory_bytes = size(memory, "memory")
    min_gpu_memory_bytes = size(min_gpu_memory, "min_gpu_memory") or 0
    ttl_seconds = _seconds(ttl, "ttl")
    wait_seconds = _seconds(wait, "wait")
    request = build(
        lambda: pb.AllocateRequest(
            gpus=gpus,
            cpus=cpus,
            memory_bytes=memory_bytes,
            gpu_model=gpu_model,
            min_gpu_memory_bytes=min_gpu_memory_bytes,
            node_selector=dict(node_selector or {}),
            ttl_seconds=ttl_seconds,
            owner=owner,
            request_id=request_id or uuid.uuid4().hex,
            wait_seconds=wait_seconds,
            max_runtime_seconds=_seconds(max_runtime, "max_runtime"),
            priority_class=priority,
            tenant=tenant,
            preemptible=preemptible,
            nodes=nodes,
            same_label=same,
        )
    )
    if not wait_seconds:
        return Op("Allocate", request, pb.AllocateResponse, _allocation_of, handles=True)
    stream = StreamOp("WaitAllocate", request, pb.AllocateProgress, _progress, bounded=False)
    until = time.monotonic() + wait_seconds + WAIT_GRACE_S
    return WaitingAllocate("WaitAllocate", request, pb.AllocateResponse, _allocation_of, handles=True, stream=stream,
                           wait_until=until, on_pending=on_pending)  # fmt: skip


def _seconds(value: int | str | None, what: str) -> int:
    """A duration argument in whole seconds; None = 0 (the coordinator's default). An explicit 0
    is refused: it would silently mean the default."""
    if value is None:
        return 0
    seconds = parse_duration(value) if isinstance(value, str) else value
    if seconds <= 0:
        raise InvalidRequest(f"{what} must be positive, got {value!r} (leave it out for the default)")
    return seconds


def _seconds_or_none(value: int | str | None, what: str) -> int:
    """A duration argument whose 0 means "none" (None or 0 -> 0); refused below 0."""
    seconds = parse_duration(value) if isinstance(value, str) else (value or 0)
    if seconds < 0:
        raise InvalidRequest(f"{what} must be 0 (none) or more, got {value!r}")
    return seconds


def release(allocation_id: str) -> Op[pb.ReleaseResponse, bool]:
    """End an allocation. False when it was not live (already released or expired)."""
    # One id per call, the same in each attempt: an attempt sent again after its answer was lost
    # is still told True when an earlier one ended the allocation.
    request = build(lambda: pb.ReleaseRequest(allocation_id=allocation_id, release_id=uuid.uuid4().hex))
    return Op("Release", request, pb.ReleaseResponse, lambda r: r.released)


def cancel_request(request_id: str, ttl: int | str | None = None) -> Op[pb.CancelRequestResponse, str]:
    """Give up a request by its request id: the allocation it holds (if any) is released, and no
    attempt of it still in flight on any coordinator can commit afterwards. Returns the id of the
    allocation released ("" when it held none). ``ttl``: the TTL the request asked for (sizes how
    long the coordinators refuse the id). The client sends this itself when an allocate ends
    with an unknown outcome."""
    request = build(lambda: pb.CancelRequestRequest(request_id=request_id, ttl_seconds=_seconds(ttl, "ttl")))
    return Op("CancelRequest", request, pb.CancelRequestResponse, lambda r: r.released_allocation_id)


# Seconds the client keeps trying to cancel a request whose allocate ended with an unknown outcome.
CANCEL_BUDGET_S = 10.0
UNKNOWN_OUTCOME = (Unavailable, DeadlineExceeded)


def abandoned(op: Op[M, T], exc: GpuLeaseError) -> Op[pb.CancelRequestResponse, str] | None:
    """The CancelRequest for an allocate ``op`` that ended with an unknown outcome (None for other ops,
    and when no attempt reached a coordinator): an attempt may still commit on a coordinator the
    client moved on from, and nobody would hold it."""
    if op.rpc not in ("Allocate", "WaitAllocate") or not isinstance(op.request, pb.AllocateRequest):
        return None
    if not exc.maybe_sent:
        return None
    return cancel_request(op.request.request_id, op.request.ttl_seconds or None)


def after_cancel(exc: GpuLeaseError, op: Op[M, T], cancel_error: GpuLeaseError | None) -> GpuLeaseError:
    """``exc``, saying what the cancel that followed it achieved."""
    rid = op.request.request_id if isinstance(op.request, pb.AllocateRequest) else "?"
    if cancel_error is None:
        tail = (f"; the client cancelled request {rid}, so nothing it may have allocated is held: retry with a new "
                "request id")  # fmt: skip
    else:
        tail = (f"; cancelling request {rid} failed too ({cancel_error.message}): retry with the same request id "
                "to get what it may have allocated, or cancel it (cancel_request) later")  # fmt: skip
    return type(exc)(exc.message + tail)


def keep_alive(
    allocation_id: str, on_preemption: Callable[[AllocationPreempted], None] | None = None
) -> Op[pb.KeepAliveResponse, int]:
    """Refresh an allocation's lease; returns the remaining TTL in seconds. An allocation chosen
    as a preemption victim is still renewed until its deadline; ``on_preemption`` hears of it."""
    request = build(lambda: pb.KeepAliveRequest(allocation_id=allocation_id))

    def ttl(r: pb.KeepAliveResponse) -> int:
        if on_preemption is not None and r.HasField("preemption"):
            p = r.preemption
            why = f"allocation {allocation_id} is being preempted: {p.reason}; its lease is revoked at "
            why += _clock(p.deadline_unix_ms)
            on_preemption(AllocationPreempted(why, by=p.by, cause=p.cause, deadline_unix_ms=p.deadline_unix_ms))
        return r.ttl_seconds

    return Op("KeepAlive", request, pb.KeepAliveResponse, ttl)


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(ms / 1000))


def get_allocation(allocation_id: str) -> Op[pb.GetAllocationResponse, AllocationInfo]:
    """A handle on a live allocation (e.g. made by another process); AllocationNotFound if none."""
    request = build(lambda: pb.GetAllocationRequest(allocation_id=allocation_id))
    return Op(
        "GetAllocation", request, pb.GetAllocationResponse, lambda r: _convert.allocation(r.allocation), handles=True
    )


def list_allocations(node: str = "", owner: str = "") -> Op[pb.ListAllocationsResponse, list[AllocationInfo]]:
    """Live allocations, optionally only those on ``node`` and/or of ``owner``."""
    request = build(lambda: pb.ListAllocationsRequest(node=node, owner=owner))
    return Op("ListAllocations", request, pb.ListAllocationsResponse, _allocations_of, handles=True)


# --- the cluster ----------------------------------------------------------------------------------


def list_pending() -> Op[pb.ListPendingResponse, list[PendingInfo]]:
    """Requests waiting in the queue, in order per pool, each with its position and reason (a user
    sees its own tenant's)."""
    return Op("ListPending", pb.ListPendingRequest(), pb.ListPendingResponse,
              lambda r: [_convert.pending(m) for m in r.pending])  # fmt: skip


def list_nodes() -> Op[pb.ListNodesResponse, list[Node]]:
    """Every registered node, with its GPUs and what is allocated on it."""
    return Op("ListNodes", pb.ListNodesRequest(), pb.ListNodesResponse, lambda r: [_convert.node(n) for n in r.nodes])


def cluster_summary() -> Op[pb.GetClusterSummaryResponse, ClusterSummary]:
    """Free and total resources per node, and over the nodes that are up."""
    return Op(
        "GetClusterSummary", pb.GetClusterSummaryRequest(), pb.GetClusterSummaryResponse, _convert.cluster_summary
    )


def cordon(node: str, cordoned: bool = True) -> Op[pb.CordonNodeResponse, Node]:
    """Exclude ``node`` from placement (``cordoned=False`` lets it take allocations again)."""
    request = build(lambda: pb.CordonNodeRequest(node=node, cordoned=cordoned))
    return Op("CordonNode", request, pb.CordonNodeResponse, lambda r: _convert.node(r.node))


def delete_node(name: str) -> Op[pb.DeleteNodeResponse, int]:
    """Remove a node's record (a decommissioned or mistyped node); the coordinator refuses one that
    is up or that a live allocation uses. Returns the etcd revision of the removal."""
    request = build(lambda: pb.DeleteNodeRequest(node=name))
    return Op("DeleteNode", request, pb.DeleteNodeResponse, lambda r: r.revision)


# --- quotas and priority classes ------------------------------------------------------------------


def list_quotas() -> Op[pb.ListQuotasResponse, list[QuotaInfo]]:
    """Each tenant's quota (its own or the default one), usage, borrowed GPUs, pending requests and
    fair-share usage; the default quota as tenant "*" when one is set. A user sees its own tenant."""
    return Op("ListQuotas", pb.ListQuotasRequest(), pb.ListQuotasResponse,
              lambda r: [_convert.quota_info(t) for t in r.tenants])  # fmt: skip


def set_quota(
    tenant: str,
    gpus: int | None = None,
    models: Mapping[str, int] | None = None,
    cpus: int | None = None,
    memory: int | str | None = None,
    borrow: int = 0,
    max_lifetime: int | str | None = None,
    weight: float = 0.0,
) -> Op[pb.SetQuotaResponse, Quota]:
    """Set ``tenant``'s quota (admins only), replacing the one it had: "*" sets the default quota
    of tenants without their own. None leaves a limit out (unlimited).

    ``gpus``: nominal GPUs overall; ``models``: nominal GPUs per model (exact model name);
    ``borrow``: GPUs it may use above nominal out of capacity others leave unused (reclaimable by
    preemption); ``cpus`` and ``memory`` ("64GiB"): hard caps; ``max_lifetime`` ("24h"): an
    allocation's lease is not renewed past this age (None or 0: no limit); ``weight``: fair-share
    weight (0: the nominal GPUs, or 1 without them). Range checks are the coordinator's.
    """
    memory_bytes = size(memory, "memory")
    lifetime = _seconds_or_none(max_lifetime, "max_lifetime")
    quota = build(
        lambda: pb.Quota(
            tenant=tenant,
            gpus=gpus,
            models=dict(models or {}),
            cpus=cpus,
            memory_bytes=memory_bytes,
            borrow=borrow,
            max_lifetime_seconds=lifetime,
            weight=weight,
        )
    )
    return Op("SetQuota", pb.SetQuotaRequest(quota=quota), pb.SetQuotaResponse, lambda r: _convert.quota(r.quota))


def delete_quota(tenant: str) -> Op[pb.DeleteQuotaResponse, bool]:
    """Remove ``tenant``'s own quota (admins only; "*": the default one). The tenant then falls
    under the default quota, if any. False when it had none."""
    request = build(lambda: pb.DeleteQuotaRequest(tenant=tenant))
    return Op("DeleteQuota", request, pb.DeleteQuotaResponse, lambda r: r.deleted)


def list_reservations() -> Op[pb.ListReservationsResponse, list[ReservationInfo]]:
    """Calendar reservations, by start (ended ones until they are cleaned up, shortly after their end)."""
    return Op("ListReservations", pb.ListReservationsRequest(), pb.ListReservationsResponse,
              lambda r: [_convert.reservation(x) for x in r.reservations])  # fmt: skip


def create_reservation(
    name: str,
    tenant: str,
    gpus: int,
    end: str | float,
    start: str | float = "now",
    nodes: Sequence[str] = (),
    gpu_model: str = "",
) -> Op[pb.CreateReservationResponse, ReservationInfo]:
    """Hold ``gpus`` GPUs (of ``gpu_model``) for ``tenant`` from ``start`` to ``end`` (admins only):
    other tenants are not placed on them in that window. ``start``/``end``: ISO-8601
    ("2026-12-01T18:00Z"), "now", "+2h", or Unix seconds. ``nodes``: where (empty: the coordinator
    picks the best fit, fewest nodes). The coordinator refuses an end at or before the start, a
    window in the past, and more GPUs than the nodes have."""
    now = time.time()
    start_ms, end_ms = _instant(start, now, "start"), _instant(end, now, "end")
    request = build(lambda: pb.CreateReservationRequest(name=name, tenant=tenant, gpus=gpus, nodes=list(nodes),
                                                        gpu_model=gpu_model, start_unix_ms=start_ms,
                                                        end_unix_ms=end_ms))  # fmt: skip
    return Op("CreateReservation", request, pb.CreateReservationResponse,
              lambda r: _convert.reservation(r.reservation))  # fmt: skip


def delete_reservation(name: str) -> Op[pb.DeleteReservationResponse, bool]:
    """Remove a reservation (admins only); False when there was none."""
    request = build(lambda: pb.DeleteReservationRequest(name=name))
    return Op("DeleteReservation", request, pb.DeleteReservationResponse, lambda r: r.deleted)


def _instant(value: str | float, now: float, what: str) -> int:
    if isinstance(value, str):
        return parse_instant(value, now)
    if value < 0:
        raise InvalidRequest(f"{what} must be a time, got {value!r}")
    return int(value * 1000)


def list_priority_classes() -> Op[pb.ListPriorityClassesResponse, list[PriorityClassInfo]]:
    """The priority classes in force (configured, and those set over them), highest value first."""
    return Op("ListPriorityClasses", pb.ListPriorityClassesRequest(), pb.ListPriorityClassesResponse,
              lambda r: [_convert.priority_class(c) for c in r.classes])  # fmt: skip


def set_priority_class(
    name: str,
    value: int,
    default: bool = False,
    grace: int | str | None = None,
    min_runtime: int | str | None = None,
) -> Op[pb.SetPriorityClassResponse, PriorityClassInfo]:
    """Define or change a priority class (admins only): higher ``value`` goes first in the queue and
    may preempt lower preemptible work. ``default``: the class of requests that name none (the
    former default loses the mark). ``grace`` ("30s"): how long a preempted allocation of this
    class runs between notice and revocation (None: the coordinator's, 30 s). ``min_runtime``
    ("10m"): an allocation of this class is never preempted younger than this (None or 0: none).
    """
    grace_seconds = _seconds(grace, "grace")
    min_runtime_seconds = _seconds_or_none(min_runtime, "min_runtime")
    klass = build(
        lambda: pb.PriorityClass(
            name=name,
            value=value,
            is_default=default,
            preemption_grace_seconds=grace_seconds,
            min_runtime_seconds=min_runtime_seconds,
        )
    )
    request = pb.SetPriorityClassRequest(priority_class=klass)
    return Op("SetPriorityClass", request, pb.SetPriorityClassResponse,
              lambda r: _convert.priority_class(r.priority_class))  # fmt: skip


def delete_priority_class(name: str) -> Op[pb.DeletePriorityClassResponse, bool]:
    """Remove a priority class set with set_priority_class (admins only); NotFound when none of
    that name is stored (configured classes are changed in the coordinator's settings)."""
    request = build(lambda: pb.DeletePriorityClassRequest(name=name))
    return Op("DeletePriorityClass", request, pb.DeletePriorityClassResponse, lambda r: r.deleted)


# --- who is asking, tokens and the audit log ------------------------------------------------------


def whoami() -> Op[pb.WhoAmIResponse, WhoAmI]:
    """Who the coordinator takes this client for: principal, role, tenant, and how it was identified."""
    return Op("WhoAmI", pb.WhoAmIRequest(), pb.WhoAmIResponse, _convert.whoami)


def _secret_and_info(response: pb.CreateTokenResponse) -> tuple[str, TokenInfo]:
    return response.token, _convert.token_info(response.info)


def create_token(
    name: str, role: str, *, tenant: str = "", ttl_seconds: int = 0
) -> Op[pb.CreateTokenResponse, tuple[str, TokenInfo]]:
    """Make a bearer token (admins only): ``role`` is "admin", "user" or "viewer"; ``tenant`` ""
    is the token's name; ``ttl_seconds`` 0 never expires.

    Returns (secret, info). The secret is shown this once (the coordinator keeps only its hash):
    hand it over, never log it. Not sent again after a failure that may have reached a coordinator
    (the secret of a token made then would be lost; the retry would find the name taken).
    """
    if ttl_seconds < 0:
        raise InvalidRequest(f"ttl_seconds must be 0 (never expires) or more, got {ttl_seconds}")
    request = build(lambda: pb.CreateTokenRequest(name=name, role=str(role), tenant=tenant, ttl_seconds=ttl_seconds))
    return Op("CreateToken", request, pb.CreateTokenResponse, _secret_and_info, resend_safe=False)


def list_tokens() -> Op[pb.ListTokensResponse, list[TokenInfo]]:
    """Every token's name, role, tenant, dates and creator (admins only); never a secret."""
    return Op(
        "ListTokens",
        pb.ListTokensRequest(),
        pb.ListTokensResponse,
        lambda r: [_convert.token_info(t) for t in r.tokens],
    )


def revoke_token(name: str) -> Op[pb.RevokeTokenResponse, bool]:
    """Revoke a token (admins only): every coordinator refuses it from then on (within about a
    second). True once revoked; NotFound when no token has that name (never made, or revoked)."""
    request = build(lambda: pb.RevokeTokenRequest(name=name))
    return Op("RevokeToken", request, pb.RevokeTokenResponse, lambda r: r.revoked)


def read_audit(
    *, since_unix_ms: int = 0, actor: str = "", limit: int = 0
) -> Op[pb.ReadAuditResponse, list[AuditEntry]]:
    """The audit log, oldest first (admins only): entries at or after ``since_unix_ms`` (0: the
    oldest kept), of ``actor`` only ("user:alice"; "": everyone), at most ``limit`` of the newest
    (0: the coordinator's default, 1000)."""
    request = build(lambda: pb.ReadAuditRequest(since_unix_ms=since_unix_ms, actor=actor, limit=limit))
    return Op("ReadAudit", request, pb.ReadAuditResponse, lambda r: [_convert.audit_entry(e) for e in r.entries])


# --- containers on an allocation's GPUs (the coordinator forwards to the node's agent) -------------


def run_container(
    allocation_id: str,
    image: str,
    command: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    volumes: Sequence[Volume] = (),
    working_dir: str = "",
    shm_size: int | str | None = None,
    name: str = "",
    timeout: float = RUN_TIMEOUT_S,
    node: str = "",
) -> Op[tpb.ContainerStatus, Container]:
    """Start a container on the allocation's GPUs, CPUs and memory; returns once it is running.
    ``node``: for a gang, the member node to run on ("" = the first member).

    volumes: "SRC:DST[:ro]" strings or (src, dst[, read_only]) tuples. ``timeout`` covers an
    image pull on the node. Not resent after an UNAVAILABLE that may have reached a coordinator.
    """
    if isinstance(command, str):
        # list("echo hi") would be ['e', 'c', 'h', ...]: refuse rather than run nonsense.
        raise InvalidRequest(f"command {command!r}: pass a list of arguments, e.g. ['sh', '-c', {command!r}]")
    spec = build(
        lambda: tpb.ContainerSpec(
            image=image,
            command=list(command),
            env=dict(env or {}),
            working_dir=working_dir,
            volumes=[volume(v) for v in volumes],
            shm_size_bytes=size(shm_size, "shm_size") or 0,
            name=name,
        )
    )
    request = build(lambda: pb.RunContainerRequest(allocation_id=allocation_id, spec=spec, node=node))
    timeout = _positive(timeout, "timeout")
    return Op("RunContainer", request, tpb.ContainerStatus, _convert.container, timeout=timeout, resend_safe=False)


def wait_container(allocation_id: str, container_id: str, timeout: float = 30.0) -> Op[tpb.ContainerStatus, Container]:
    """Block until the container exits or ``timeout`` seconds (1 to 300) pass; returns its status."""
    # The coordinator waits up to that long; the call's deadline is that plus the client's timeout.
    seconds = min(MAX_WAIT_S, max(1, int(timeout)))
    ref = build(lambda: tpb.ContainerRef(allocation_id=allocation_id, container_id=container_id))
    request = tpb.WaitContainerRequest(ref=ref, timeout_seconds=seconds)
    return Op("WaitContainer", request, tpb.ContainerStatus, _convert.container, waits=seconds)


def stop_container(allocation_id: str, container_id: str, grace: float = 10.0) -> Op[tpb.ContainerStatus, Container]:
    """SIGTERM, then SIGKILL after ``grace`` seconds. Stopping twice is harmless, so it is resent freely."""
    if not grace >= 0:
        raise InvalidRequest(f"grace must be 0 or more, got {grace:g}")
    ref = build(lambda: tpb.ContainerRef(allocation_id=allocation_id, container_id=container_id))
    request = build(lambda: tpb.StopContainerRequest(ref=ref, grace_seconds=int(grace)))
    return Op("StopContainer", request, tpb.ContainerStatus, _convert.container, waits=grace)


def list_containers(allocation_id: str) -> Op[tpb.ListContainersResponse, list[Container]]:
    """The allocation's containers, running and exited."""
    request = build(lambda: tpb.ListContainersRequest(allocation_id=allocation_id))
    return Op(
        "ListContainers", request, tpb.ListContainersResponse, lambda r: [_convert.container(c) for c in r.containers]
    )


def logs(allocation_id: str, container_id: str = "", *, follow: bool = False) -> StreamOp[tpb.LogChunk, LogChunk]:
    """The container's output in order; with ``follow``, until it exits (no deadline then).

    container_id "" means the allocation's only (or latest) container.
    """
    ref = build(lambda: tpb.ContainerRef(allocation_id=allocation_id, container_id=container_id))
    request = tpb.StreamLogsRequest(ref=ref, follow=follow)
    return StreamOp("StreamLogs", request, tpb.LogChunk, lambda c: LogChunk(c.stream, c.data), bounded=not follow)


def events(since: int = 0, *, follow: bool = False, types: Sequence[str] = ()) -> StreamOp[pb.ClusterEvent, Event]:
    """The cluster's events (allocated, released, expired, node_up, ...; see models.EVENT_TYPES) that
    the coordinator replica holds above revision ``since`` (0: all it holds), oldest first; with
    ``follow``, then new ones as they happen (no deadline then). ``types`` keeps only those (markers
    always come). A user sees its own tenant's events and node events; viewers and admins, all.
    To resume after a broken stream, pass since= the last event's revision."""
    request = build(lambda: pb.WatchEventsRequest(since_revision=since, follow=follow,
                                                  types=[_convert.event_type(t) for t in types]))  # fmt: skip
    return StreamOp("WatchEvents", request, pb.ClusterEvent, _convert.event, bounded=not follow)
