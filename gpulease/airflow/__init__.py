"""Apache Airflow provider for gpulease: allocate GPUs, run a container on them, always release."""

from __future__ import annotations

from typing import Any

from gpulease import __version__


def get_provider_info() -> dict[str, Any]:
    """Entry point `apache_airflow_provider`: how Airflow discovers the hook and connection type."""
    return {
        "package-name": "gpulease",
        "name": "gpulease",
        "description": "Allocate GPUs from a gpulease cluster and run containers on them.",
        "versions": [__version__],
        "connection-types": [
            {"connection-type": "gpulease", "hook-class-name": "gpulease.airflow.hooks.GpuLeaseHook"},
        ],
        "integrations": [{"integration-name": "gpulease", "external-doc-url": "https://example.invalid/gpulease"}],
        "operators": [{"integration-name": "gpulease", "python-modules": ["gpulease.airflow.operators"]}],
        "hooks": [{"integration-name": "gpulease", "python-modules": ["gpulease.airflow.hooks"]}],
        "triggers": [{"integration-name": "gpulease", "python-modules": ["gpulease.airflow.triggers"]}],
    }
