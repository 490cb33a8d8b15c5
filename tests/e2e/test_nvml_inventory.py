"""NvmlInventory against a fake libnvidia-ml.so.1 (tests/support/fakenvml/fake_nvml.c, built against nvml.h).

The code under test is never mocked: a subprocess loads the fake through the normal library search
(LD_LIBRARY_PATH), runs the real NvmlInventory (tests/support/fakenvml/runner.py) or the real agent
process, and the tests read what it reports.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpulease.agent.inventory.nvml import FOREIGN_MEMORY_THRESHOLD_BYTES, NO_NVML_ADVICE, TELEMETRY_REFRESH_S
from gpulease.cli import views
from gpulease.client import Gpu, Node
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import agent_pb2, agent_pb2_grpc
from tests.support import fakenvml, harness
from tests.support.fakenvml import FakeGpu, FakeNvml, FakeProcess

GiB = 2**30
MiB = 2**20
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 60
# Documented keys of `gpuctl nodes --json` (README / test_gpuctl_e2e) plus the extra foreign flag.
NODE_KEYS = {"name", "state", "address", "gpus", "cpus_total", "memory_total_bytes", "labels"}
NODE_GPU_KEYS = {"index", "uuid", "model", "memory_total_bytes", "healthy", "simulated", "foreign_processes"}

H100 = "NVIDIA H100 80GB HBM3"
PCI = ["00000000:18:00.0", "00000000:2A:00.0", "00000000:3B:00.0", "00000000:4C:00.0"]
SWITCH = "00000000:A1:00.0"


@dataclass(frozen=True)
class Libraries:
    full: Path
    minimal: Path


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Libraries:
    if fakenvml.find_compiler() is None:
        pytest.skip("no C compiler to build the fake NVML library")
    root = tmp_path_factory.mktemp("fakenvml")
    return Libraries(full=fakenvml.build(root / "full"), minimal=fakenvml.build(root / "minimal", minimal=True))


@dataclass
class Result:
    inventories: list[dict[str, Any]]
    stderr: str


def run_inventory(
    lib: Path, tmp_path: Path, nvml: FakeNvml | None, steps: Sequence[Mapping[str, Any]], **script: Any
) -> Result:
    """Runs tests/support/fakenvml/runner.py with the fake library; returns each collect's inventory."""
    config = nvml.write(tmp_path / "nvml.conf") if nvml is not None else None
    script_path = tmp_path / "script.json"
    script_path.write_text(json.dumps({"steps": list(steps), "sysfs_root": str(tmp_path / "sysfs"), **script}))
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.fakenvml.runner", str(script_path)],
        env=fakenvml.child_env(lib, config),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return Result([json.loads(line)["inventory"] for line in done.stdout.splitlines()], done.stderr)


def collect(ctx: Mapping[str, Any] | None = None, *, fresh: bool = False) -> dict[str, Any]:
    return {"collect": dict(ctx) if ctx is not None else None, "fresh": fresh}


def ctx(managed: Sequence[int] = (), allocated: Sequence[int] = ()) -> dict[str, list[int]]:
    return {"managed_pids": list(managed), "allocated_gpus": list(allocated)}


def num(doc: Mapping[str, Any], key: str) -> int:
    # proto3 JSON writes 64-bit integers as strings.
    return int(doc[key])


def h100(i: int, **kw: Any) -> FakeGpu:
    return FakeGpu(name=H100, uuid=f"GPU-{i:08x}-1111-2222-3333-444455556666", pci=PCI[i], memory_total=80 * GiB, **kw)


