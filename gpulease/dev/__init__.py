"""Development-only code: a whole cluster on one machine (LocalCluster, in cluster.py), its child
processes (procs.py) and `gpuctl dev` (ui.py). The tests and the bench use it too.

Not part of the client library, which never imports it: it needs the coordinator, agent and etcd
extras. gpuctl imports it only when `dev` runs.
"""
