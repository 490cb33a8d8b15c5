"""Import rules from DEVELOPERS.md, checked on the source: which module may import what.

Only the store talks to etcd, only agent/inventory to NVML, only agent/runtime to Docker, and
the client side (what an Airflow worker installs) needs none of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# gpulease/coordinator and gpulease/agent are symlinks to the top-level folders: read each file once.
SOURCES = sorted(
    p
    for d in ("coordinator", "agent", "gpulease")
    for p in (ROOT / d).rglob("*.py")
    if "/v1/" not in str(p) and not str(p.relative_to(ROOT)).startswith(("gpulease/coordinator/", "gpulease/agent/"))
)

# third-party module -> the only places allowed to import it (path prefixes relative to ROOT)
ALLOWED = {
    "etcd3aio": ("coordinator/store.py",),
    "pynvml": ("agent/inventory/",),
    "docker": ("agent/runtime",),
}
CLIENT_SIDE = ("gpulease/client/", "gpulease/cli/", "gpulease/errors.py", "gpulease/common/")
SERVER_ONLY = ("etcd3aio", "pynvml", "docker", "grpc_health", "grpc_reflection", "gpulease.coordinator",
               "gpulease.agent", "aiohttp", "prometheus_client")  # fmt: skip
# Shared by the two daemons only (their HTTP side); never imported by the client side.
DAEMON_SHARED = ("gpulease/common/httpserve.py",)
# Development-only code (LocalCluster, its child processes, `gpuctl dev`): it builds on the client
# library and gpuctl, never the other way round, and no daemon runs it. gpuctl reaches it from its
# `dev` command alone, imported there when that command runs (test below).
DEV = "gpulease.dev"
DEV_USERS = ("gpulease/dev/", "gpulease/cli/commands.py")


def top_level_imports(path: Path) -> set[str]:
    return {m.split(".")[0] for m in imported_modules(path)}  # imported_modules: below


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_respect_module_boundaries(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    imports = imported_modules(path)
    tops = {m.split(".")[0] for m in imports}
    for module, allowed in ALLOWED.items():
        if module in tops:
            assert rel.startswith(allowed), f"{rel} imports {module}; only {allowed} may"
    if rel.startswith(CLIENT_SIDE) and not rel.startswith(DAEMON_SHARED):
        bad = sorted(m for m in imports if _under(m, SERVER_ONLY))
        assert not bad, f"{rel} is client-side (installed on Airflow workers) but imports {bad}"
    if not rel.startswith(DEV_USERS):
        bad = sorted(m for m in imports if _under(m, (DEV,)))
        assert not bad, f"{rel} imports development-only code {bad}; only {DEV_USERS} may"
    # One namespace (issue 12, point 1): the daemons are gpulease.coordinator and gpulease.agent.
    assert not tops & {"coordinator", "agent"}, f"{rel} imports a top-level coordinator/agent package"


def test_the_rule_sees_the_store() -> None:
    assert "etcd3aio" in top_level_imports(ROOT / "coordinator/store.py")


def module_level_imports(path: Path) -> set[str]:
    """What ``path`` imports when it is imported: its top-level statements, not function bodies."""
    tree = ast.parse(path.read_text(), str(path))
    top = ast.Module(body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
    return imported_modules(path, ast.unparse(top))


def test_gpuctl_imports_the_dev_package_only_when_dev_runs() -> None:
    commands = ROOT / "gpulease/cli/commands.py"
    assert any(_under(m, (DEV,)) for m in imported_modules(commands)), "the rule no longer sees `gpuctl dev`"
    assert not any(_under(m, (DEV,)) for m in module_level_imports(commands)), (
        "gpulease/cli/commands.py imports gpulease.dev at module level: plain gpuctl would need the dev extras"
    )


# Only agent/linux.py names the kernel's /proc and cgroup trees, so that each format read there has
# one parser: copies drift (the parent-PID and cgroup-line parsers had been written twice).
KERNEL_PATHS = ("/proc", "/sys/fs/cgroup")
KERNEL_MODULE = "agent/linux.py"
# Names, not reads: the container policy lists /proc among the paths never bind-mounted.
NAMED_NOT_READ = {"gpulease/common/container_policy.py": ["/proc"]}


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
        if str(p.relative_to(ROOT)) != KERNEL_MODULE
        and (found := kernel_path_literals(p)) != NAMED_NOT_READ.get(str(p.relative_to(ROOT)), [])
    }
    assert not offenders, f"only {KERNEL_MODULE} may read /proc or cgroup files: {offenders}"
    assert kernel_path_literals(ROOT / KERNEL_MODULE), "the rule no longer sees the Linux module's paths"


# Tests are arranged as the code is (tests/unit, tests/etcd, tests/e2e) and share helpers only
# through tests/support: no test or helper imports another test module, the bench, or the client
# library's private modules (gpulease.client._*), so each tests what a user of the code can reach.
TEST_SOURCES = sorted((ROOT / "tests").rglob("*.py"))
TEST_FOLDERS = ("unit", "etcd", "e2e")


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names (relative imports resolved against its
    package); for ``from M import a`` both M and M.a, since ``a`` may be a module."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    mods: set[str] = set()
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*base, *(node.module.split(".") if node.module else ())))
            mods.add(module)
            mods.update(f"{module}.{a.name}" for a in node.names)
    return mods


def forbidden_in_tests(module: str) -> bool:
    parts = module.split(".")
    if parts[0] == "bench" or module.startswith("gpulease.client._"):
        return True
    # Another test module: anything in the test folders, or a test_*.py anywhere under tests/.
    return parts[0] == "tests" and (
        (len(parts) > 1 and parts[1] in TEST_FOLDERS) or any(p.startswith("test_") for p in parts)
    )


def test_tests_import_no_bench_no_private_client_module_and_no_other_test() -> None:
    offenders = {
        str(p.relative_to(ROOT)): bad
        for p in TEST_SOURCES
        if (bad := sorted(m for m in imported_modules(p) if forbidden_in_tests(m)))
    }
    assert not offenders, f"tests import helpers from tests/support and public modules only: {offenders}"
    # The rule sees each kind of import it forbids.
    probe = ROOT / "tests" / "etcd" / "test_probe.py"
    for line in (
        "from bench.load import run_load",
        "import bench",
        "from gpulease.client._retry import RetryPlan",
        "from gpulease.client import _errors",
        "from tests.unit.test_batcher import node",
        "from tests.etcd import test_store",
        "from . import test_store",
        "from .test_store import x",
        "import tests.e2e.test_faults",
    ):
        assert any(forbidden_in_tests(m) for m in imported_modules(probe, line)), line
    assert not any(forbidden_in_tests(m) for m in imported_modules(probe, "from tests.support import harness"))
