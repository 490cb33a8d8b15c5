"""Import rules from DEVELOPERS.md, checked on the source: which module may import what.

Only the store talks to etcd, only agent/inventory to NVML, only agent/runtime to Docker, and
the client side (what an Airflow worker installs) needs none of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("coordinator", "agent", "gpulease") for p in (ROOT / d).rglob("*.py") if "/v1/" not in str(p)]

# third-party module -> the only places allowed to import it (path prefixes relative to ROOT)
ALLOWED = {
    "etcd3aio": ("coordinator/store.py",),
    "pynvml": ("agent/inventory/",),
    "docker": ("agent/runtime",),
}
CLIENT_SIDE = ("gpulease/client/", "gpulease/cli/", "gpulease/errors.py", "gpulease/units.py")
SERVER_ONLY = ("etcd3aio", "pynvml", "docker", "coordinator", "agent", "grpc_health", "grpc_reflection")


def top_level_imports(path: Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_respect_module_boundaries(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    imports = top_level_imports(path)
    for module, allowed in ALLOWED.items():
        if module in imports:
            assert rel.startswith(allowed), f"{rel} imports {module}; only {allowed} may"
    if rel.startswith(CLIENT_SIDE):
        bad = imports & set(SERVER_ONLY)
        assert not bad, f"{rel} is client-side (installed on Airflow workers) but imports {sorted(bad)}"


def test_the_rule_sees_the_store() -> None:
    assert "etcd3aio" in top_level_imports(ROOT / "coordinator/store.py")


# Only agent/linux.py names the kernel's /proc and cgroup trees, so that each format read there has
# one parser: copies drift (the parent-PID and cgroup-line parsers had been written twice).
KERNEL_PATHS = ("/proc", "/sys/fs/cgroup")
KERNEL_MODULE = "agent/linux.py"


def kernel_path_literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(KERNEL_PATHS)
    ]


def test_only_the_linux_module_names_proc_and_cgroup_paths() -> None:
    offenders = {
        str(p.relative_to(ROOT)): found
        for p in SOURCES
        if str(p.relative_to(ROOT)) != KERNEL_MODULE and (found := kernel_path_literals(p))
    }
    assert not offenders, f"only {KERNEL_MODULE} may read /proc or cgroup files: {offenders}"
    assert kernel_path_literals(ROOT / KERNEL_MODULE), "the rule no longer sees the Linux module's paths"