def four_gpus() -> FakeNvml:
    """GPU 0 and 1 share two direct NVLinks; 2 and 3 hang off one NVSwitch; 4 PCIe paths."""
    return FakeNvml(
        driver="550.54.15",
        cuda=12040,
        gpus=[
            h100(
                0,
                memory_used=3 * GiB,
                memory_reserved=512 * MiB,
                util=37,
                temp=41,
                power_mw=312_345,
                power_limit_mw=700_000,
                ecc=(3, 1),
                numa=0,
                affinity=[0xFFFF, 0xFFFF],
                nvlinks=[PCI[1], PCI[1], ""],
                processes=[FakeProcess(4242, 2 * GiB), FakeProcess(4242, 1 * GiB, "graphics")],
            ),
            h100(1, numa=0, affinity=[0xFFFF, 0xFFFF], nvlinks=[PCI[0], PCI[0]]),
            h100(2, numa=1, affinity=[0xFFFF0000, 0xFFFF0000], nvlinks=[SWITCH, SWITCH, SWITCH], mig=1),
            h100(3, numa=1, affinity=[0xFFFF0000, 0xFFFF0000], nvlinks=[SWITCH, SWITCH]),
        ],
        topology={
            (0, 1): fakenvml.TOPOLOGY_SINGLE,
            (0, 2): fakenvml.TOPOLOGY_SYSTEM,
            (0, 3): fakenvml.TOPOLOGY_SYSTEM,
            (1, 2): fakenvml.TOPOLOGY_SYSTEM,
            (1, 3): fakenvml.TOPOLOGY_SYSTEM,
            (2, 3): fakenvml.TOPOLOGY_HOSTBRIDGE,
        },
    )


def links(gpu: Mapping[str, Any]) -> dict[int, tuple[int, str]]:
    return {link.get("peer_index", 0): (link["nvlink_count"], link["common_ancestor"]) for link in gpu["links"]}


# -- the happy path -----------------------------------------------------------------------------


def test_every_field_from_nvml(fake_nvml: Libraries, tmp_path: Path) -> None:
    result = run_inventory(
        fake_nvml.full, tmp_path, four_gpus(), [collect(ctx(managed=[4242], allocated=[0]))], labels={"zone": "a"}
    )
    (inv,) = result.inventories
    assert inv["source"] == "nvml"
    assert inv["driver_version"] == "550.54.15"
    assert inv["cuda_version"] == "12.4"
    assert inv["hostname"] == "fakehost"
    assert inv["labels"] == {"zone": "a"}
    assert inv["cpus_total"] == 4 and num(inv, "memory_total_bytes") == 2**34
    assert [g["index"] for g in inv["gpus"]] == [0, 1, 2, 3]

    g0 = inv["gpus"][0]
    assert g0["uuid"] == "GPU-00000000-1111-2222-3333-444455556666"
    assert g0["model"] == H100
    assert num(g0, "memory_total_bytes") == 80 * GiB
    # v2 memory info: the driver's 512 MiB reservation is not "used".
    assert num(g0, "memory_used_bytes") == 3 * GiB
    assert g0["utilization_percent"] == 37
    assert g0["temperature_c"] == 41
    assert g0["power_draw_mw"] == 312_345
    assert g0["power_limit_mw"] == 700_000
    assert g0["pci_bus_id"] == PCI[0]
    assert g0["mig_mode"] == "disabled"
    assert num(g0, "ecc_errors_corrected") == 3 and num(g0, "ecc_errors_uncorrected") == 1
    assert g0["numa_node"] == 0
    assert g0["cpu_affinity"] == "0-15,64-79"
    assert g0["healthy"] is True and g0["health_detail"] == "" and g0["simulated"] is False
    # One process listed for compute and graphics is reported once, with the larger amount.
    assert g0["processes"] == [{"pid": 4242, "used_memory_bytes": str(2 * GiB), "gpulease_managed": True}]
    assert g0["foreign_processes"] is False and g0["foreign_detail"] == ""

    assert links(g0) == {1: (2, "single"), 2: (0, "system"), 3: (0, "system")}
    assert links(inv["gpus"][1]) == {0: (2, "single"), 2: (0, "system"), 3: (0, "system")}
    # Through the NVSwitch: as many links as the less connected GPU of the pair has to the switch.
    assert links(inv["gpus"][2]) == {0: (0, "system"), 1: (0, "system"), 3: (2, "hostbridge")}
    assert inv["gpus"][2]["mig_mode"] == "enabled"
    assert inv["gpus"][2]["numa_node"] == 1 and inv["gpus"][2]["cpu_affinity"] == "16-31,80-95"
    for g in inv["gpus"][1:]:
        assert g["healthy"] is True and g["processes"] == [] and g["foreign_processes"] is False, g
        assert num(g, "memory_used_bytes") == 0 and g["utilization_percent"] == 0
    assert "NVML unavailable" not in result.stderr


