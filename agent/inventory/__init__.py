"""Where a node's inventory (GPUs, CPUs, memory, labels) comes from.

Every source returns the wire type NodeInventory directly: the agent only ever sends it, so a
parallel dataclass would be one more conversion with nothing to gain.
"""

from __future__ import annotations

from typing import Protocol

from gpulease.v1.types_pb2 import NodeInventory

# Every simulated GPU claims this much memory, like an 80 GB data-centre card.
SIMULATED_GPU_MEMORY_BYTES = 80 * 2**30


class InventorySource(Protocol):
    def collect(self) -> NodeInventory:
        """Return the node's current inventory. Called every heartbeat; should be cheap."""
        ...


__all__ = ["SIMULATED_GPU_MEMORY_BYTES", "InventorySource", "NodeInventory"]
