"""gpuctl quota and gpuctl priority against a real coordinator on the session's etcd (auth off:
every caller is the local admin, so --tenant may name any tenant).

- a quota set with gpuctl is listed with the usage of an allocation made with --tenant; an
  allocation over it exits 1 with the coordinator's reason; the default quota ('*') applies to a
  tenant without its own; deleting the quota lifts the limit;
- a priority class set with gpuctl is listed, an allocation may name it, and once deleted it is
  refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpulease.client import Client
from tests.support import gpuctl, harness

H100 = "NVIDIA H100 80GB HBM3"


def one_node(start: Callable[..., harness.Coordinator]) -> harness.Coordinator:
    c = start()
    harness.register(c.stub, "n1", gpus=4, cpus=16, model=H100)
    harness.wait_nodes_up(c.stub, {"n1"})
    return c


def ok(run: gpuctl.Run) -> gpuctl.Run:
    assert run.rc == 0, run
    return run


def tenants(base: list[str]) -> dict[str, Any]:
    return {t["tenant"]: t for t in ok(gpuctl.run([*base, "quota", "--json"])).json()}


def test_gpuctl_quota_set_list_enforce_delete(start_coordinator: Callable[..., harness.Coordinator]) -> None:
    c = one_node(start_coordinator)
    base = ["--coordinator", c.address]
    small = ["--cpus", "1", "--memory", "1MiB"]

    quota = ok(gpuctl.run([*base, "quota", "set", "team-a", "--gpus", "1", "--model", f"{H100}=1", "--borrow", "1",
                           "--lifetime", "24h", "--weight", "2", "--json"])).json()  # fmt: skip
    assert quota == {"tenant": "team-a", "gpus": 1, "models": {H100: 1}, "cpus": None, "memory_bytes": None,
                     "borrow": 1, "max_lifetime_seconds": 86400, "weight": 2.0}  # fmt: skip
    ok(gpuctl.run([*base, "quota", "set", "--default", "--gpus", "1"]))

    with Client(c.address, timeout=5) as client:
        made = [ok(gpuctl.run([*base, "allocate", "--gpus", "1", *small, "--tenant", "team-a", "--json"])).json()
                for _ in range(2)]  # fmt: skip
        assert [client.get_allocation(m["id"]).tenant for m in made] == ["team-a", "team-a"]
        listed = tenants(base)
        a = listed["team-a"]
        assert (a["used_gpus"], a["used_models"], a["borrowed_gpus"], a["pending"], a["from_default"]) == (
            2, {H100: 2}, 1, 0, False
        )  # fmt: skip
        assert a["quota"]["gpus"] == 1 and a["quota"]["borrow"] == 1 and a["quota"]["max_lifetime_seconds"] == 86400
        assert a["fair_share_gpu_hours"] >= 0
        assert listed["*"]["quota"]["gpus"] == 1

        # Nominal 1 + 1 borrowable are held: a third is refused, with the coordinator's reason.
        over = gpuctl.run([*base, "allocate", "--gpus", "1", *small, "--tenant", "team-a"])
        assert over.rc == 1 and "quota: team-a uses 2 of 1 (+1 borrowable) GPUs" in over.stderr, over
        assert over.stderr.startswith("gpuctl: error: "), over

        # A tenant without a quota of its own is under the default one.
        other = ok(gpuctl.run([*base, "allocate", "--gpus", "1", *small, "--tenant", "team-b", "--json"])).json()
        refused = gpuctl.run([*base, "allocate", "--gpus", "1", *small, "--tenant", "team-b"])
        assert refused.rc == 1 and "quota: team-b uses 1 of 1 GPUs" in refused.stderr, refused
        b = tenants(base)["team-b"]
        assert b["from_default"] is True and b["used_gpus"] == 1 and b["quota"]["gpus"] == 1

        table = ok(gpuctl.run([*base, "quota"]))
        assert "team-a" in table.stdout and "2/1+1" in table.stdout and "team-b (default quota)" in table.stdout

        # Deleted: team-a is listed for its usage, with no quota, and may take more.
        deleted = ok(gpuctl.run([*base, "quota", "delete", "team-a", "--json"])).json()
        assert deleted == {"tenant": "team-a", "deleted": True}
        again = ok(gpuctl.run([*base, "quota", "delete", "team-a"]))
        assert "the quota of tenant team-a was not set" in again.stdout
        ok(gpuctl.run([*base, "quota", "delete", "--default"]))
        listed = tenants(base)
        assert listed["team-a"]["quota"] is None and "*" not in listed
        third = ok(gpuctl.run([*base, "allocate", "--gpus", "1", *small, "--tenant", "team-a", "--json"])).json()
        for m in (*made, other, third):
            client.release(m["id"])


def test_gpuctl_priority_set_list_use_delete(start_coordinator: Callable[..., harness.Coordinator]) -> None:
    c = one_node(start_coordinator)
    base = ["--coordinator", c.address]
    alloc = [*base, "allocate", "--gpus", "1", "--cpus", "1", "--memory", "1MiB", "--priority", "urgent"]

    unknown = gpuctl.run([*alloc, "--json"])
    assert unknown.rc == 1 and "priority class 'urgent' is not defined" in unknown.stderr, unknown

    made = ok(gpuctl.run([*base, "priority", "set", "urgent", "500", "--grace", "45s", "--min-runtime", "10m",
                          "--json"])).json()  # fmt: skip
    assert made == {"name": "urgent", "value": 500, "is_default": False, "preemption_grace_seconds": 45,
                    "min_runtime_seconds": 600}  # fmt: skip
    classes = {p["name"]: p for p in ok(gpuctl.run([*base, "priority", "--json"])).json()}
    assert classes["urgent"] == made
    assert sum(p["is_default"] for p in classes.values()) == 1
    table = ok(gpuctl.run([*base, "priority", "list"]))
    assert "urgent" in table.stdout and "45s" in table.stdout and "10m" in table.stdout

    with Client(c.address, timeout=5) as client:
        used = ok(gpuctl.run([*alloc, "--tenant", "team-a", "--preemptible", "--json"])).json()
        record = client.get_allocation(used["id"])
        assert (record.tenant, record.priority_class, record.preemptible) == ("team-a", "urgent", True)
        text = ok(gpuctl.run([*alloc, "--tenant", "team-b"]))
        assert "tenant team-b, priority class urgent\n" in text.stdout, text
        client.release(text.stdout.split()[1])
        client.release(used["id"])

    deleted = ok(gpuctl.run([*base, "priority", "delete", "urgent", "--json"])).json()
    assert deleted == {"name": "urgent", "deleted": True}
    assert "urgent" not in {p["name"] for p in ok(gpuctl.run([*base, "priority", "--json"])).json()}
    gone = gpuctl.run([*base, "priority", "delete", "urgent"])
    assert gone.rc == 1 and "no stored priority class 'urgent'" in gone.stderr, gone
    after = gpuctl.run(alloc)
    assert after.rc == 1 and "is not defined" in after.stderr, after
