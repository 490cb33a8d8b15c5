"""The fake NVML library (fake_nvml.c): build it against NVIDIA's nvml.h, and write its configuration.

The library is loaded the way the real one is: pynvml dlopens "libnvidia-ml.so.1" through the normal
library search, so code under test runs in a subprocess with LD_LIBRARY_PATH naming the directory
of the fake and FAKE_NVML_CONFIG naming its configuration (see fake_nvml.c for the format).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"
BUILD_TIMEOUT_S = 120

# NVML error codes the tests use.
NOT_SUPPORTED = 3
DRIVER_NOT_LOADED = 9
GPU_IS_LOST = 15
UNKNOWN = 999

# nvmlGpuTopologyLevel_t
TOPOLOGY_SINGLE = 10
TOPOLOGY_HOSTBRIDGE = 30
TOPOLOGY_NODE = 40
TOPOLOGY_SYSTEM = 50


def find_nvml_header() -> Path:
    """nvml.h from the nvidia-nvml-dev wheel (site-packages/nvidia/<cuXX>/include/nvml.h)."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        found = sorted(Path(root).glob("*/include/nvml.h")) + sorted(Path(root).glob("include/nvml.h"))
        if found:
            return found[-1]
    raise FileNotFoundError(
        "nvml.h not found under site-packages/nvidia: install the dev extra (pip install -e '.[dev]', "
        "which brings nvidia-nvml-dev)"
    )


def find_compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(out_dir: Path, *, minimal: bool = False) -> Path:
    """Compile the fake into out_dir/libnvidia-ml.so.1; returns out_dir.

    minimal=True leaves out every optional function (the symbols do not exist, as with an older
    driver), so pynvml raises NVMLError_FunctionNotFound for them.
    """
    compiler = find_compiler()
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc, gcc or clang) to build the fake NVML library")
    header = find_nvml_header()
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [compiler, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Wno-deprecated-declarations"]
    argv += [*(["-DFAKE_MINIMAL"] if minimal else []), "-o", str(out_dir / LIBRARY_NAME)]
    argv += ["-I", str(header.parent), str(SOURCE)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"building the fake NVML failed ({' '.join(argv)}):\n{done.stdout}{done.stderr}")
    return out_dir


@dataclass
class FakeProcess:
    pid: int
    memory: int | None  # None = NVML_VALUE_NOT_AVAILABLE
    kind: str = "compute"


@dataclass
class FakeGpu:
    name: str
    uuid: str
    pci: str
    memory_total: int
    memory_used: int = 0
    memory_reserved: int = 0
    util: int = 0
    temp: int = 30
    power_mw: int = 60_000
    power_limit_mw: int = 700_000
    mig: int = 0
    ecc: tuple[int, int] = (0, 0)
    numa: int | None = None
    affinity: Sequence[int] = ()
    nvlinks: Sequence[str] = ()
    processes: Sequence[FakeProcess] = ()
    not_supported: Sequence[str] = ()
    fail: Mapping[str, int] = field(default_factory=dict)
    fail_all: int = 0
    fail_handle: int = 0
    # Critical-XID events, delivered once each, in order (append to inject more).
    xids: Sequence[int] = ()


@dataclass
class FakeNvml:
    gpus: Sequence[FakeGpu] = ()
    driver: str = "550.54.15"
    cuda: int = 12040
    init_error: int = 0
    absent: Sequence[str] = ()
    # (i, j) -> nvmlGpuTopologyLevel_t; symmetric; missing pairs answer NOT_SUPPORTED.
    topology: Mapping[tuple[int, int], int] = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"driver {self.driver}", f"cuda {self.cuda}", f"gpus {len(self.gpus)}"]
        if self.init_error:
            lines.append(f"init_error {self.init_error}")
        lines += [f"absent {fn}" for fn in self.absent]
        for i, g in enumerate(self.gpus):
            p = f"gpu {i}"
            lines += [f"{p} name {g.name}", f"{p} uuid {g.uuid}", f"{p} pci {g.pci}"]
            lines.append(f"{p} memory {g.memory_total} {g.memory_used} {g.memory_reserved}")
            lines += [f"{p} util {g.util}", f"{p} temp {g.temp}", f"{p} power {g.power_mw} {g.power_limit_mw}"]
            lines += [f"{p} mig {g.mig}", f"{p} ecc {g.ecc[0]} {g.ecc[1]}"]
            if g.numa is not None:
                lines.append(f"{p} numa {g.numa}")
            if g.affinity:
                lines.append(f"{p} affinity {','.join(f'{w:x}' for w in g.affinity)}")
            lines += [f"{p} nvlink {remote or '-'}" for remote in g.nvlinks]
            for proc in g.processes:
                memory = "-" if proc.memory is None else str(proc.memory)
                lines.append(f"{p} process {proc.kind} {proc.pid} {memory}")
            lines += [f"{p} not_supported {fn}" for fn in g.not_supported]
            lines += [f"{p} fail {fn} {code}" for fn, code in g.fail.items()]
            if g.fail_all:
                lines.append(f"{p} fail_all {g.fail_all}")
            if g.fail_handle:
                lines.append(f"{p} fail_handle {g.fail_handle}")
            lines += [f"{p} xid {code}" for code in g.xids]
        lines += [f"topo {i} {j} {level}" for (i, j), level in self.topology.items()]
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> Path:
        # Replace atomically: the library re-reads the file on every nvmlDeviceGetCount.
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.render())
        tmp.replace(path)
        return path


def child_env(lib_dir: Path, config: Path | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a child that loads the fake NVML from lib_dir (and nothing from the host)."""
    from gpulease.dev import procs

    env = procs.python_child_env(extra, drop_prefixes=("GPULEASE_", "FAKE_NVML_", "LD_LIBRARY_PATH"))
    env["LD_LIBRARY_PATH"] = str(lib_dir)
    if config is not None:
        env["FAKE_NVML_CONFIG"] = str(config)
    return env