def test_numa_node_falls_back_to_the_pci_device_in_sysfs(fake_nvml: Libraries, tmp_path: Path) -> None:
    sysfs = tmp_path / "sysfs"
    # GPU 0: NVML has no NUMA node; the kernel knows the PCI device's node.
    dev = sysfs / "bus/pci/devices/0000:18:00.0"
    dev.mkdir(parents=True)
    (dev / "numa_node").write_text("1\n")
    # GPU 1: NVML's node is a CPU-less GPU-memory node (Grace Hopper): the PCI device's node wins.
    dev1 = sysfs / "bus/pci/devices/0000:2a:00.0"
    dev1.mkdir(parents=True)
    (dev1 / "numa_node").write_text("0\n")
    node4 = sysfs / "devices/system/node/node4"
    node4.mkdir(parents=True)
    (node4 / "cpulist").write_text("\n")
    nvml = FakeNvml(gpus=[h100(0), h100(1, numa=4), h100(2)])
    (inv,) = run_inventory(fake_nvml.full, tmp_path, nvml, [collect()]).inventories
    assert inv["gpus"][0]["numa_node"] == 1
    assert inv["gpus"][1]["numa_node"] == 0
    assert "numa_node" not in inv["gpus"][2]  # neither NVML nor sysfs know


# -- what NVML cannot tell stays unknown --------------------------------------------------------

TELEMETRY_KEYS = (
    "memory_used_bytes",
    "utilization_percent",
    "temperature_c",
    "power_draw_mw",
    "power_limit_mw",
    "ecc_errors_corrected",
    "ecc_errors_uncorrected",
    "numa_node",
)


def test_missing_functions_leave_fields_unset(fake_nvml: Libraries, tmp_path: Path) -> None:
    # The minimal build exports no optional symbol: pynvml raises NVMLError_FunctionNotFound.
    result = run_inventory(fake_nvml.minimal, tmp_path, four_gpus(), [collect(ctx())])
    (inv,) = result.inventories
    assert inv["source"] == "nvml" and inv["driver_version"] == "550.54.15"
    assert inv["cuda_version"] == ""
    assert len(inv["gpus"]) == 4
    for g in inv["gpus"]:
        assert g["healthy"] is True and g["health_detail"] == "", g
        assert g["uuid"] and g["model"] == H100 and num(g, "memory_total_bytes") == 80 * GiB
        assert g["pci_bus_id"]
        for key in TELEMETRY_KEYS[1:]:
            assert key not in g, (key, g)
        assert g["mig_mode"] == "" and g["cpu_affinity"] == "" and g["links"] == [] and g["processes"] == []
    # No v2 memory info: v1's "used" includes the driver's reservation.
    assert num(inv["gpus"][0], "memory_used_bytes") == 3 * GiB + 512 * MiB
    assert "Traceback" not in result.stderr


def test_functions_reporting_function_not_found_leave_fields_unset(fake_nvml: Libraries, tmp_path: Path) -> None:
    nvml = four_gpus()
    nvml.absent = [
        "nvmlSystemGetCudaDriverVersion",
        "nvmlDeviceGetNumaNodeId",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetPowerManagementLimit",
        "nvmlDeviceGetNvLinkState",
        "nvmlDeviceGetTopologyCommonAncestor",
    ]
    (inv,) = run_inventory(fake_nvml.full, tmp_path, nvml, [collect(ctx())]).inventories
    assert inv["cuda_version"] == ""
    for g in inv["gpus"]:
        assert g["healthy"] is True, g
        for key in ("numa_node", "temperature_c", "power_limit_mw"):
            assert key not in g, (key, g)
        assert g["links"] == []
        assert "utilization_percent" in g and "power_draw_mw" in g


def test_not_supported_leaves_fields_unset_on_that_gpu_only(fake_nvml: Libraries, tmp_path: Path) -> None:
    nvml = four_gpus()
    nvml.gpus[1].not_supported = [
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetPowerManagementLimit",
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetCpuAffinity",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
        "nvmlDeviceGetMemoryInfo_v2",
    ]
    (inv,) = run_inventory(fake_nvml.full, tmp_path, nvml, [collect(ctx())]).inventories
    g1 = inv["gpus"][1]
    assert g1["healthy"] is True and g1["health_detail"] == ""
    for key in ("utilization_percent", "temperature_c", "power_draw_mw", "power_limit_mw", "ecc_errors_corrected"):
        assert key not in g1, (key, g1)
    assert g1["mig_mode"] == "" and g1["cpu_affinity"] == "" and g1["processes"] == []
    assert num(g1, "memory_used_bytes") == 0  # v1 memory info still answers
    assert g1["numa_node"] == 0 and links(g1)[0] == (2, "single")
    g0 = inv["gpus"][0]
    assert g0["utilization_percent"] == 37 and g0["temperature_c"] == 41 and g0["mig_mode"] == "disabled"


