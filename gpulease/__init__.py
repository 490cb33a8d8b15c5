"""gpulease: GPU allocations with etcd leases and fencing tokens (client side)."""

__version__ = "0.1.0"
