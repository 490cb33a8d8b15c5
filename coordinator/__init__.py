"""gpulease coordinator: the only writer of cluster state, which lives in etcd."""
