"""The error catalog, re-exported: it lives in gpulease/grpc_errors.py, shared with the agent.

Servicer methods are wrapped with @grpc_errors. A GpuLeaseError becomes its status code plus
a machine-readable reason in trailing metadata (the client rebuilds the exact class from it).
Anything else is a bug: logged with its traceback, answered as INTERNAL, never a crash.
"""

from __future__ import annotations

from gpulease.common.grpc_errors import STATUS, grpc_errors, status_for

__all__ = ["STATUS", "grpc_errors", "status_for"]
