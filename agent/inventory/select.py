"""Picks the node's inventory source from the configuration: NVML unless --simulate-gpus is given."""

from __future__ import annotations

import logging

from gpulease.agent.config import AgentConfig
from gpulease.agent.inventory import InventorySource
from gpulease.agent.inventory.nvml import NO_NVML_ADVICE, NvmlInventory
from gpulease.agent.inventory.simulated import SimulatedInventory

log = logging.getLogger(__name__)

# The tail of the one warning a node without NVML logs ("NVML unavailable (<why>): <this>").
NO_GPU_SOURCE_MESSAGE = NO_NVML_ADVICE


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
    # Real GPUs only: without NVML the node reports 0 GPUs (and NvmlInventory says why, once).
    return NvmlInventory(cpus=cfg.cpus, memory_bytes=cfg.memory_bytes, labels=cfg.labels)
