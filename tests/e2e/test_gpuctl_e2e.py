"""gpuctl as a user runs it: a real subprocess against a real coordinator and etcd.

Nodes are registered directly through the coordinator API (they stay up for the coordinator's
node TTL of 60 s, longer than any test here), except where a real agent with simulated GPUs is
needed. Every run asserts the exit code, the exact JSON shape and that no traceback leaked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pytest

from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from tests.support import gpuctl as cli
from tests.support import harness
from tests.support.gpuctl import Run

GiB = harness.GiB
ALLOC_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")

SUMMARY_COUNTERS = {"gpus_total", "gpus_free", "cpus_total", "cpus_free", "memory_total_bytes", "memory_free_bytes"}
STATUS_NODE_KEYS = {"name", "state"} | SUMMARY_COUNTERS
NODE_KEYS = {"name", "state", "address", "gpus", "cpus_total", "memory_total_bytes", "labels"}
# The documented keys, plus foreign_processes (issue 3: GPUs used by something gpulease did not start).
NODE_GPU_KEYS = {"index", "uuid", "model", "memory_total_bytes", "healthy", "simulated", "foreign_processes"}
ALLOC_KEYS = {"id", "node", "gpus", "cpus", "memory_bytes", "ttl_seconds", "revision"}
ALLOC_GPU_KEYS = {"index", "uuid"}

# The two registered nodes of the `cluster` fixture: name -> (gpus, cpus, memory).
NODES = {"gpu-a": (4, 16, 64 * GiB), "gpu-b": (2, 8, 32 * GiB)}


def gpuctl(*args: str, coordinator: str | None = None, env: Mapping[str, str] | None = None) -> Run:
    """Run gpuctl as a subprocess. coordinator=None leaves the address to the environment."""
    return cli.run(([] if coordinator is None else ["--coordinator", coordinator]) + list(args), env)


def ok(*args: str, coordinator: str | None = None, env: Mapping[str, str] | None = None) -> Run:
    run = gpuctl(*args, coordinator=coordinator, env=env)
    assert run.rc == 0, str(run)
    return run


def failed(*args: str, coordinator: str | None = None, env: Mapping[str, str] | None = None) -> Run:
    """A gpuctl run that must exit 1 with one `gpuctl: error:` line and nothing on stdout."""
    run = gpuctl(*args, coordinator=coordinator, env=env)
    assert run.rc == 1, str(run)
    assert run.stdout == "", str(run)
    assert run.stderr.startswith("gpuctl: error: "), str(run)
    return run


def expected_status(used: Mapping[str, tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """The exact `status --json` document for NODES (all up) with `used` = node -> (gpus, cpus, memory)."""
    used = used or {}
    nodes: list[dict[str, Any]] = []
    for name, (gpus, cpus, memory) in NODES.items():
        ug, uc, um = used.get(name, (0, 0, 0))
        nodes.append(
            {
                "name": name,
                "state": "up",
                "gpus_total": gpus,
                "gpus_free": gpus - ug,
                "cpus_total": cpus,
                "cpus_free": cpus - uc,
                "memory_total_bytes": memory,
                "memory_free_bytes": memory - um,
            }
        )
    totals = {key: sum(n[key] for n in nodes) for key in sorted(SUMMARY_COUNTERS)}
    return {"nodes": nodes, "totals": totals}


def status_json(address: str) -> dict[str, Any]:
    doc: dict[str, Any] = ok("status", "--json", coordinator=address).json()
    assert set(doc) == {"nodes", "totals"}, doc
    for node in doc["nodes"]:
        assert set(node) == STATUS_NODE_KEYS, node
    assert set(doc["totals"]) == SUMMARY_COUNTERS, doc
    doc["nodes"].sort(key=lambda n: n["name"])
    return doc


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "empty table"
    return lines[0].split(), [line.split() for line in lines[1:]]


@pytest.fixture
def cluster(coordinator: harness.Coordinator) -> harness.Coordinator:
    for name, (gpus, cpus, memory) in NODES.items():
        harness.register(coordinator.stub, name, gpus=gpus, cpus=cpus, memory=memory)
    harness.wait_nodes_up(coordinator.stub, set(NODES))
    return coordinator


@pytest.fixture
def sim_agent(coordinator: harness.Coordinator, local_cluster: LocalCluster) -> str:
    """A real agent process with 2 simulated GPUs registered with `coordinator`; returns its node name."""
    name = "sim-0"
    local_cluster.add_agent(name, 2, cpus=8, memory="16GiB", coordinator=coordinator.address)
    harness.wait_nodes_up(coordinator.stub, {name})
    return name


# -- status / nodes ----------------------------------------------------------------------------


def test_status_json_and_table(cluster: harness.Coordinator) -> None:
    assert status_json(cluster.address) == expected_status()

    headers, rows = table(ok("status", coordinator=cluster.address).stdout)
    assert headers == ["NODE", "STATE", "GPUS", "CPUS", "MEMORY"]
    assert rows == [
        ["gpu-a", "up", "4/4", "16/16", "64.0GiB/64.0GiB"],
        ["gpu-b", "up", "2/2", "8/8", "32.0GiB/32.0GiB"],
        ["TOTAL", "6/6", "24/24", "96.0GiB/96.0GiB"],
    ]


def test_nodes_json_and_table(cluster: harness.Coordinator) -> None:
    doc = ok("nodes", "--json", coordinator=cluster.address).json()
    assert isinstance(doc, list)
    assert sorted(n["name"] for n in doc) == sorted(NODES)
    for node in doc:
        assert set(node) == NODE_KEYS, node
        gpus, cpus, memory = NODES[node["name"]]
        assert node["state"] == "up"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", node["address"]), node
        assert node["cpus_total"] == cpus
        assert node["memory_total_bytes"] == memory
        assert node["labels"] == {}
        assert [g["index"] for g in node["gpus"]] == list(range(gpus))
        for g in node["gpus"]:
            assert set(g) == NODE_GPU_KEYS, g
            assert g == {
                "index": g["index"],
                "uuid": f"GPU-{node['name']}-{g['index']}",
                "model": "NVIDIA H100 80GB HBM3",
                "memory_total_bytes": 80 * GiB,
                "healthy": True,
                "simulated": False,
                "foreign_processes": False,
            }

    headers, rows = table(ok("nodes", coordinator=cluster.address).stdout)
    assert headers == ["NODE", "STATE", "ADDRESS", "GPUS", "CPUS", "MEMORY", "LABELS"]
    assert sorted(r[0] for r in rows) == sorted(NODES)
    assert all(r[1] == "up" for r in rows), rows


def test_nodes_show_simulated_gpus_of_a_real_agent_via_env(coordinator: harness.Coordinator, sim_agent: str) -> None:
    # The address comes from GPULEASE_COORDINATOR only (no --coordinator).
    env = {"GPULEASE_COORDINATOR": coordinator.address}
    doc = ok("nodes", "--json", env=env).json()
    assert [n["name"] for n in doc] == [sim_agent]
    (node,) = doc
    assert set(node) == NODE_KEYS
    assert node["state"] == "up"
    assert node["cpus_total"] == 8
    assert node["memory_total_bytes"] == 16 * GiB
    assert [g["index"] for g in node["gpus"]] == [0, 1]
    for g in node["gpus"]:
        assert set(g) == NODE_GPU_KEYS, g
        assert g["simulated"] is True, g
        assert g["healthy"] is True, g

    out = ok("nodes", env=env).stdout
    row = next(line for line in out.splitlines() if line.startswith(sim_agent))
    assert "2x" in row and "(simulated)" in row, out

    status = ok("status", "--json", env=env).json()
    assert status["totals"]["gpus_total"] == 2
    assert status["totals"]["gpus_free"] == 2


def test_coordinator_flag_beats_env(cluster: harness.Coordinator) -> None:
    dead = f"127.0.0.1:{procs.free_port()}"
    run = ok("status", "--json", coordinator=cluster.address, env={"GPULEASE_COORDINATOR": dead})
    assert run.json()["totals"]["gpus_total"] == 6


# -- allocate / allocs / release ---------------------------------------------------------------


def test_allocate_list_release_roundtrip(cluster: harness.Coordinator) -> None:
    address = cluster.address
    alloc = ok(
        "allocate", "--gpus", "2", "--cpus", "2", "--memory", "1GiB", "--ttl", "30s", "--owner", "me", "--json",
        coordinator=address,
    ).json()  # fmt: skip
    assert set(alloc) == ALLOC_KEYS, alloc
    assert ALLOC_ID_RE.fullmatch(alloc["id"]), alloc
    assert alloc["node"] in NODES
    assert alloc["cpus"] == 2
    assert alloc["memory_bytes"] == GiB
    assert alloc["ttl_seconds"] == 30
    assert isinstance(alloc["revision"], int) and alloc["revision"] > 0, alloc
    assert len(alloc["gpus"]) == 2
    indexes = [g["index"] for g in alloc["gpus"]]
    assert len(set(indexes)) == 2 and all(0 <= i < NODES[alloc["node"]][0] for i in indexes), alloc
    for g in alloc["gpus"]:
        assert set(g) == ALLOC_GPU_KEYS, g
        assert g["uuid"] == f"GPU-{alloc['node']}-{g['index']}"

    assert status_json(address) == expected_status({alloc["node"]: (2, 2, GiB)})
    headers, rows = table(ok("status", coordinator=address).stdout)
    total = rows[-1]
    assert total[0] == "TOTAL" and total[1:3] == ["4/6", "22/24"], rows

    assert ok("allocs", "--json", coordinator=address).json() == [alloc]
    assert ok("allocs", "--json", "--owner", "me", coordinator=address).json() == [alloc]
    assert ok("allocs", "--json", "--owner", "someone-else", coordinator=address).json() == []
    assert ok("allocs", "--json", "--node", alloc["node"], coordinator=address).json() == [alloc]
    headers, rows = table(ok("allocs", coordinator=address).stdout)
    assert headers[0] == "ID" and [r[0] for r in rows] == [alloc["id"]]

    first = ok("release", alloc["id"], coordinator=address)
    assert first.stdout.strip() == f"released {alloc['id']}"
    second = ok("release", alloc["id"], coordinator=address)
    assert "not live" in second.stdout, str(second)

    assert ok("allocs", "--json", coordinator=address).json() == []
    assert ok("allocs", coordinator=address).stdout.strip() == "no live allocations"
    assert status_json(address) == expected_status()


def test_release_json(cluster: harness.Coordinator) -> None:
    alloc = ok("allocate", "--gpus", "1", "--json", coordinator=cluster.address).json()
    assert ok("release", alloc["id"], "--json", coordinator=cluster.address).json() == {
        "id": alloc["id"],
        "released": True,
    }
    assert ok("release", alloc["id"], "--json", coordinator=cluster.address).json() == {
        "id": alloc["id"],
        "released": False,
    }


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["allocate", "--gpus", "0"], ["gpus must be at least 1, got 0"]),
        (["allocate", "--gpus", "-1"], ["gpus must be at least 1, got -1"]),
        (["allocate", "--gpus", "999"], ["999", "at most 4"]),
        (["allocate", "--gpus", "1", "--ttl", "2s"], ["ttl", "2s", "out of range"]),
        (["allocate", "--gpus", "1", "--memory", "lots"], ["--memory", "cannot parse size 'lots'"]),
        (["release", "../x"], ["malformed", "'../x'"]),
        (["cordon", "no-such-node"], ["no-such-node", "not registered"]),
    ],
    ids=[
        "gpus-0",
        "gpus-negative",
        "gpus-too-many",
        "ttl-too-short",
        "memory-unparsable",
        "release-malformed",
        "cordon-unknown",
    ],
)
def test_errors_exit_1_with_message(cluster: harness.Coordinator, args: list[str], fragments: list[str]) -> None:
    run = failed(*args, coordinator=cluster.address)
    for fragment in fragments:
        assert fragment in run.stderr, str(run)
    # A refused request changes nothing.
    assert status_json(cluster.address) == expected_status()
    assert ok("allocs", "--json", coordinator=cluster.address).json() == []


def test_release_of_unknown_allocation_is_idempotent(cluster: harness.Coordinator) -> None:
    run = ok("release", "0123456789abcdef", coordinator=cluster.address)
    assert "0123456789abcdef" in run.stdout and "not live" in run.stdout, str(run)
    assert run.stderr == ""


@pytest.mark.parametrize("via", ["flag", "env"])
def test_unreachable_coordinator(via: str) -> None:
    dead = f"127.0.0.1:{procs.free_port()}"
    if via == "flag":
        run = failed("--timeout", "5", "status", coordinator=dead)
    else:
        run = failed("--timeout", "5", "status", env={"GPULEASE_COORDINATOR": dead})
    assert dead in run.stderr, str(run)
    assert "cannot reach" in run.stderr, str(run)


# -- cordon ------------------------------------------------------------------------------------


def test_cordon_and_uncordon(cluster: harness.Coordinator) -> None:
    address = cluster.address
    run = ok("cordon", "gpu-a", coordinator=address)
    assert run.stdout.startswith("cordoned gpu-a"), str(run)

    doc = status_json(address)
    states = {n["name"]: n["state"] for n in doc["nodes"]}
    assert states == {"gpu-a": "cordoned", "gpu-b": "up"}
    # Totals count free capacity of up nodes only.
    assert doc["totals"]["gpus_free"] == 2
    assert doc["totals"]["cpus_free"] == 8
    assert doc["totals"]["memory_free_bytes"] == 32 * GiB
    nodes = {n["name"]: n["state"] for n in ok("nodes", "--json", coordinator=address).json()}
    assert nodes == {"gpu-a": "cordoned", "gpu-b": "up"}
    _, rows = table(ok("status", coordinator=address).stdout)
    assert rows[0][:2] == ["gpu-a", "cordoned"], rows

    # Only gpu-a has 3 GPUs, and it is cordoned: nothing may be placed on it.
    failed("allocate", "--gpus", "3", coordinator=address)
    assert ok("allocs", "--json", coordinator=address).json() == []

    run = ok("uncordon", "gpu-a", coordinator=address)
    assert run.stdout.startswith("uncordoned gpu-a"), str(run)
    assert status_json(address) == expected_status()

    alloc = ok("allocate", "--gpus", "3", "--json", coordinator=address).json()
    assert alloc["node"] == "gpu-a"
    ok("release", alloc["id"], coordinator=address)
