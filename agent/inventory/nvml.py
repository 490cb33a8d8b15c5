"""Real GPUs, read from NVML (libnvidia-ml.so.1 through the nvidia-ml-py bindings).

This is the only module of the project that imports pynvml.

What NVML cannot tell is left unset, never guessed: a function the driver lacks
(NVMLError_FunctionNotFound), NVML_ERROR_NOT_SUPPORTED and NVML_ERROR_NO_PERMISSION leave their
field unset (proto3 ``optional``) or empty. Any other NVML error on one GPU marks that GPU
``healthy=false`` with ``health_detail`` naming the call that failed; the other GPUs and the host
facts are still reported. Without NVML at all (no library, no driver, a driver/library version
mismatch) the node reports 0 GPUs with ``source="none"`` and says why in ONE warning; the source
retries quietly every NVML_RETRY_S in case the driver comes up later.

Telemetry and the node record
-----------------------------
The coordinator keeps only static facts in its node record (coordinator/domain.py: GpuInfo) and
rewrites the record only when those change, so telemetry alone never costs an etcd write. But the
agent's registrar resends the whole inventory with every heartbeat whose ``collect()`` differs
from the last one sent, and ``foreign_detail`` (which names memory sizes) IS part of the record.
So ``collect()`` *holds* the fast-changing values (memory used, utilization, temperature, power
draw, ECC counts, per-process memory): a new sample replaces the reported one only when
TELEMETRY_REFRESH_S have passed since the last replacement AND some value moved beyond its dead
band, or at once when a value became known or unknown (a GPU stopped answering). An idle node
therefore reports the same inventory forever, and a busy one changes it at most once per
TELEMETRY_REFRESH_S. Everything else (GPUs appearing or failing, processes starting or ending,
the foreign flag, MIG mode) is reported at once.
``collect(ctx, fresh=True)`` returns the live sample instead, without touching the held one.

XID events
----------
Each GPU is registered for NVML's critical-XID events (one event set per GPU), and every collect
drains what arrived since the last one (nvmlEventSetWait_v2 with timeout 0). The GPU reports how
many XIDs it had since the agent started and the last code (``xid_errors``, ``last_xid``); a GPU
or driver without event support leaves both unset. An XID in CRITICAL_XIDS marks the GPU
``healthy=false`` with ``health_detail`` naming it, until the agent restarts (after the GPU reset
or the reboot those XIDs call for), so the coordinator stops handing it out.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpulease.agent.inventory import InventoryContext
from gpulease.agent.inventory.host import HostOnlyInventory
from gpulease.agent.linux import PROC_ROOT, format_cpulist, parent_pid, read_kernel_file
from gpulease.v1.types_pb2 import Gpu, GpuLink, GpuProcess, NodeInventory

try:  # the agent extra installs nvidia-ml-py; without it the node simply has no NVML
    import pynvml as _pynvml
except ImportError:  # pragma: no cover - exercised only on installs without the agent extra
    _pynvml = None

log = logging.getLogger(__name__)

MiB = 2**20
GiB = 2**30

# Fast-changing telemetry is re-reported at most this often (see the module docstring).
TELEMETRY_REFRESH_S = 30.0
# ...and only when it moved at least this far (or became known/unknown).
MEMORY_USED_BAND_BYTES = 256 * MiB
UTILIZATION_BAND_PERCENT = 10
TEMPERATURE_BAND_C = 3
POWER_BAND_MW = 10_000
# GPU memory in use while no allocation holds the GPU, and not accounted to a gpulease process,
# above which the GPU counts as used by something foreign. NVML's v2 memory info excludes the
# driver's own reservation, so an idle GPU reads a few MiB; one CUDA context alone takes more.
FOREIGN_MEMORY_THRESHOLD_BYTES = 256 * MiB
# Once flagged for memory, the flag clears only below half the threshold (no flapping at the edge).
FOREIGN_MEMORY_CLEAR_BYTES = FOREIGN_MEMORY_THRESHOLD_BYTES // 2
# How many foreign processes foreign_detail names before "and N more".
FOREIGN_DETAIL_MAX_PIDS = 3
# How often a node without NVML tries nvmlInit again (quietly).
NVML_RETRY_S = 60.0
# health_detail is capped by the coordinator at 1024 characters.
MAX_DETAIL_CHARS = 1000
# Bound on the parent-PID walk that makes children of managed processes managed too.
MAX_PROCESS_ANCESTORS = 64

NO_NVML_ADVICE = "reporting 0 GPUs; install the NVIDIA driver, or pass --simulate-gpus N for a simulated node"

_TOPOLOGY_LEVELS = {0: "internal", 10: "single", 20: "multiple", 30: "hostbridge", 40: "node", 50: "system"}
_NVLINK_DEVICE_TYPE_GPU = 0x00
_NVLINK_DEVICE_TYPE_SWITCH = 0x02
_DEFAULT_NVLINK_MAX_LINKS = 18

# XIDs after which the GPU itself needs attention (a reset, a drain or an RMA), after NVIDIA's
# "XID Errors" catalogue (docs.nvidia.com/deploy/xid-errors). Others that NVML also reports as
# critical (13 graphics engine exception, 31 MMU fault, 43 GPU stopped processing, 45 preemptive
# cleanup, ...) are usually a user program's fault: counted, but the GPU stays healthy.
CRITICAL_XIDS: Mapping[int, str] = {
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}
# nvmlEventTypeXidCriticalError (NVML's ABI).
_XID_EVENT = 0x8
# Bound on the events drained from one GPU's event set per collect.
MAX_XID_EVENTS_PER_COLLECT = 64

# Error codes (the values are NVML's ABI; pynvml names them NVML_ERROR_*).
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_INVALID_ARGUMENT = 2
_FUNCTION_NOT_FOUND = 13
_GPU_IS_LOST = 15
_RESET_REQUIRED = 16
_ARGUMENT_VERSION_MISMATCH = 25
_TIMEOUT = 10
_UNKNOWN_MEANS = frozenset({_NOT_SUPPORTED, _FUNCTION_NOT_FOUND, _NO_PERMISSION})
# After these, every further call on the GPU fails the same way: stop asking it.
_FATAL = frozenset({_GPU_IS_LOST, _RESET_REQUIRED})

_INIT_REASONS = {
    12: "libnvidia-ml.so.1 not found",
    9: "the NVIDIA kernel driver is not loaded",
    18: "driver/library version mismatch: the loaded nvidia kernel module and libnvidia-ml differ; "
    "reboot or reload the module after a driver upgrade",
    4: "no permission to open the NVIDIA devices (/dev/nvidia*)",
    28: "no GPU found",
}

PciKey = tuple[int, int, int]  # (domain, bus, device)


@dataclass(frozen=True)
class _Telemetry:
    memory_used: int | None = None
    utilization: int | None = None
    temperature: int | None = None
    power_draw: int | None = None
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None

    def known(self) -> tuple[bool, ...]:
        return tuple(getattr(self, f) is not None for f in self.__dataclass_fields__)

    def moved_from(self, old: _Telemetry) -> bool:
        """True when any value changed beyond its dead band, or became known or unknown."""
        pairs = (
            (self.memory_used, old.memory_used, MEMORY_USED_BAND_BYTES),
            (self.utilization, old.utilization, UTILIZATION_BAND_PERCENT),
            (self.temperature, old.temperature, TEMPERATURE_BAND_C),
            (self.power_draw, old.power_draw, POWER_BAND_MW),
            (self.ecc_corrected, old.ecc_corrected, 1),
            (self.ecc_uncorrected, old.ecc_uncorrected, 1),
        )
        for new, prev, band in pairs:
            if (new is None) != (prev is None):
                return True
            if new is not None and prev is not None and abs(new - prev) >= band:
                return True
        return False


@dataclass
class _Held:
    uuid: str
    at: float
    telemetry: _Telemetry
    process_memory: dict[int, int | None] = field(default_factory=dict)


@dataclass
class _XidWatch:
    """One GPU's XID event set and what it reported since the agent started."""

    uuid: str
    # None: not registered (yet, or again after nvmlInit); see `supported`.
    event_set: Any = None
    # None: registration not tried since nvmlInit; False: no event support (counts unknown).
    supported: bool | None = None
    count: int = 0
    last: int | None = None
    critical: int | None = None  # the last XID seen that is in CRITICAL_XIDS


