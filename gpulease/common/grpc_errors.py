"""The error catalog: the one place that maps domain errors to gRPC status codes.

Shared by the coordinator's and the agent's servicers (coordinator/errors.py re-exports it).
Servicer methods are wrapped with @grpc_errors. A GpuLeaseError becomes its status code plus
a machine-readable reason in trailing metadata (the client rebuilds the exact class from it).
Anything else is a bug: logged with its traceback and an error id, answered as INTERNAL with
that id only (an exception's text may name files, hosts or secrets: it stays in the server log).

Server-streaming methods use it too: write them as coroutines that call ``context.write``
(not as async generators), so that an error raised mid-stream still goes through the catalog.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from gpulease.errors import ALL_ERRORS, REASON_METADATA_KEY, GpuLeaseError

log = logging.getLogger(__name__)

STATUS: dict[type[GpuLeaseError], grpc.StatusCode] = {cls: getattr(grpc.StatusCode, cls.code) for cls in ALL_ERRORS}

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def status_for(exc: GpuLeaseError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def grpc_errors(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except GpuLeaseError as exc:
            context.set_trailing_metadata(((REASON_METADATA_KEY, exc.reason),))
            await context.abort(status_for(exc), exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            error_id = secrets.token_hex(6)
            log.exception("unexpected error in %s (error id %s)", fn.__name__, error_id)
            context.set_trailing_metadata(((REASON_METADATA_KEY, "INTERNAL"),))
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}; the server's log has the details)"
            )

    return wrapper  # type: ignore[return-value]


__all__ = ["STATUS", "grpc_errors", "status_for"]
