"""NvmlInventory on a real NVIDIA GPU, checked against nvidia-smi. Skipped without one."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from gpulease.agent.inventory import InventoryContext
from gpulease.agent.inventory.nvml import NvmlInventory

SMI_TIMEOUT_S = 60
MiB = 2**20
# Bounded wait for a CUDA process to show in NVML (context creation takes ~1 s on a cold GPU).
PROCESS_SHOWS_S = 60
HELD_BYTES = 1024 * MiB
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


# A process outside gpulease that holds GPU memory: the driver API through ctypes, so that the check
# needs no framework on the GPU server. It prints "ready" once the memory is allocated and holds it
# until its stdin closes.
_HOLDER = r"""
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
for call, args in (("cuInit", (0,)), ("cuDeviceGet", (ctypes.byref(dev), 0)),
                   ("cuCtxCreate_v2", (ctypes.byref(ctx), 0, dev)),
                   ("cuMemAlloc_v2", (ctypes.byref(ptr), ctypes.c_size_t(int(sys.argv[1]))))):
    rc = getattr(cuda, call)(*args)
    if rc != 0:
        sys.exit(f"{call} failed with CUDA error {rc}")
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def foreign_process() -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(HELD_BYTES)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if line.strip() != "ready":
            pytest.fail(f"the CUDA holder did not start: {line!r} {holder.stderr.read() if holder.stderr else ''}")
        yield holder
    finally:
        holder.kill()
        holder.wait(30)


def test_a_process_outside_gpulease_marks_gpu_0_foreign(
    source: NvmlInventory, foreign_process: subprocess.Popen[str]
) -> None:
    """What the agent reports (and placement avoids) when something it did not start uses a GPU:
    the process by pid and memory; and nothing once the agent knows the pid as its own."""
    gpu = None
    deadline = time.monotonic() + PROCESS_SHOWS_S
    while time.monotonic() < deadline:
        gpu = source.collect(InventoryContext(), fresh=True).gpus[0]
        if any(p.pid == foreign_process.pid for p in gpu.processes):
            break
        time.sleep(0.5)
    assert gpu is not None
    pids = {p.pid: p for p in gpu.processes}
    assert foreign_process.pid in pids, f"NVML lists {sorted(pids)}, not the holder {foreign_process.pid}"
    assert not pids[foreign_process.pid].gpulease_managed
    assert gpu.foreign_processes
    assert f"pid {foreign_process.pid} (not started by gpulease)" in gpu.foreign_detail
    if pids[foreign_process.pid].HasField("used_memory_bytes"):
        assert pids[foreign_process.pid].used_memory_bytes >= HELD_BYTES

    # The same process as one of a gpulease container's, on the GPU its allocation holds.
    ours = InventoryContext(managed_pids=frozenset({foreign_process.pid}), allocated_gpus=frozenset({gpu.index}))
    mine = source.collect(ours, fresh=True).gpus[0]
    assert [p.gpulease_managed for p in mine.processes if p.pid == foreign_process.pid] == [True]
    assert not mine.foreign_processes, mine.foreign_detail
