"""Picks the node's inventory source from the configuration."""

from __future__ import annotations

import logging

from agent.config import AgentConfig
from agent.inventory import InventorySource
from agent.inventory.host import HostOnlyInventory
from agent.inventory.simulated import SimulatedInventory

log = logging.getLogger(__name__)

NO_GPU_SOURCE_MESSAGE = (
    "no GPU inventory source: NVML support arrives later; use --simulate-gpus N for a simulated node"
)


def select_source(cfg: AgentConfig) -> InventorySource:
    if cfg.simulate_gpus is not None:
        log.info("simulating %d GPU(s) of model %r: these GPUs are NOT real", cfg.simulate_gpus, cfg.gpu_model)
        return SimulatedInventory(
            node=cfg.node_id,
            gpus=cfg.simulate_gpus,
            model=cfg.gpu_model,
            cpus=cfg.cpus,
            memory_bytes=cfg.memory_bytes,
            labels=cfg.labels,
        )
    log.warning(NO_GPU_SOURCE_MESSAGE)
    return HostOnlyInventory(cpus=cfg.cpus, memory_bytes=cfg.memory_bytes, labels=cfg.labels)