@dataclass(frozen=True)
class _Static:
    """Facts that do not change while the driver is loaded; cached once read without errors."""

    uuid: str = ""
    name: str = ""
    memory_total: int = 0
    pci_bus_id: str = ""
    pci_key: PciKey | None = None
    numa_node: int | None = None
    cpu_affinity: str = ""
    # One entry per active NVLink: (remote PCI address, remote device type or None when unknown).
    nvlinks: tuple[tuple[PciKey | None, int | None], ...] = ()


@dataclass
class _Sample:
    index: int
    handle: Any
    errors: list[str]
    lost: bool
    static: _Static
    telemetry: _Telemetry
    power_limit: int | None = None
    mig_mode: str = ""
    # pid -> used memory (None = NVML does not say)
    processes: dict[int, int | None] = field(default_factory=dict)


class _Probe:
    """Calls NVML for one GPU: unknown -> None; a real error -> None and recorded in `errors`."""

    def __init__(self, nvml: Any, warn_once: Callable[[str], None]) -> None:
        self._nvml = nvml
        self._warn_once = warn_once
        self.errors: list[str] = []
        self.lost = False
        # True when the last call's answer was "unknown here" (missing function, NOT_SUPPORTED, ...).
        self.last_unknown = False

    def __call__(self, name: str, *args: Any, unknown: tuple[int, ...] = ()) -> Any:
        self.last_unknown = False
        if self.lost:
            return None
        fn = getattr(self._nvml, name, None)
        if fn is None:  # older bindings without this wrapper
            self.last_unknown = True
            return None
        try:
            return fn(*args)
        except self._nvml.NVMLError as e:
            code = getattr(e, "value", None)
            if code in _UNKNOWN_MEANS or code in unknown:
                self.last_unknown = True
                if code == _NO_PERMISSION:
                    self._warn_once(f"{name}: no permission (run the agent as root to read it); left unknown")
                return None
            self.errors.append(f"{name} failed: {_nvml_error_text(e)}")
            if code in _FATAL:
                self.lost = True
            return None
        except Exception as e:  # bindings/driver mismatch, undecodable text: this GPU's answer is suspect
            self.errors.append(f"{name} failed: {type(e).__name__}: {e}")
            return None


