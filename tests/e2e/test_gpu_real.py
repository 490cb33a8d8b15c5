"""NvmlInventory on a real NVIDIA GPU, checked against nvidia-smi. Skipped without one."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from gpulease.agent.inventory import InventoryContext
from gpulease.agent.inventory.nvml import NvmlInventory

SMI_TIMEOUT_S = 60
MiB = 2**20
QUERY = "index,uuid,name,memory.total,driver_version"


def _nvidia_smi() -> list[list[str]] | None:
    """nvidia-smi's answer, one row per GPU; None when there is no working nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=SMI_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


SMI_ROWS = _nvidia_smi()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(SMI_ROWS is None, reason="needs a real NVIDIA GPU with a working nvidia-smi"),
]


@pytest.fixture
def source() -> Iterator[NvmlInventory]:
    inv = NvmlInventory()
    yield inv
    inv.close()


def test_nvml_inventory_matches_nvidia_smi(source: NvmlInventory) -> None:
    assert SMI_ROWS is not None
    inv = source.collect(InventoryContext())
    assert inv.source == "nvml", source.unavailable_reason
    assert len(inv.gpus) == len(SMI_ROWS)
    for gpu, (index, uuid, name, memory_mib, driver) in zip(inv.gpus, SMI_ROWS, strict=True):
        assert gpu.index == int(index)
        assert gpu.uuid == uuid
        assert gpu.model == name
        # nvidia-smi prints MiB, rounded down.
        assert gpu.memory_total_bytes // MiB == int(memory_mib)
        assert inv.driver_version == driver
        assert gpu.healthy, gpu.health_detail
        assert gpu.pci_bus_id
    assert inv.cuda_version.count(".") == 1


def test_real_gpus_report_telemetry_and_are_stable(source: NvmlInventory) -> None:
    first = source.collect(InventoryContext())
    second = source.collect(InventoryContext())
    for gpu in first.gpus:
        assert gpu.HasField("memory_used_bytes")
        assert gpu.memory_used_bytes <= gpu.memory_total_bytes
    # Back to back, the held telemetry makes two collects identical (no resend per heartbeat)...
    assert [g.uuid for g in first.gpus] == [g.uuid for g in second.gpus]
    assert [(g.memory_used_bytes, g.utilization_percent, g.temperature_c) for g in first.gpus] == [
        (g.memory_used_bytes, g.utilization_percent, g.temperature_c) for g in second.gpus
    ]
    # ...while fresh=True reads live values.
    live = source.collect(InventoryContext(), fresh=True)
    assert len(live.gpus) == len(first.gpus)
