"""Runs the real NvmlInventory in this process and prints what it collects, one JSON line per collect.

    python -m tests.support.fakenvml.runner SCRIPT.json

SCRIPT is {"sysfs_root": PATH, "steps": [...]}; each step is one of
    {"collect": {"managed_pids": [...], "allocated_gpus": [...]} | null, "fresh": false}
    {"advance": SECONDS}          moves the inventory's clock forward
    {"config": TEXT, "path": P}   rewrites the fake NVML's configuration file P
Output lines are {"inventory": <NodeInventory as JSON>}; the JSON keeps unset optional fields out,
so a missing key means "unknown", and shows every other field, defaults included.
Run it with the fake library on LD_LIBRARY_PATH (see tests/support/fakenvml/__init__.py).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from google.protobuf import json_format

from gpulease.agent.inventory import InventoryContext
from gpulease.agent.inventory.nvml import NvmlInventory


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def main(script_path: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    script = json.loads(Path(script_path).read_text())
    clock = Clock()
    source = NvmlInventory(
        cpus=script.get("cpus", 4),
        memory_bytes=script.get("memory_bytes", 2**34),
        labels=script.get("labels", {}),
        host="fakehost",
        clock=clock,
        sysfs_root=Path(script.get("sysfs_root", "/nonexistent-sysfs")),
    )
    try:
        for step in script["steps"]:
            if "advance" in step:
                clock.now += float(step["advance"])
            elif "config" in step:
                path = Path(step["path"])
                tmp = path.with_suffix(".tmp")
                tmp.write_text(step["config"])
                tmp.replace(path)
            else:
                raw = step.get("collect")
                ctx = (
                    None
                    if raw is None
                    else InventoryContext(
                        managed_pids=frozenset(raw.get("managed_pids", [])),
                        allocated_gpus=frozenset(raw.get("allocated_gpus", [])),
                    )
                )
                inventory = source.collect(ctx, fresh=bool(step.get("fresh", False)))
                doc = json_format.MessageToDict(
                    inventory, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
                print(json.dumps({"inventory": doc}), flush=True)
    finally:
        source.close()


if __name__ == "__main__":
    main(sys.argv[1])
