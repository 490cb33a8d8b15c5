"""What `gpuctl dev` hands to gpulease.dev.ui.run_dev_cluster."""

from __future__ import annotations

from dataclasses import dataclass

# Bounds checked by `gpuctl dev`: enough for a laptop demo, small enough to start in seconds.
MAX_NODES = 64
MAX_GPUS_PER_NODE = 16


@dataclass(frozen=True)
class DevClusterConfig:
    nodes: int
    gpus_per_node: int
    # Coordinator port that clients (gpuctl, Client) connect to.
    port: int
    # Where etcd and the processes keep their state; None lets the dev cluster choose.
    data_dir: str | None
    # Also run the demo workload against the cluster once it is up.
    demo: bool
    # Mutual TLS on every hop and token auth (LocalCluster(secure=True)); writes data_dir/ca.pem and
    # data_dir/admin.token for gpuctl and the client library.
    auth: bool = False
    # The coordinator's HTTP port (/metrics, /healthz, /readyz), on loopback.
    http_port: int = 8080
