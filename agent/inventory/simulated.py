"""Made-up GPUs for demos and tests (--simulate-gpus N). Every GPU says so: simulated=True."""

from __future__ import annotations

from collections.abc import Mapping

from gpulease.agent.inventory import SIMULATED_GPU_MEMORY_BYTES, InventoryContext
from gpulease.agent.inventory.host import HostOnlyInventory
from gpulease.v1.types_pb2 import Gpu, NodeInventory

SIMULATED_HEALTH_DETAIL = "simulated"


def simulated_uuid(node: str, index: int) -> str:
    # Real NVIDIA UUIDs are GPU-<hex>; "SIM" plus the node name can never be mistaken for one.
    return f"GPU-SIM-{node}-{index}"


class SimulatedInventory:
    def __init__(
        self,
        node: str,
        gpus: int,
        model: str,
        cpus: int | None = None,
        memory_bytes: int | None = None,
        labels: Mapping[str, str] | None = None,
        hostname: str | None = None,
        gpu_memory_bytes: int = SIMULATED_GPU_MEMORY_BYTES,
    ) -> None:
        if gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {gpus}")
        self._host = HostOnlyInventory(cpus=cpus, memory_bytes=memory_bytes, labels=labels, host=hostname)
        self._gpus = tuple(
            Gpu(
                index=i,
                uuid=simulated_uuid(node, i),
                model=model,
                memory_total_bytes=gpu_memory_bytes,
                healthy=True,
                simulated=True,
                health_detail=SIMULATED_HEALTH_DETAIL,
            )
            for i in range(gpus)
        )

    def collect(self, ctx: InventoryContext | None = None) -> NodeInventory:
        # Simulated GPUs run nothing, so the context (managed PIDs, allocated GPUs) changes nothing.
        inventory = self._host.collect()
        inventory.gpus.extend(self._gpus)
        inventory.source = "simulated"
        return inventory