class NvmlInventory(HostOnlyInventory):
    """The node's real GPUs from NVML, plus the host facts of HostOnlyInventory.

    Safe to call from several threads (collects are serialized). ``clock``, ``sysfs_root`` and
    ``proc_root`` are parameters for tests.
    """

    def __init__(
        self,
        cpus: int | None = None,
        memory_bytes: int | None = None,
        labels: Mapping[str, str] | None = None,
        host: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sysfs_root: Path = Path("/sys"),
        proc_root: Path = PROC_ROOT,
    ) -> None:
        super().__init__(cpus=cpus, memory_bytes=memory_bytes, labels=labels, host=host)
        self._clock = clock
        self._sysfs = sysfs_root
        self._proc = proc_root
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._unavailable: str | None = None
        self._next_retry = 0.0
        self._static: dict[int, _Static] = {}
        self._ancestors: dict[tuple[str, str], str] = {}
        self._held: dict[int, _Held] = {}
        self._foreign_memory: set[int] = set()
        self._xids: dict[int, _XidWatch] = {}
        self._warned: set[str] = set()
        with self._lock:
            if self._init():
                log.info("reading GPUs from NVML (driver %s)", self._driver_version() or "unknown")

    @property
    def available(self) -> bool:
        return self._nvml is not None

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                for watch in self._xids.values():
                    self._free_event_set(watch)
                try:
                    self._nvml.nvmlShutdown()
                except Exception as e:
                    log.debug("nvmlShutdown failed: %s", e)
                self._nvml = None

    # -- NVML lifecycle -------------------------------------------------------------------------

    def _init(self) -> bool:
        """nvmlInit; on failure remember why, log it once, and schedule a quiet retry."""
        reason: str | None
        if _pynvml is None:
            reason = "the Python package nvidia-ml-py is not installed: pip install 'gpulease[agent]'"
        else:
            try:
                _pynvml.nvmlInit()
            except _pynvml.NVMLError as e:
                code = getattr(e, "value", None)
                reason = _INIT_REASONS.get(code) if isinstance(code, int) else None
                reason = reason or f"nvmlInit failed: {_nvml_error_text(e)}"
            except Exception as e:  # a broken library can fail in odd ways; never take the agent down
                reason = f"nvmlInit failed: {type(e).__name__}: {e}"
            else:
                reason = None
        if reason is None:
            self._nvml = _pynvml
            self._static.clear()
            self._ancestors.clear()
            for watch in self._xids.values():  # event sets do not outlive the NVML session
                watch.event_set, watch.supported = None, None
            return True
        self._set_unavailable(reason)
        return False

    def _set_unavailable(self, reason: str) -> None:
        """No NVML for now: report 0 GPUs, say why (once per distinct reason), retry later."""
        if reason != self._unavailable:
            log.warning("NVML unavailable (%s): %s", reason, NO_NVML_ADVICE)
        else:
            log.debug("NVML still unavailable (%s)", reason)
        self._unavailable = reason
        self._next_retry = self._clock() + NVML_RETRY_S

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def _driver_version(self) -> str:
        try:
            return _text(self._nvml.nvmlSystemGetDriverVersion())
        except Exception as e:
            if getattr(e, "value", None) not in _UNKNOWN_MEANS:
                self._warn_once(f"cannot read the driver version from NVML: {e}")
            return ""

    def _cuda_version(self) -> str:
        try:
            v = int(self._nvml.nvmlSystemGetCudaDriverVersion())
        except Exception as e:
            if getattr(e, "value", None) not in _UNKNOWN_MEANS:
                self._warn_once(f"cannot read the CUDA version from NVML: {e}")
            return ""
        # 12040 -> "12.4"
        return f"{v // 1000}.{(v % 1000) // 10}" if v > 0 else ""

    # -- collect --------------------------------------------------------------------------------

    def collect(self, ctx: InventoryContext | None = None, *, fresh: bool = False) -> NodeInventory:
        """The node's inventory. ``ctx`` names gpulease's PIDs and allocated GPUs; without it no GPU
        is flagged foreign. ``fresh`` returns live telemetry instead of the held values."""
        with self._lock:
            inventory = super().collect()
            if self._nvml is None and (self._clock() < self._next_retry or not self._init()):
                return inventory  # source "none", 0 GPUs
            try:
                count = int(self._nvml.nvmlDeviceGetCount())
            except Exception as e:
                # E.g. the driver was unloaded under us: start over with nvmlInit later.
                with contextlib.suppress(Exception):
                    self._nvml.nvmlShutdown()
                self._nvml = None
                self._set_unavailable(f"nvmlDeviceGetCount failed: {_nvml_error_text(e)}")
                return inventory
            if self._unavailable is not None:
                log.info("NVML is available now (it was not: %s): %d GPU(s)", self._unavailable, count)
                self._unavailable = None
            inventory.source = "nvml"
            inventory.driver_version = self._driver_version()
            inventory.cuda_version = self._cuda_version()
            if count != len(self._static) and any(i >= count for i in self._static):
                self._static.clear()
                self._ancestors.clear()
            samples = [self._sample(i) for i in range(count)]
            links = self._links(samples)
            now = self._clock()
            for s in samples:
                inventory.gpus.append(self._gpu(s, links.get(s.index, []), ctx, now, fresh))
            for gone in [i for i in self._held if i >= count]:
                del self._held[gone]
            for gone in [i for i in self._xids if i >= count]:
                self._free_event_set(self._xids.pop(gone))
            return inventory

    def _sample(self, index: int) -> _Sample:
        nvml = self._nvml
        probe = _Probe(nvml, self._warn_once)
        handle = probe("nvmlDeviceGetHandleByIndex", index)
        if handle is None:
            if not probe.errors:  # NO_PERMISSION: e.g. a container that was given only some /dev/nvidia*
                probe.errors.append("nvmlDeviceGetHandleByIndex: GPU not accessible (no permission or not supported)")
            return _Sample(index, None, probe.errors, True, _Static(), _Telemetry())
        static = self._static.get(index)
        if static is None:
            static = self._read_static(probe, handle)
            if not probe.errors:
                self._static[index] = static
        if not probe.lost:
            self._poll_xids(index, handle, static.uuid)

        mem_used: int | None = None
        memory = None
        v2 = _memory_v2_version(nvml)
        if v2 is not None:
            # v2 separates the driver's reservation from "used"; v1 counts it as used (hundreds of
            # MiB on recent drivers, which would make every idle GPU look used).
            memory = probe("nvmlDeviceGetMemoryInfo", handle, v2, unknown=(_ARGUMENT_VERSION_MISMATCH,))
        if memory is None and (v2 is None or probe.last_unknown):
            memory = probe("nvmlDeviceGetMemoryInfo", handle)
        if memory is not None:
            mem_used = int(memory.used)
            if not static.memory_total and memory.total:
                static = replace(static, memory_total=int(memory.total))
                if index in self._static:  # keep it for when the GPU stops answering
                    self._static[index] = static
        util = probe("nvmlDeviceGetUtilizationRates", handle)
        temperature = probe("nvmlDeviceGetTemperature", handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
        power = probe("nvmlDeviceGetPowerUsage", handle)
        limit = probe("nvmlDeviceGetEnforcedPowerLimit", handle)
        if limit is None and probe.last_unknown:
            limit = probe("nvmlDeviceGetPowerManagementLimit", handle)
        mig = probe("nvmlDeviceGetMigMode", handle)
        ecc = [
            probe("nvmlDeviceGetTotalEccErrors", handle, kind, getattr(nvml, "NVML_VOLATILE_ECC", 0))
            for kind in (0, 1)  # NVML_MEMORY_ERROR_TYPE_CORRECTED, _UNCORRECTED
        ]
        processes: dict[int, int | None] = {}
        for kind in ("Compute", "Graphics"):
            procs = probe(f"nvmlDeviceGet{kind}RunningProcesses_v3", handle)
            if procs is None and probe.last_unknown:
                procs = probe(f"nvmlDeviceGet{kind}RunningProcesses_v2", handle)
            for p in procs or []:
                pid = int(p.pid)
                used = None if p.usedGpuMemory is None else int(p.usedGpuMemory)
                # A process using the GPU for compute and graphics is listed twice.
                if pid in processes and processes[pid] is not None:
                    used = max(used or 0, processes[pid] or 0)
                processes[pid] = used
        telemetry = _Telemetry(
            memory_used=mem_used,
            utilization=None if util is None else int(util.gpu),
            temperature=None if temperature is None else int(temperature),
            power_draw=None if power is None else int(power),
            ecc_corrected=None if ecc[0] is None else int(ecc[0]),
            ecc_uncorrected=None if ecc[1] is None else int(ecc[1]),
        )
        return _Sample(
            index=index,
            handle=handle,
            errors=probe.errors,
            lost=probe.lost,
            static=static,
            telemetry=telemetry,
            power_limit=None if limit is None else int(limit),
            mig_mode="" if mig is None else ("enabled" if int(mig[0]) == 1 else "disabled"),
            processes=processes,
        )

    def _read_static(self, probe: _Probe, handle: Any) -> _Static:
        nvml = self._nvml
        uuid = _text(probe("nvmlDeviceGetUUID", handle) or "")
        name = _text(probe("nvmlDeviceGetName", handle) or "")
        pci = probe("nvmlDeviceGetPciInfo", handle)
        pci_bus_id = _text(pci.busId) if pci is not None else ""
        pci_key = _pci_key(pci)
        numa = probe("nvmlDeviceGetNumaNodeId", handle)
        numa_node = int(numa) if numa is not None and 0 <= int(numa) < 1 << 16 else None
        numa_node = self._numa_fallback(numa_node, pci_key)
        words = max(16, math.ceil((os.cpu_count() or 1) / 64))
        mask = probe("nvmlDeviceGetCpuAffinity", handle, words)
        cpu_affinity = format_cpulist(_affinity_cpus(int(w) for w in mask)) if mask is not None else ""
        nvlinks: list[tuple[PciKey | None, int | None]] = []
        max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", _DEFAULT_NVLINK_MAX_LINKS))
        for link in range(max_links):
            # Links past the GPU's own count answer INVALID_ARGUMENT or NOT_SUPPORTED: not there.
            state = probe("nvmlDeviceGetNvLinkState", handle, link, unknown=(_INVALID_ARGUMENT,))
            if state is None:
                if probe.last_unknown and link == 0:
                    break  # no NVLink at all (PCIe card, or the function is missing)
                continue
            if int(state) != 1:
                continue
            remote = probe("nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
            kind = probe("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
            nvlinks.append((_pci_key(remote), None if kind is None else int(kind)))
        return _Static(
            uuid=uuid,
            name=name,
            memory_total=0,
            pci_bus_id=pci_bus_id,
            pci_key=pci_key,
            numa_node=numa_node,
            cpu_affinity=cpu_affinity,
            nvlinks=tuple(nvlinks),
        )

    # -- XID events -----------------------------------------------------------------------------

    def _poll_xids(self, index: int, handle: Any, uuid: str) -> None:
        """Registers the GPU for critical-XID events once, then drains its event set."""
        watch = self._xids.get(index)
        if watch is None or watch.uuid != uuid:
            if watch is not None:
                self._free_event_set(watch)
            watch = self._xids[index] = _XidWatch(uuid)
        if watch.supported is None:
            self._register_xids(index, handle, watch)
        if watch.event_set is None:
            return
        nvml = self._nvml
        for _ in range(MAX_XID_EVENTS_PER_COLLECT):
            try:
                data = nvml.nvmlEventSetWait_v2(watch.event_set, 0)
            except nvml.NVMLError as e:
                code = getattr(e, "value", None)
                if code != _TIMEOUT:  # TIMEOUT: nothing new
                    self._warn_once(f"GPU {index}: nvmlEventSetWait failed: {_nvml_error_text(e)}; XIDs not watched")
                    self._free_event_set(watch)
                    watch.supported = False if code in _UNKNOWN_MEANS else None
                return
            except Exception as e:
                self._warn_once(f"GPU {index}: nvmlEventSetWait failed: {type(e).__name__}: {e}; XIDs not watched")
                self._free_event_set(watch)
                watch.supported = None
                return
            if not int(data.eventType) & _XID_EVENT:
                continue
            xid = int(data.eventData)
            watch.count += 1
            watch.last = xid
            if xid in CRITICAL_XIDS:
                watch.critical = xid
                log.warning("GPU %d (%s): XID %d (%s): marked unhealthy", index, uuid, xid, CRITICAL_XIDS[xid])
            else:
                log.info("GPU %d (%s): XID %d", index, uuid, xid)

    def _register_xids(self, index: int, handle: Any, watch: _XidWatch) -> None:
        """nvmlEventSetCreate + nvmlDeviceRegisterEvents; without event support `supported` is False,
        after another error it stays None (tried again next collect)."""
        nvml = self._nvml
        if not all(hasattr(nvml, f) for f in ("nvmlEventSetCreate", "nvmlDeviceRegisterEvents", "nvmlEventSetWait_v2")):
            watch.supported = False  # bindings too old for events
            return
        event_set = None
        try:
            event_set = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(handle, _XID_EVENT, event_set)
        except Exception as e:
            if event_set is not None:
                with contextlib.suppress(Exception):
                    nvml.nvmlEventSetFree(event_set)
            code = getattr(e, "value", None) if isinstance(e, nvml.NVMLError) else None
            if code in _UNKNOWN_MEANS:
                log.debug("GPU %d: no XID events: %s", index, _nvml_error_text(e))
                watch.supported = False
            else:
                self._warn_once(f"GPU {index}: cannot register for XID events: {_nvml_error_text(e)}")
            return
        watch.event_set, watch.supported = event_set, True

    def _free_event_set(self, watch: _XidWatch) -> None:
        if watch.event_set is not None and self._nvml is not None:
            try:
                self._nvml.nvmlEventSetFree(watch.event_set)
            except Exception as e:
                log.debug("nvmlEventSetFree failed: %s", e)
        watch.event_set = None

    def _numa_fallback(self, nvml_node: int | None, pci: PciKey | None) -> int | None:
        """NVML's NUMA node where it has one with CPUs, else the kernel's node of the PCI device.

        nvmlDeviceGetNumaNodeId answers only where the GPU's memory is itself a NUMA node (e.g.
        Grace Hopper): that node has no CPUs, and the CPUs nearest the GPU are the PCI device's node.
        """
        if nvml_node is not None:
            cpulist = read_kernel_file(self._sysfs / "devices/system/node" / f"node{nvml_node}" / "cpulist")
            if cpulist is None or cpulist:
                return nvml_node
        if pci is None:
            return nvml_node
        domain, bus, device = pci
        device_dir = self._sysfs / "bus/pci/devices" / f"{domain:04x}:{bus:02x}:{device:02x}.0"
        text = read_kernel_file(device_dir / "numa_node")
        try:
            node = int(text or "x")
        except ValueError:
            return nvml_node
        return node if node >= 0 else nvml_node

    def _links(self, samples: list[_Sample]) -> dict[int, list[GpuLink]]:
        """Each GPU's links to the others: NVLink count (direct, or through NVSwitches) and the
        PCIe common-ancestor level."""
        by_key = {s.static.pci_key: s.index for s in samples if s.static.pci_key is not None}
        switch_links = {s.index: _switch_links(s.static, by_key) for s in samples}
        result: dict[int, list[GpuLink]] = {}
        for s in samples:
            if s.handle is None or s.lost:
                continue
            links: list[GpuLink] = []
            for peer in samples:
                if peer.index == s.index or peer.handle is None or peer.lost:
                    continue
                direct = sum(1 for key, _ in s.static.nvlinks if key is not None and by_key.get(key) == peer.index)
                nvlinks = direct + min(switch_links[s.index], switch_links[peer.index])
                ancestor = self._ancestor(s, peer)
                if nvlinks or ancestor:
                    links.append(GpuLink(peer_index=peer.index, nvlink_count=nvlinks, common_ancestor=ancestor))
            result[s.index] = links
        return result

    def _ancestor(self, a: _Sample, b: _Sample) -> str:
        key = (a.static.uuid, b.static.uuid)
        cached = self._ancestors.get(key) if a.static.uuid and b.static.uuid else None
        if cached is not None:
            return cached
        try:
            level = _TOPOLOGY_LEVELS.get(int(self._nvml.nvmlDeviceGetTopologyCommonAncestor(a.handle, b.handle)), "")
        except Exception as e:
            # A pair call: its failure says nothing certain about either GPU, so it leaves health alone.
            if getattr(e, "value", None) not in _UNKNOWN_MEANS:
                log.debug("common ancestor of GPUs %d and %d: %s", a.index, b.index, e)
                return ""
            level = ""
        if a.static.uuid and b.static.uuid:
            self._ancestors[key] = level
        return level

    # -- one GPU as reported --------------------------------------------------------------------

    def _gpu(self, s: _Sample, links: list[GpuLink], ctx: InventoryContext | None, now: float, fresh: bool) -> Gpu:
        st = s.static
        watch = self._xids.get(s.index)
        if watch is not None and watch.uuid != st.uuid:
            watch = None
        errors = list(s.errors)
        if watch is not None and watch.critical is not None:
            errors.append(f"XID {watch.critical} ({CRITICAL_XIDS[watch.critical]}): the GPU needs a reset or service")
        gpu = Gpu(
            index=s.index,
            uuid=st.uuid,
            model=st.name,
            memory_total_bytes=st.memory_total,
            healthy=not errors,
            health_detail=_clip("; ".join(errors)),
            pci_bus_id=st.pci_bus_id,
            mig_mode=s.mig_mode,
            cpu_affinity=st.cpu_affinity,
            links=links,
        )
        if st.numa_node is not None:
            gpu.numa_node = st.numa_node
        if s.power_limit is not None:
            gpu.power_limit_mw = s.power_limit
        if watch is not None and watch.supported:
            gpu.xid_errors = watch.count
            _set_optional(gpu, "last_xid", watch.last)
        telemetry, process_memory = (s.telemetry, s.processes) if fresh else self._hold(s, now)
        _set_optional(gpu, "memory_used_bytes", telemetry.memory_used)
        _set_optional(gpu, "utilization_percent", telemetry.utilization)
        _set_optional(gpu, "temperature_c", telemetry.temperature)
        _set_optional(gpu, "power_draw_mw", telemetry.power_draw)
        _set_optional(gpu, "ecc_errors_corrected", telemetry.ecc_corrected)
        _set_optional(gpu, "ecc_errors_uncorrected", telemetry.ecc_uncorrected)

        managed = {pid: ctx is not None and self._managed(pid, ctx.managed_pids) for pid in s.processes}
        for pid in sorted(s.processes):
            proc = GpuProcess(pid=pid, gpulease_managed=managed[pid])
            _set_optional(proc, "used_memory_bytes", process_memory.get(pid))
            gpu.processes.append(proc)
        if ctx is not None:
            self._flag_foreign(gpu, s, ctx, managed, process_memory, update=not fresh)
        return gpu

    def _hold(self, s: _Sample, now: float) -> tuple[_Telemetry, dict[int, int | None]]:
        """The telemetry to report: the held sample unless it is stale and the new one moved."""
        held = self._held.get(s.index)
        if held is None or held.uuid != s.static.uuid:
            held = _Held(s.static.uuid, now, s.telemetry, dict(s.processes))
            self._held[s.index] = held
        elif s.telemetry.known() != held.telemetry.known() or (
            now - held.at >= TELEMETRY_REFRESH_S
            and (s.telemetry.moved_from(held.telemetry) or _processes_moved(s.processes, held.process_memory))
        ):
            # A value that became known or unknown (e.g. the GPU stopped answering) is reported at once.
            held.at, held.telemetry, held.process_memory = now, s.telemetry, dict(s.processes)
        else:
            # Processes come and go at once; those already known keep their held memory (unless it
            # became known or unknown).
            old = held.process_memory
            held.process_memory = {
                pid: old[pid] if pid in old and (old[pid] is None) == (used is None) else used
                for pid, used in s.processes.items()
            }
        return held.telemetry, held.process_memory

    def _managed(self, pid: int, managed: frozenset[int]) -> bool:
        """pid, or one of its ancestors, is a process of a gpulease container."""
        if not managed:
            return False
        current = pid
        for _ in range(MAX_PROCESS_ANCESTORS):
            if current in managed:
                return True
            if current <= 1:
                return False
            parent = parent_pid(current, self._proc)
            if parent is None or parent == current:
                return False
            current = parent
        return False

    def _flag_foreign(
        self,
        gpu: Gpu,
        s: _Sample,
        ctx: InventoryContext,
        managed: dict[int, bool],
        process_memory: dict[int, int | None],
        *,
        update: bool,
    ) -> None:
        reasons: list[str] = []
        foreign = sorted(pid for pid, ours in managed.items() if not ours)
        for pid in foreign[:FOREIGN_DETAIL_MAX_PIDS]:
            used = process_memory.get(pid)
            amount = f" uses {_size(used)}" if used is not None else ""
            reasons.append(f"pid {pid} (not started by gpulease){amount}")
        if len(foreign) > FOREIGN_DETAIL_MAX_PIDS:
            reasons.append(f"and {len(foreign) - FOREIGN_DETAIL_MAX_PIDS} more foreign processes")

        flagged = s.index in self._foreign_memory
        used_now = s.telemetry.memory_used
        memory_flag = False
        if s.index not in ctx.allocated_gpus and used_now is not None:
            ours = sum(used or 0 for pid, used in s.processes.items() if managed.get(pid))
            unaccounted = max(0, used_now - ours)
            limit = FOREIGN_MEMORY_CLEAR_BYTES if flagged else FOREIGN_MEMORY_THRESHOLD_BYTES
            memory_flag = unaccounted > limit
            if memory_flag and not foreign:
                # Rounded to 256 MiB so that the detail (part of the node record) stays put.
                shown = max(FOREIGN_MEMORY_THRESHOLD_BYTES, round(unaccounted / (256 * MiB)) * 256 * MiB)
                reasons.append(f"{_size(shown)} of GPU memory in use while no gpulease allocation holds this GPU")
        if update:
            if memory_flag:
                self._foreign_memory.add(s.index)
            else:
                self._foreign_memory.discard(s.index)
        if reasons:
            gpu.foreign_processes = True
            gpu.foreign_detail = _clip("; ".join(reasons))


# -- helpers ------------------------------------------------------------------------------------


def _processes_moved(new: Mapping[int, int | None], held: Mapping[int, int | None]) -> bool:
    for pid, used in new.items():
        old = held.get(pid)
        if (used is None) != (old is None):
            return True
        if used is not None and old is not None and abs(used - old) >= MEMORY_USED_BAND_BYTES:
            return True
    return False


@functools.cache
def _memory_v2_version(nvml: Any) -> int | None:
    """nvmlMemory_v2 where the bindings can pass it (nvmlDeviceGetMemoryInfo(handle, version))."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    try:
        takes_version = "version" in inspect.signature(nvml.nvmlDeviceGetMemoryInfo).parameters
    except (AttributeError, TypeError, ValueError):
        takes_version = False
    return int(version) if version is not None and takes_version else None


def _switch_links(static: _Static, gpu_addresses: Mapping[PciKey, int]) -> int:
    """Active NVLinks to an NVSwitch (HGX/DGX boards): through them the GPU reaches every other
    GPU on the switch fabric, so NVML shows no GPU as the remote end."""
    return sum(1 for key, kind in static.nvlinks if kind == _NVLINK_DEVICE_TYPE_SWITCH and key not in gpu_addresses)


def _set_optional(msg: Any, name: str, value: int | None) -> None:
    if value is not None:
        setattr(msg, name, value)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip("\x00").strip()
    return str(value).strip()


def _clip(text: str) -> str:
    text = "".join(ch if 32 <= ord(ch) != 127 else " " for ch in text)
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def _size(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


def _nvml_error_text(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:  # pynvml's __str__ itself calls into NVML for unknown codes
        return f"NVML error {getattr(e, 'value', '?')}"


def _pci_key(pci: Any) -> PciKey | None:
    if pci is None:
        return None
    try:
        return int(pci.domain), int(pci.bus), int(pci.device)
    except (AttributeError, TypeError, ValueError):
        return None


def _affinity_cpus(words: Iterable[int]) -> set[int]:
    """nvmlDeviceGetCpuAffinity's 64-bit mask words -> CPU numbers: [0xff, 0x3] -> {0..7, 64, 65}."""
    return {w * 64 + bit for w, word in enumerate(words) for bit in range(64) if word >> bit & 1}
