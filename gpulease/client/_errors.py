"""grpc.RpcError -> gpulease.errors: callers of the client never see gRPC exceptions."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from gpulease.errors import REASON_METADATA_KEY, DeadlineExceeded, GpuLeaseError, Unavailable, error_for

UNREACHABLE_HINT = "is gpulease-coordinator running? set --coordinator or GPULEASE_COORDINATOR"


def status_code(err: grpc.RpcError) -> grpc.StatusCode | None:
    # RpcError itself declares nothing; the errors raised by stubs are also grpc.Call objects.
    code = getattr(err, "code", None)
    return code() if callable(code) else None


def _details(err: grpc.RpcError) -> str:
    details = getattr(err, "details", None)
    text = details() if callable(details) else None
    return str(text) if text else ""


def reason_of(err: grpc.RpcError) -> str | None:
    """The gpulease reason the coordinator put in trailing metadata, if any."""
    trailing = getattr(err, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key == REASON_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def to_error(err: grpc.RpcError, target: str, timeout: float) -> GpuLeaseError:
    """Rebuild the typed error the coordinator raised (reason first, status code as fallback)."""
    code = status_code(err)
    code_name = code.name if code is not None else "UNKNOWN"
    reason = reason_of(err)
    details = _details(err)
    if code_name == "DEADLINE_EXCEEDED" and reason is None:
        # Our own deadline expired: say which coordinator was slow and for how long we waited.
        return DeadlineExceeded(f"the coordinator at {target} did not answer within {timeout:g}s")
    return error_for(code_name, reason, details or f"{code_name} from the coordinator at {target}")


def unavailable(errors: Sequence[tuple[str, grpc.RpcError]]) -> GpuLeaseError:
    """The error for a call where every target answered UNAVAILABLE (``errors``: target, error)."""
    tried = ", ".join(target for target, _ in errors)
    last_target, last = errors[-1]
    if reason_of(last) is not None:
        # The coordinator answered but is itself unable to serve (e.g. etcd is down): keep its words.
        return error_for("UNAVAILABLE", reason_of(last), f"{_details(last)} (tried {tried})")
    detail = _details(last)
    if not detail:
        suffix = ""
    elif len(errors) == 1:
        suffix = f" ({detail})"
    else:
        suffix = f" (last error, from {last_target}: {detail})"
    return Unavailable(f"cannot reach the gpulease coordinator at {tried}{suffix}; {UNREACHABLE_HINT}")