# -- failing GPUs ------------------------------------------------------------------------------


def test_a_failing_gpu_is_unhealthy_and_the_others_are_fine(fake_nvml: Libraries, tmp_path: Path) -> None:
    nvml = four_gpus()
    nvml.gpus[1].fail_all = fakenvml.GPU_IS_LOST
    nvml.gpus[2].fail = {"nvmlDeviceGetUtilizationRates": fakenvml.UNKNOWN}
    nvml.gpus[3].fail_handle = fakenvml.GPU_IS_LOST
    result = run_inventory(fake_nvml.full, tmp_path, nvml, [collect(ctx(managed=[4242]))])
    (inv,) = result.inventories
    assert inv["source"] == "nvml" and [g["index"] for g in inv["gpus"]] == [0, 1, 2, 3]
    g0, g1, g2, g3 = inv["gpus"]

    assert g0["healthy"] is True and g0["utilization_percent"] == 37
    assert g1["healthy"] is False
    assert g1["health_detail"] == "nvmlDeviceGetUUID failed: GPU is lost"  # stops asking a lost GPU
    assert g2["healthy"] is False
    assert g2["health_detail"] == "nvmlDeviceGetUtilizationRates failed: Unknown Error"
    # Everything but the failing call is still reported for that GPU.
    assert g2["uuid"] and g2["temperature_c"] == 30 and "utilization_percent" not in g2
    assert g3["healthy"] is False and g3["health_detail"] == "nvmlDeviceGetHandleByIndex failed: GPU is lost"
    # No links to or from GPUs that cannot be asked.
    assert set(links(g0)) == {2} and set(links(g2)) == {0}


def test_a_gpu_lost_after_start_keeps_its_identity(fake_nvml: Libraries, tmp_path: Path) -> None:
    nvml = four_gpus()
    config = tmp_path / "nvml.conf"
    lost = four_gpus()
    lost.gpus[1].fail_all = fakenvml.GPU_IS_LOST
    steps = [collect(ctx()), {"config": lost.render(), "path": str(config)}, collect(ctx())]
    before, after = run_inventory(fake_nvml.full, tmp_path, nvml, steps).inventories
    g1 = after["gpus"][1]
    assert g1["healthy"] is False and "GPU is lost" in g1["health_detail"]
    assert g1["uuid"] == before["gpus"][1]["uuid"] and g1["model"] == H100 and g1["pci_bus_id"] == PCI[1]
    assert num(g1, "memory_total_bytes") == 80 * GiB
    assert "memory_used_bytes" not in g1 and "temperature_c" not in g1  # unknown now, at once


# -- no NVML at all ------------------------------------------------------------------------------


def _no_gpus(result: Result, reason: str) -> None:
    assert all(inv["source"] == "none" and inv["gpus"] == [] for inv in result.inventories), result.inventories
    assert all(inv["cpus_total"] == 4 and inv["hostname"] == "fakehost" for inv in result.inventories)
    lines = [line for line in result.stderr.splitlines() if "NVML unavailable" in line]
    expected = f"WARNING gpulease.agent.inventory.nvml: NVML unavailable ({reason}): {NO_NVML_ADVICE}"
    assert lines == [expected], result.stderr


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this host has a real libnvidia-ml")
def test_without_nvml_library_the_node_has_no_gpus(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    steps = [collect(ctx()), {"advance": 3600}, collect(ctx()), collect()]
    result = run_inventory(empty, tmp_path, None, steps)
    assert len(result.inventories) == 3
    _no_gpus(result, "libnvidia-ml.so.1 not found")
    assert "--simulate-gpus N" in result.stderr


def test_an_unloadable_nvml_library_means_no_gpus(tmp_path: Path) -> None:
    # A file the loader cannot use stops the search (so this holds even on a host with a driver).
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / fakenvml.LIBRARY_NAME).write_bytes(b"")
    result = run_inventory(broken, tmp_path, None, [collect(ctx()), {"advance": 3600}, collect(ctx())])
    _no_gpus(result, "libnvidia-ml.so.1 not found")


