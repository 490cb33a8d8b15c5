"""Where a node's inventory (GPUs, CPUs, memory, labels) comes from.

Every source returns the wire type NodeInventory directly: the agent only ever sends it, so a
parallel dataclass would be one more conversion with nothing to gain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gpulease.v1.types_pb2 import NodeInventory

# Every simulated GPU claims this much memory, like an 80 GB data-centre card.
SIMULATED_GPU_MEMORY_BYTES = 80 * 2**30


@dataclass(frozen=True)
class InventoryContext:
    """What the agent knows that the GPU driver does not: used to tell our GPU users from foreign ones.

    ``managed_pids``: host PIDs (as NVML reports them, i.e. in the host PID namespace) of every
    process in a container gpulease started; descendants of these PIDs also count as managed.
    ``allocated_gpus``: indexes of this node's GPUs that live allocations hold.
    """

    managed_pids: frozenset[int] = frozenset()
    allocated_gpus: frozenset[int] = frozenset()


class InventorySource(Protocol):
    def collect(self, ctx: InventoryContext | None = None) -> NodeInventory:
        """Return the node's current inventory. Called every heartbeat; should be cheap.

        ``ctx`` None means "not known": a source then flags no GPU as used by foreign processes.
        """
        ...


__all__ = ["SIMULATED_GPU_MEMORY_BYTES", "InventoryContext", "InventorySource", "NodeInventory"]
