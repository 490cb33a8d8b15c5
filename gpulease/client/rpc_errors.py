"""grpc.RpcError -> gpulease.errors: callers of the client never see gRPC exceptions. Statuses are
decoded by gpulease.common.rpc_status (one rule for client, coordinator and agent); this module adds
what only the client needs: failover across addresses and which calls may be resent.

Also the one place that decides whether an UNAVAILABLE may be sent again (``should_retry``).
Works for both the sync errors and grpc.aio's AioRpcError: it only uses code(), details() and
trailing_metadata().
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from gpulease.common import rpc_status
from gpulease.common.rpc_status import details as _details
from gpulease.common.rpc_status import reason_of, status_code
from gpulease.errors import GpuLeaseError, Unavailable, error_for

UNREACHABLE_HINT = "is gpulease-coordinator running? set --coordinator or GPULEASE_COORDINATOR"

__all__ = [
    "connection_hint",
    "never_sent",
    "outcome_unknown",
    "reason_of",
    "should_retry",
    "status_code",
    "to_error",
    "unavailable",
]


# What gRPC says when a call failed before any coordinator got it: no connection could be made, or
# the name did not resolve. Anything else that is UNAVAILABLE without our reason metadata (a
# connection reset, a GOAWAY while the call was in flight) may come after the coordinator acted.
_NEVER_SENT = (
    "failed to connect to all addresses",
    "dns resolution failed",
    "errors resolving",
    "empty address list",
)


def never_sent(err: grpc.RpcError) -> bool:
    """True when ``err`` shows the call never reached a coordinator (so resending cannot duplicate it)."""
    if status_code(err) != grpc.StatusCode.UNAVAILABLE or reason_of(err) is not None:
        return False
    details = _details(err).lower()
    return any(marker in details for marker in _NEVER_SENT)


def should_retry(err: grpc.RpcError, resend_safe: bool) -> bool:
    """Whether to try ``err``'s call again (on this or another coordinator).

    Only UNAVAILABLE is retried. A call that is safe to resend (every idempotent one) is retried
    whatever caused it; any other only when it provably never reached a coordinator.
    """
    if status_code(err) != grpc.StatusCode.UNAVAILABLE:
        return False
    return resend_safe or never_sent(err)


def to_error(err: grpc.RpcError, target: str, timeout: float) -> GpuLeaseError:
    """Rebuild the typed error the coordinator raised (gpulease.common.rpc_status's one rule)."""
    return rpc_status.decode(err, f"the coordinator at {target}", deadline=timeout)


def outcome_unknown(err: grpc.RpcError, target: str, rpc: str) -> GpuLeaseError:
    """UNAVAILABLE for a call that must not be resent: it may or may not have taken effect."""
    if reason_of(err) is not None:
        # The coordinator's own answer (etcd or the node's agent unreachable): keep its class and words.
        return error_for(
            "UNAVAILABLE", reason_of(err), _details(err) or f"UNAVAILABLE from the coordinator at {target}"
        )
    detail = f" ({_details(err)})" if _details(err) else ""
    return Unavailable(
        f"the connection to the coordinator at {target} failed during {rpc}{detail}; it may or may not have "
        "taken effect, so it was not sent again"
    )


def connection_hint(detail: str, *, tls: bool = False, mutual: bool = False) -> str:
    """What to check, from gRPC's words for a connection that failed: a TLS mismatch reads like
    an unreachable coordinator unless said. ``tls``/``mutual``: how this client connects."""
    text = detail.lower()
    if "handshake" in text:
        if "wrong_version_number" in text:
            return "the coordinator does not speak TLS there: is --ca (GPULEASE_CA) meant for another address?"
        if "certificate_verify_failed" in text:
            return (
                "the coordinator's certificate is not signed by the CA in --ca (GPULEASE_CA), or does not name "
                "the address dialled"
            )
        return "the TLS handshake failed: check --ca, --cert and --key (GPULEASE_CA, GPULEASE_CERT, GPULEASE_KEY)"
    if "socket closed" in text:
        if not tls:
            return f"{UNREACHABLE_HINT}; if it serves TLS, give --ca or set GPULEASE_CA"
        if not mutual:
            return f"{UNREACHABLE_HINT}; a mutual-TLS port also needs --cert and --key"
    return UNREACHABLE_HINT


def unavailable(
    errors: Sequence[tuple[str, grpc.RpcError]], *, tls: bool = False, mutual: bool = False
) -> GpuLeaseError:
    """The error for a call where every target answered UNAVAILABLE (``errors``: target, error;
    ``tls``/``mutual``: how the client connects, for the hint)."""
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
    hint = connection_hint(detail, tls=tls, mutual=mutual)
    return Unavailable(f"cannot reach the gpulease coordinator at {tried}{suffix}; {hint}")