def test_nvml_init_failure_then_recovery(fake_nvml: Libraries, tmp_path: Path) -> None:
    failing = four_gpus()
    failing.init_error = fakenvml.DRIVER_NOT_LOADED
    config = tmp_path / "nvml.conf"
    steps = [
        collect(ctx()),
        {"advance": 10},
        collect(ctx()),  # no retry yet
        {"config": four_gpus().render(), "path": str(config)},
        {"advance": 60},
        collect(ctx()),
    ]
    result = run_inventory(fake_nvml.full, tmp_path, failing, steps)
    first, second, third = result.inventories
    _no_gpus(Result([first, second], result.stderr), "the NVIDIA kernel driver is not loaded")
    assert third["source"] == "nvml" and len(third["gpus"]) == 4
    assert "NVML is available now" in result.stderr


# -- XID events ----------------------------------------------------------------------------------


def agent_metrics(inventory: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """The agent's /metrics samples (name, gpu) for an inventory the runner printed."""
    from google.protobuf import json_format
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gpulease.agent.metrics import AgentCollector, IdleTracker, new_registry
    from gpulease.v1.types_pb2 import NodeInventory

    inv = json_format.ParseDict(inventory, NodeInventory())
    registry = new_registry(AgentCollector(lambda: inv, dict, lambda: None, IdleTracker(600)))
    text = generate_latest(registry).decode()
    return {
        (s.name, s.labels["gpu"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "gpu" in s.labels
    }


def test_a_critical_xid_marks_the_gpu_unhealthy(fake_nvml: Libraries, tmp_path: Path) -> None:
    config = tmp_path / "nvml.conf"
    injected = four_gpus()
    injected.gpus[1].xids = [79]
    injected.gpus[2].xids = [13]  # graphics engine exception: usually the program's fault
    steps = [collect(ctx()), {"config": injected.render(), "path": str(config)}, collect(ctx()), collect(ctx())]
    result = run_inventory(fake_nvml.full, tmp_path, four_gpus(), steps)
    before, after, again = result.inventories
    for g in before["gpus"]:
        assert g["healthy"] and num(g, "xid_errors") == 0 and "last_xid" not in g, g
    for inv in (after, again):  # each event is delivered once; the GPU stays unhealthy
        g0, g1, g2, g3 = inv["gpus"]
        assert not g1["healthy"], g1
        assert "XID 79 (GPU has fallen off the bus)" in g1["health_detail"], g1
        assert num(g1, "xid_errors") == 1 and g1["last_xid"] == 79
        assert g2["healthy"] and g2["health_detail"] == "" and num(g2, "xid_errors") == 1 and g2["last_xid"] == 13
        for g in (g0, g3):
            assert g["healthy"] and g["health_detail"] == "" and num(g, "xid_errors") == 0 and "last_xid" not in g
    assert "XID 79" in result.stderr and "Traceback" not in result.stderr

    metrics = agent_metrics(after)
    assert metrics[("gpulease_gpu_xid_errors_total", "1")] == 1
    assert metrics[("gpulease_gpu_last_xid", "1")] == 79
    assert metrics[("gpulease_gpu_healthy", "1")] == 0
    assert metrics[("gpulease_gpu_xid_errors_total", "0")] == 0
    assert ("gpulease_gpu_last_xid", "0") not in metrics
    assert metrics[("gpulease_gpu_healthy", "0")] == 1


def test_gpus_without_event_support_report_no_xids(fake_nvml: Libraries, tmp_path: Path) -> None:
    nvml = four_gpus()
    nvml.gpus[0].not_supported = ["nvmlDeviceRegisterEvents"]
    nvml.gpus[0].xids = [79]  # never delivered: GPU 0 is not registered
    nvml.gpus[1].xids = [48]
    (inv,) = run_inventory(fake_nvml.full, tmp_path, nvml, [collect(ctx())]).inventories
    g0, g1 = inv["gpus"][:2]
    assert g0["healthy"] and g0["health_detail"] == "" and "xid_errors" not in g0 and "last_xid" not in g0
    assert not g1["healthy"] and "XID 48 (double-bit ECC error)" in g1["health_detail"]
    assert ("gpulease_gpu_xid_errors_total", "0") not in agent_metrics(inv)

    # An old driver without the event functions at all: none reported, no warning.
    result = run_inventory(fake_nvml.minimal, tmp_path, nvml, [collect(ctx())])
    (inv,) = result.inventories
    for g in inv["gpus"]:
        assert g["healthy"] and "xid_errors" not in g and "last_xid" not in g, g
    assert "XID" not in result.stderr and "WARNING" not in result.stderr, result.stderr


# -- foreign processes ---------------------------------------------------------------------------


@pytest.fixture
def child_of_this_process() -> Iterator[int]:
    """A live process whose parent is this test process (a managed PID's child)."""
    with subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL) as child:
        try:
            yield child.pid
        finally:
            child.kill()
            child.wait(timeout=10)


def test_foreign_processes_and_memory_are_flagged(
    fake_nvml: Libraries, tmp_path: Path, child_of_this_process: int
) -> None:
    nvml = FakeNvml(
        gpus=[
            h100(0, memory_used=2 * GiB, processes=[FakeProcess(1234, 2 * GiB)]),
            h100(1, memory_used=4 * GiB),  # memory but no process NVML shows
            h100(2, memory_used=100 * MiB),  # below the threshold
            h100(3, memory_used=6 * GiB, processes=[FakeProcess(child_of_this_process, 6 * GiB)]),
        ]
    )
    steps = [
        collect(ctx()),  # nothing is ours, nothing allocated
        collect(ctx(managed=[1234, os.getpid()], allocated=[1])),  # all ours / allocated
        collect(None),  # no context: nothing is flagged
    ]
    unmanaged, managed, unknown = run_inventory(fake_nvml.full, tmp_path, nvml, steps).inventories

    g0, g1, g2, g3 = unmanaged["gpus"]
    assert g0["foreign_processes"] is True
    assert g0["foreign_detail"] == "pid 1234 (not started by gpulease) uses 2.0 GiB"
    assert g0["processes"] == [{"pid": 1234, "used_memory_bytes": str(2 * GiB), "gpulease_managed": False}]
    assert g1["foreign_processes"] is True
    assert g1["foreign_detail"] == "4.0 GiB of GPU memory in use while no gpulease allocation holds this GPU"
    assert g2["foreign_processes"] is False and g2["foreign_detail"] == ""
    assert g3["foreign_processes"] is True and f"pid {child_of_this_process} " in g3["foreign_detail"]
    assert all(g["healthy"] for g in unmanaged["gpus"])

    for g in managed["gpus"]:
        assert g["foreign_processes"] is False and g["foreign_detail"] == "", g
        assert all(p["gpulease_managed"] for p in g["processes"]), g
    # A child of a managed PID (a worker its container forked) is managed too.
    assert managed["gpus"][3]["processes"][0]["pid"] == child_of_this_process

    for g in unknown["gpus"]:
        assert g["foreign_processes"] is False and not any(p["gpulease_managed"] for p in g["processes"]), g


def test_memory_of_our_own_processes_on_an_unallocated_gpu_is_not_foreign(fake_nvml: Libraries, tmp_path: Path) -> None:
    # Just after a release the container may still be stopping: its memory is accounted to it.
    nvml = FakeNvml(gpus=[h100(0, memory_used=8 * GiB + 100 * MiB, processes=[FakeProcess(77, 8 * GiB)])])
    (inv,) = run_inventory(fake_nvml.full, tmp_path, nvml, [collect(ctx(managed=[77]))]).inventories
    assert inv["gpus"][0]["foreign_processes"] is False
    assert 100 * MiB < FOREIGN_MEMORY_THRESHOLD_BYTES


def test_many_foreign_processes_are_summarized(fake_nvml: Libraries, tmp_path: Path) -> None:
    nvml = FakeNvml(gpus=[h100(0, memory_used=GiB, processes=[FakeProcess(100 + i, None) for i in range(5)])])
    (inv,) = run_inventory(fake_nvml.full, tmp_path, nvml, [collect(ctx(allocated=[0]))]).inventories
    g = inv["gpus"][0]
    assert g["foreign_detail"] == (
        "pid 100 (not started by gpulease); pid 101 (not started by gpulease); "
        "pid 102 (not started by gpulease); and 2 more foreign processes"
    )
    assert all("used_memory_bytes" not in p for p in g["processes"])  # NVML_VALUE_NOT_AVAILABLE


# -- a stable inventory for the coordinator --------------------------------------------------------


def test_telemetry_is_held_so_heartbeats_do_not_resend_the_inventory(fake_nvml: Libraries, tmp_path: Path) -> None:
    config = tmp_path / "nvml.conf"

    def state(util: int, temp: int, power: int, used: int, pids: Sequence[tuple[int, int]] = ((4242, 2 * GiB),)) -> str:
        nvml = four_gpus()
        g = nvml.gpus[0]
        g.util, g.temp, g.power_mw, g.memory_used = util, temp, power, used
        g.processes = [FakeProcess(pid, memory) for pid, memory in pids]
        return nvml.render()

    def change(text: str) -> dict[str, str]:
        return {"config": text, "path": str(config)}

    steps = [
        collect(ctx()),  # 0: baseline
        change(state(40, 42, 315_000, 3 * GiB + 10 * MiB)),  # noise within the dead bands
        {"advance": TELEMETRY_REFRESH_S + 1},
        collect(ctx()),  # 1: not reported, however long it lasts
        change(state(95, 70, 650_000, 40 * GiB)),  # a real change after a quiet period...
        collect(ctx()),  # 2: ...is reported at once
        change(state(20, 50, 200_000, 10 * GiB)),  # another one within TELEMETRY_REFRESH_S...
        collect(ctx()),  # 3: ...is held
        collect(ctx(), fresh=True),  # 4: live values on request
        {"advance": TELEMETRY_REFRESH_S + 1},
        collect(ctx()),  # 5: reported once the refresh interval has passed
        change(state(20, 50, 200_000, 10 * GiB, [(4242, 2 * GiB), (5151, GiB)])),
        collect(ctx()),  # 6: a new process shows at once
    ]
    inv = run_inventory(fake_nvml.full, tmp_path, four_gpus(), steps).inventories
    assert inv[1] == inv[0]
    g = inv[2]["gpus"][0]
    assert (g["utilization_percent"], g["temperature_c"], g["power_draw_mw"]) == (95, 70, 650_000)
    assert num(g, "memory_used_bytes") == 40 * GiB
    assert inv[3] == inv[2]
    live = inv[4]["gpus"][0]
    assert (live["utilization_percent"], live["temperature_c"], live["power_draw_mw"]) == (20, 50, 200_000)
    assert num(live, "memory_used_bytes") == 10 * GiB
    assert inv[5]["gpus"][0] == live
    assert [p["pid"] for p in inv[6]["gpus"][0]["processes"]] == [4242, 5151]
    assert inv[6]["gpus"][0]["foreign_detail"].startswith("pid 4242 (not started by gpulease) uses 2.0 GiB; pid 5151")
    # Only GPU 0 ever changed.
    assert all(inv[6]["gpus"][i] == inv[0]["gpus"][i] for i in (1, 2, 3))


# -- gpuctl shows the flag -------------------------------------------------------------------------


def _client_gpu(index: int, *, foreign: bool = False, detail: str = "") -> Gpu:
    fields = {
        "index": index,
        "uuid": f"GPU-{index}",
        "model": H100,
        "memory_total_bytes": 80 * GiB,
        "healthy": True,
        "simulated": False,
        "health_detail": "",
    }
    gpu_type: Any = Gpu
    if "foreign_processes" not in Gpu.__dataclass_fields__:

        @dataclass(frozen=True)
        class GpuWithFlag(Gpu):  # a client model that carries the flag, as the coordinator sends it
            foreign_processes: bool = False
            foreign_detail: str = ""

        gpu_type = GpuWithFlag
    gpu: Gpu = gpu_type(**fields, foreign_processes=foreign, foreign_detail=detail)
    return gpu


def _client_node(gpus: tuple[Gpu, ...]) -> Node:
    return Node(
        name="gpu-a",
        state="up",
        address="127.0.0.1:1",
        gpus=gpus,
        cpus_total=8,
        memory_total_bytes=64 * GiB,
        labels={},
        hostname="gpu-a",
        cordoned=False,
        allocated_gpu_indexes=(),
        cpus_allocated=0,
        memory_allocated_bytes=0,
    )


def test_gpuctl_views_show_the_foreign_flag() -> None:
    detail = "pid 1234 (not started by gpulease) uses 2.0 GiB"
    node = _client_node((_client_gpu(0), _client_gpu(1, foreign=True, detail=detail), _client_gpu(2)))
    row = views.node_row(node)
    assert row[3] == f"3x {H100}, foreign processes on GPU 1"
    assert views.foreign_lines(node) == [f"gpu-a GPU 1: {detail}"]
    doc = views.node_json(node)
    assert set(doc) == NODE_KEYS
    for g in doc["gpus"]:
        assert set(g) == NODE_GPU_KEYS, g
    assert [g["foreign_processes"] for g in doc["gpus"]] == [False, True, False]
    clean = _client_node((_client_gpu(0),))
    assert views.node_row(clean)[3] == f"1x {H100}" and views.foreign_lines(clean) == []


# -- the real agent process with the fake NVML -----------------------------------------------------


def _gpuctl(coordinator: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "gpulease.cli.main", "--coordinator", coordinator, *args],
        env=procs.python_child_env(drop_prefixes=("GPULEASE_",)),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done
    return done


@pytest.mark.slow
@pytest.mark.parametrize("build", ["full", "minimal"])
def test_agent_process_reports_nvml_gpus(
    fake_nvml: Libraries, tmp_path: Path, local_cluster: LocalCluster, coordinator: harness.Coordinator, build: str
) -> None:
    # "minimal": an old driver without most functions; the agent runs all the same.
    nvml = four_gpus()
    nvml.gpus[1].processes = [FakeProcess(999_999, 3 * GiB)]  # not a gpulease process
    nvml.gpus[1].memory_used = 3 * GiB
    config = nvml.write(tmp_path / "nvml.conf")
    env = fakenvml.child_env(fake_nvml.full if build == "full" else fake_nvml.minimal, config)
    # No simulated GPUs: the agent reads the fake NVML. SERVING = registered.
    started = local_cluster.add_agent("nvml-node", None, coordinator=coordinator.address, env=env, timeout=30)
    agent, listen = started.process, started.address
    try:
        with grpc.insecure_channel(listen) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            reply = stub.GetInventory(agent_pb2.GetInventoryRequest(), timeout=10)
        inv = reply.inventory
        assert inv.source == "nvml" and inv.driver_version == "550.54.15"
        assert [g.uuid for g in inv.gpus] == [g.uuid for g in nvml.gpus]
        assert all(g.healthy and not g.simulated for g in inv.gpus)
        # No gpulease container runs: what uses GPUs 0 and 1 is foreign (by PID, or without the
        # process functions, by memory in use on an unallocated GPU).
        assert [g.foreign_processes for g in inv.gpus] == [True, True, False, False]
        if build == "full":
            assert inv.cuda_version == "12.4"
            assert inv.gpus[0].HasField("temperature_c") and inv.gpus[0].temperature_c == 41
            assert "pid 999999 (not started by gpulease)" in inv.gpus[1].foreign_detail
        else:
            assert inv.cuda_version == ""
            assert not inv.gpus[0].HasField("temperature_c") and not inv.gpus[0].processes
            assert inv.gpus[1].foreign_detail.endswith("in use while no gpulease allocation holds this GPU")
        harness.wait_nodes_up(coordinator.stub, {"nvml-node"})

        doc = json.loads(_gpuctl(coordinator.address, "nodes", "--json").stdout)
        (node,) = doc
        assert set(node) == NODE_KEYS
        assert [g["uuid"] for g in node["gpus"]] == [g.uuid for g in nvml.gpus]
        for g in node["gpus"]:
            assert NODE_GPU_KEYS - {"foreign_processes"} <= set(g) <= NODE_GPU_KEYS, g
        if "foreign_processes" in Gpu.__dataclass_fields__:
            assert [g["foreign_processes"] for g in node["gpus"]] == [True, True, False, False]
            out = _gpuctl(coordinator.address, "nodes").stdout
            assert re.search(r"foreign processes on GPUs 0,1", out), out
            assert f"nvml-node GPU 1: {inv.gpus[1].foreign_detail}" in out, out
        assert "NVML unavailable" not in agent.log_path.read_text()

        agent.popen.send_signal(signal.SIGTERM)
        assert agent.popen.wait(timeout=15) == 0
    finally:
        agent.stop()
