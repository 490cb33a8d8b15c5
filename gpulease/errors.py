"""Typed errors shared by the coordinator (which raises them) and the client (which re-raises them).

Nothing here imports grpc: Airflow code catches these without knowing about gRPC. The
coordinator's error catalog (coordinator/errors.py) maps each class to a gRPC status code
and sends ``reason`` in trailing metadata, so the client can rebuild the exact class even
where two classes share a status code (NOT_FOUND for allocations and nodes).
"""

from __future__ import annotations

# Trailing-metadata key that carries GpuLeaseError.reason.
REASON_METADATA_KEY = "gpulease-reason"


class GpuLeaseError(Exception):
    """Base class of every gpulease error. ``code`` is the gRPC status code name."""

    reason = "UNKNOWN"
    code = "UNKNOWN"
    # For the client: False when the failed call provably never reached a coordinator.
    maybe_sent = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(GpuLeaseError):
    """The request is malformed or out of range; fix the request, don't retry it."""

    reason = "INVALID_REQUEST"
    code = "INVALID_ARGUMENT"


class Unsatisfiable(GpuLeaseError):
    """No registered node could ever satisfy the request (e.g. more GPUs than any node has)."""

    reason = "UNSATISFIABLE"
    code = "FAILED_PRECONDITION"


class InsufficientResources(GpuLeaseError):
    """Nodes that could satisfy the request exist but lack free capacity now; retry later."""

    reason = "INSUFFICIENT_RESOURCES"
    code = "RESOURCE_EXHAUSTED"


class QuotaExceeded(InsufficientResources):
    """The tenant's quota is used up; a request that waits is admitted once the tenant's own
    allocations free enough of it. The message names the quota ("quota: team-a uses 8 of 8 A100")."""

    reason = "QUOTA_EXCEEDED"
    code = "RESOURCE_EXHAUSTED"


class AllocationNotFound(GpuLeaseError):
    """No live allocation has this id (never existed, released, or its lease expired)."""

    reason = "ALLOCATION_NOT_FOUND"
    code = "NOT_FOUND"


class NodeNotFound(GpuLeaseError):
    reason = "NODE_NOT_FOUND"
    code = "NOT_FOUND"


class NotFound(GpuLeaseError):
    """The named object (a token, say) does not exist."""

    reason = "NOT_FOUND"
    code = "NOT_FOUND"


class StaleFencingToken(GpuLeaseError):
    """The fencing token (allocation revision) no longer matches a live allocation."""

    reason = "STALE_FENCING_TOKEN"
    code = "FAILED_PRECONDITION"


class AllocationLost(GpuLeaseError):
    """The allocation's lease could not be kept alive and may have expired; its GPUs are gone."""

    reason = "ALLOCATION_LOST"
    code = "NOT_FOUND"


class RuntimeLimitReached(GpuLeaseError):
    """The allocation has run for its declared max runtime: its lease is no longer renewed."""

    reason = "MAX_RUNTIME_REACHED"
    code = "FAILED_PRECONDITION"


class LifetimeReached(RuntimeLimitReached):
    """The allocation is as old as its tenant's (or the cluster's) maximum lifetime: its lease is no
    longer renewed."""

    reason = "MAX_LIFETIME_REACHED"
    code = "FAILED_PRECONDITION"


class AllocationPreempted(GpuLeaseError):
    """The allocation was chosen to make room for a request of higher priority (or a tenant
    reclaiming its quota). ``by``, ``cause`` and ``deadline_unix_ms`` say which, why, and when its
    lease is revoked; its containers get SIGTERM at once. Queue again to continue later."""

    reason = "PREEMPTED"
    code = "ABORTED"

    def __init__(self, message: str, by: str = "", cause: str = "", deadline_unix_ms: int = 0) -> None:
        super().__init__(message)
        self.by = by
        self.cause = cause
        self.deadline_unix_ms = deadline_unix_ms


class Conflict(GpuLeaseError):
    """Too many concurrent commits raced for the same capacity; safe to retry."""

    reason = "CONFLICT"
    code = "ABORTED"


class PermissionDenied(GpuLeaseError):
    """The caller is known but may not do this; the message names the rule that refused it."""

    reason = "PERMISSION_DENIED"
    code = "PERMISSION_DENIED"


class Unauthenticated(GpuLeaseError):
    """No credential, or one the server does not accept (unknown, revoked or expired token;
    a certificate from another CA or naming no gpulease identity)."""

    reason = "UNAUTHENTICATED"
    code = "UNAUTHENTICATED"


class AlreadyExists(GpuLeaseError):
    """The name or request id is taken by something of a different shape; it is not handed over."""

    reason = "ALREADY_EXISTS"
    code = "ALREADY_EXISTS"


class RequestReleased(AlreadyExists):
    """The request id was released (or cancelled) a short while ago: an idempotency key names one
    request, so it does not allocate again until its tombstone expires. Use a new request id."""

    reason = "REQUEST_RELEASED"
    code = "ALREADY_EXISTS"


class RateLimited(GpuLeaseError):
    """This caller sent more requests than its rate allows; retry after a short wait."""

    reason = "RATE_LIMITED"
    code = "RESOURCE_EXHAUSTED"


class Unavailable(GpuLeaseError):
    """The coordinator, or the etcd behind it, cannot be reached."""

    reason = "UNAVAILABLE"
    code = "UNAVAILABLE"


class DeadlineExceeded(GpuLeaseError):
    reason = "DEADLINE_EXCEEDED"
    code = "DEADLINE_EXCEEDED"


class ContainerNotFound(GpuLeaseError):
    reason = "CONTAINER_NOT_FOUND"
    code = "NOT_FOUND"


class ImageUnavailable(GpuLeaseError):
    """The image is not on the node and could not be pulled (bad name, no registry access, ...)."""

    reason = "IMAGE_UNAVAILABLE"
    code = "FAILED_PRECONDITION"


class Internal(GpuLeaseError):
    reason = "INTERNAL"
    code = "INTERNAL"


ALL_ERRORS: tuple[type[GpuLeaseError], ...] = (
    InvalidRequest,
    Unsatisfiable,
    InsufficientResources,
    QuotaExceeded,
    AllocationNotFound,
    NodeNotFound,
    NotFound,
    StaleFencingToken,
    AllocationLost,
    RuntimeLimitReached,
    LifetimeReached,
    AllocationPreempted,
    Conflict,
    PermissionDenied,
    Unauthenticated,
    AlreadyExists,
    RequestReleased,
    RateLimited,
    Unavailable,
    DeadlineExceeded,
    ContainerNotFound,
    ImageUnavailable,
    Internal,
)

BY_REASON: dict[str, type[GpuLeaseError]] = {cls.reason: cls for cls in ALL_ERRORS}

# Fallback when a status carries no reason (e.g. raised by gRPC itself, not by our servicer).
BY_CODE: dict[str, type[GpuLeaseError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "OUT_OF_RANGE": InvalidRequest,
    "FAILED_PRECONDITION": Unsatisfiable,
    "RESOURCE_EXHAUSTED": InsufficientResources,
    "NOT_FOUND": AllocationNotFound,
    "ABORTED": Conflict,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAUTHENTICATED": Unauthenticated,
    "ALREADY_EXISTS": AlreadyExists,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}


def error_for(code: str, reason: str | None, message: str) -> GpuLeaseError:
    """Rebuild the typed error from a status code name and an optional reason."""
    cls = BY_REASON.get(reason or "") or BY_CODE.get(code, Internal)
    return cls(message)
